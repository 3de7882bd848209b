"""A light ClientApp for the load benchmark: numpy only, an exactly known update.

The model it receives holds two arrays: ``ledger``, one float64 entry per
client of the run, and ``payload``, float32 values that only give the message
the size of a real model.  Training adds 1 to the client's own ledger entry,
leaves the payload as it was, and reports the ``examples`` of its node config
as ``num-examples``.  So FedAvg's aggregate moves entry ``i`` by
``examples_i / sum(examples)`` for every client whose update it kept, and by
nothing for any other: which updates were aggregated, and with what weight,
can be read back from the global model.

Node config: ``index`` (the client's ledger entry), ``examples`` (a positive
int), and two faults: ``fail`` (the app raises: the service answers HTTP 500)
and ``drop`` (a sound-looking reply that silently leaves out the client's
contribution: the lost update the benchmark must notice).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

LEDGER = "ledger"
PAYLOAD = "payload"

app = ClientApp()


class PlannedFault(RuntimeError):
    """The failure a node config asked for."""


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Add this client's contribution to the ledger; reply with its example count."""
    config = context.node_config
    if config.get("fail", False):
        raise PlannedFault(f"client {config.get('index')} is set to fail")
    record = msg.content["arrays"]
    ledger = record[LEDGER].numpy().copy()
    if not config.get("drop", False):
        ledger[int(config["index"])] += 1.0
    arrays = ArrayRecord({LEDGER: Array(ledger), PAYLOAD: record[PAYLOAD]})
    metrics = MetricRecord({"num-examples": int(config["examples"]), "train-loss": 0.0})
    return Message(
        content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg
    )


def initial_arrays(clients: int, payload_floats: int) -> ArrayRecord:
    """The model a run starts from: a zero ledger and a deterministic payload."""
    payload = np.linspace(-1.0, 1.0, payload_floats, dtype=np.float32)
    ledger = np.zeros(clients, dtype=np.float64)
    return ArrayRecord({LEDGER: Array(ledger), PAYLOAD: Array(payload)})
