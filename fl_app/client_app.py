"""The FLUIDS ``ClientApp``: train the autoencoder on a device's unlabelled traffic.

Each client service hosts this app with a node config that names its data shard
and the device it emulates:

- ``data-path``: the client's feature matrix (``.npz``);
- ``ms-per-sample`` and ``kbps``: the device's speed from the FedScale trace;
- ``time-scale``: wall seconds per emulated second, so that a run stays short
  while the mesh still sees fast and slow devices;
- ``fail-rate``: the share of training requests on which the device fails;
- ``seed``: the client's seed;
- a fault schedule, by the round the server names in ``server-round``:
  ``fail-from-round`` (``fail-rate`` applies from that round on),
  ``slow-from-round`` and ``slow-factor`` (from that round the device computes
  ``slow-factor`` times slower);
- faults injected on purpose, each in one round: ``crash-in-round`` (the
  process is killed once that round's local training is done and before it
  replies, as an out-of-memory kill would), and ``reply-fault`` with
  ``reply-fault-round`` (the reply of that round carries NaN weights
  (``nan``), an array of the wrong shape (``shape``) or ``oversized-bytes`` of
  padding (``oversized``)).

The training config may carry ``local-steps-factor``, which a selection policy
sets per client to scale its ``local-steps``.

The reply carries the updated weights and, for the controller, the training loss
and the emulated seconds the round took on the device.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import time
from functools import cache

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_app import data, devices, model

log = logging.getLogger("fl_app.client")

app = ClientApp()

REPLY_FAULTS = ("nan", "shape", "oversized")


class EmulatedDeviceFailure(RuntimeError):
    """The emulated device failed this request, as a flaky device would."""


@cache
def _shard(path: str) -> np.ndarray:
    return data.load_client_shard(path)


def warm_up(context: Context) -> None:
    """Load the shard and run one training step before the service is ready.

    The first step in a process initialises torch; without this the first
    training request of every client would look slow to the mesh.
    """
    torch.set_num_threads(1)
    x = _shard(str(context.node_config["data-path"]))
    autoencoder = model.build_autoencoder(x.shape[1])
    model.train_autoencoder(
        autoencoder, x[:64], local_steps=1, batch_size=64, lr=1e-3, seed=0
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One round of local training on the client's own data."""
    started = time.monotonic()
    node = context.node_config
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    seed = int(node.get("seed", 0)) * 10_000 + server_round
    torch.set_num_threads(1)

    x = _shard(str(node["data-path"]))
    arrays = msg.content["arrays"]
    autoencoder = model.build_autoencoder(x.shape[1])
    autoencoder.load_state_dict(arrays.to_torch_state_dict())
    # A selection policy may scale one client's local work (PyramidFL).
    local_steps = max(
        1,
        round(
            int(config.get("local-steps", 100))
            * float(config.get("local-steps-factor", 1.0))
        ),
    )
    batch_size = int(config.get("batch-size", 64))
    loss = model.train_autoencoder(
        autoencoder,
        x,
        local_steps=local_steps,
        batch_size=batch_size,
        lr=float(config.get("lr", 3e-3)),
        seed=seed,
    )

    # Emulate the device: its round takes as long as FedScale's formula says,
    # scaled to wall time, and a flaky device fails part of its requests midway.
    slow_factor = (
        float(node.get("slow-factor", 1.0))
        if _from_round(node, "slow-from-round", server_round)
        else 1.0
    )
    device = devices.DeviceProfile(
        trace_id=-1,
        compute_ms_per_sample=float(node["ms-per-sample"]) * slow_factor,
        bandwidth_kbps=float(node["kbps"]),
    )
    compute_s, comm_s = device.round_seconds(
        batch_size, local_steps, _model_bytes(arrays)
    )
    emulated_s = compute_s + comm_s
    wall_s = emulated_s * float(node.get("time-scale", 0.0))
    fail_rate = (
        float(node.get("fail-rate", 0.0))
        if _from_round(node, "fail-from-round", server_round, default=0)
        else 0.0
    )
    if random.Random(seed).random() < fail_rate:
        _sleep_until(started + wall_s / 2)
        raise EmulatedDeviceFailure(f"device failed in round {server_round}")
    if _in_round(node, "crash-in-round", server_round):
        # Trained, not yet replied: whatever the device's speed, the crash
        # comes while the request is in flight and before any deadline.
        log.warning("fault: crashing in the middle of round %d", server_round)
        os.kill(os.getpid(), signal.SIGKILL)
    _sleep_until(started + wall_s)

    reply = RecordDict(
        {
            "arrays": _faulty_arrays(node, server_round, autoencoder.state_dict()),
            "metrics": MetricRecord(
                {
                    "num-examples": int(len(x)),
                    "train-loss": float(loss),
                    "emulated-s": float(emulated_s),
                }
            ),
        }
    )
    return Message(content=reply, reply_to=msg)


def _from_round(
    node: dict, key: str, server_round: int, default: int | None = None
) -> bool:
    """True when the node config's ``key`` names this round or an earlier one."""
    first = node.get(key, default)
    return first is not None and server_round >= int(first)


def _in_round(node: dict, key: str, server_round: int) -> bool:
    """True when the node config's ``key`` names exactly this round."""
    value = node.get(key)
    return value is not None and int(value) == server_round


def _faulty_arrays(node: dict, server_round: int, state: dict) -> ArrayRecord:
    """The update as trained, or as the node config's reply fault spoils it."""
    if not _in_round(node, "reply-fault-round", server_round):
        return ArrayRecord(state)
    fault = str(node.get("reply-fault", ""))
    name = next(iter(state))
    if fault == "nan":
        state[name] = torch.full_like(state[name], float("nan"))
    elif fault == "shape":
        state[name] = torch.zeros(7, 7, dtype=state[name].dtype)
    elif fault == "oversized":
        padding = int(node.get("oversized-bytes", 64 * 1024 * 1024)) // 4 + 1
        state["padding"] = torch.zeros(padding, dtype=torch.float32)
    else:
        raise ValueError(f"reply-fault must be one of {REPLY_FAULTS}, not {fault!r}")
    log.warning("fault: the reply of round %d is spoilt (%s)", server_round, fault)
    return ArrayRecord(state)


def _model_bytes(arrays: ArrayRecord) -> int:
    return sum(len(array.data) for array in arrays.values())


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
