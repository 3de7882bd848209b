"""Device heterogeneity from the FedScale capacity trace.

Each client is given one real device of the trace: its inference latency per
sample and its network bandwidth. A round's emulated cost follows FedScale:
local training costs three forward passes' worth of compute per sample (the
backward pass is about twice the forward), and the model crosses the link
twice, down then up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fl_app import data, fetch

TRACE_COLUMNS = ("client_id", "computation_ms_per_sample", "communication_kbps")
TRAINING_COST_PER_SAMPLE = 3
BITS_PER_BYTE = 8
BITS_PER_KILOBIT = 1000
MS_PER_S = 1000


@dataclass(frozen=True)
class DeviceProfile:
    """One device of the trace: compute latency and link bandwidth."""

    trace_id: int
    compute_ms_per_sample: float
    bandwidth_kbps: float

    def round_seconds(
        self, batch_size: int, local_steps: int, model_bytes: int
    ) -> tuple[float, float]:
        """Return (compute_s, comm_s) for one round of local training.

        compute_s = 3 * batch_size * local_steps * ms_per_sample / 1000;
        comm_s = (download_kbit + upload_kbit) / kbps, each direction moving
        the whole model of ``model_bytes``.
        """
        samples = batch_size * local_steps
        compute_s = (
            TRAINING_COST_PER_SAMPLE * samples * self.compute_ms_per_sample / MS_PER_S
        )
        model_kbit = model_bytes * BITS_PER_BYTE / BITS_PER_KILOBIT
        comm_s = 2 * model_kbit / self.bandwidth_kbps
        return compute_s, comm_s


def load_trace(data_dir: Path | str | None = None) -> pd.DataFrame:
    """Read the capacity trace, one row per device."""
    (relative,) = fetch.required_files("fedscale")
    path = data.require_file("fedscale", relative, data_dir)
    trace = pd.read_csv(path)
    missing = set(TRACE_COLUMNS) - set(trace.columns)
    if missing:
        raise data.DataError(f"{path} lacks columns {sorted(missing)}")
    return trace


def assign_devices(
    num_clients: int, seed: int, data_dir: Path | str | None = None
) -> list[DeviceProfile]:
    """Draw ``num_clients`` distinct trace rows with a seeded generator."""
    return profiles_from_trace(load_trace(data_dir), num_clients, seed)


def profiles_from_trace(
    trace: pd.DataFrame, num_clients: int, seed: int
) -> list[DeviceProfile]:
    """Draw ``num_clients`` distinct rows of ``trace`` as device profiles."""
    if num_clients > len(trace):
        raise ValueError(f"the trace has {len(trace)} devices, not {num_clients}")
    rows = np.random.default_rng(seed).choice(len(trace), num_clients, replace=False)
    picked = trace.iloc[rows]
    return [
        DeviceProfile(
            trace_id=int(row.client_id),
            compute_ms_per_sample=float(row.computation_ms_per_sample),
            bandwidth_kbps=float(row.communication_kbps),
        )
        for row in picked.itertuples(index=False)
    ]
