"""Small ClientApps for the bridge tests; each misbehaves in one way, or not at all.

The behaviour comes from the node config key ``mode``: ``double`` (a sound
update: every array doubled), ``nan``, ``shape``, ``dtype``, ``no-examples``,
``raise`` and ``sleep`` (a sound update after ``sleep-s`` seconds).
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    mode = str(context.node_config.get("mode", "double"))
    arrays = [a * 2 for a in msg.content["arrays"].to_numpy_ndarrays()]
    examples = 10
    if mode == "raise":
        raise RuntimeError("this client always fails")
    if mode == "sleep":
        time.sleep(float(context.node_config.get("sleep-s", 1.0)))
    if mode == "nan":
        arrays[0] = np.full_like(arrays[0], np.nan)
    if mode == "shape":
        arrays[0] = np.zeros((7, 7), dtype=arrays[0].dtype)
    if mode == "dtype":
        arrays[0] = arrays[0].astype(np.float64)
    if mode == "no-examples":
        examples = 0
    content = RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": 0.5}),
        }
    )
    return Message(content=content, reply_to=msg)
