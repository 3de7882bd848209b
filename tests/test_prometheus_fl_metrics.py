"""The FL metrics a client service exports, under the names the source queries."""

from __future__ import annotations

import threading

import httpx
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from prometheus_client.parser import text_string_to_metric_families

from meshctl.flower import clientservice, grid
from meshctl.telemetry import prometheus as promsource
from meshctl.types import ArmedRound
from tests import toy_client_app


def test_a_train_reply_sets_the_fl_gauges_the_source_reads() -> None:
    service = clientservice.ClientService(
        toy_client_app.app, name="c-00", node_id=1, node_config={"mode": "double"}
    )
    server = clientservice.serve(service, host="127.0.0.1", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    mesh_grid = grid.MeshGrid(
        mesh_url=url,
        arm=lambda r: ArmedRound(r, (1,), f"r{r}"),
        report=lambda r, outcomes: None,
        deadline_s=5.0,
    )
    try:
        [slot] = mesh_grid.get_node_ids()
        content = RecordDict(
            {
                "arrays": ArrayRecord([np.ones((3, 2), dtype=np.float32)]),
                "config": ConfigRecord({"server-round": 1}),
            }
        )
        message = Message(
            content=content, message_type=MessageType.TRAIN, dst_node_id=slot
        )
        list(mesh_grid.send_and_receive([message]))
        response = httpx.get(f"{url}{clientservice.METRICS_PATH}")
    finally:
        mesh_grid.close()
        server.shutdown()
        server.server_close()

    values = {
        s.name: s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }
    assert values[promsource.FL_TRAIN_LOSS] == 0.5
    assert values[promsource.FL_TRAIN_EXAMPLES] == 10
    assert values[promsource.FL_LOCAL_TRAIN_SECONDS] >= 0
