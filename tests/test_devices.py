"""Device profiles drawn from the FedScale capacity trace."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fl_app import data, devices


@pytest.fixture
def small_trace() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "client_id": range(1, 11),
            "computation_ms_per_sample": [15, 20, 30, 41, 50, 60, 80, 100, 150, 199],
            "communication_kbps": [1000.0 * (i + 1) for i in range(10)],
        }
    )


def test_round_seconds_follow_fedscale_on_a_hand_worked_case() -> None:
    profile = devices.DeviceProfile(
        trace_id=1, compute_ms_per_sample=40.0, bandwidth_kbps=8000.0
    )

    compute_s, comm_s = profile.round_seconds(
        batch_size=64, local_steps=50, model_bytes=100_000
    )

    # 3 * 64 * 50 samples * 40 ms = 384 s; 2 * 800 kbit / 8000 kbps = 0.2 s
    assert compute_s == pytest.approx(384.0)
    assert comm_s == pytest.approx(0.2)


def test_devices_are_distinct_rows_drawn_with_the_seed(
    small_trace: pd.DataFrame,
) -> None:
    first = devices.profiles_from_trace(small_trace, 4, seed=1)
    again = devices.profiles_from_trace(small_trace, 4, seed=1)
    other = devices.profiles_from_trace(small_trace, 4, seed=2)

    assert first == again
    assert first != other
    assert len({profile.trace_id for profile in first}) == 4


def test_a_profile_carries_its_trace_row(small_trace: pd.DataFrame) -> None:
    (profile,) = devices.profiles_from_trace(small_trace, 1, seed=0)

    row = profile.trace_id - 1
    assert (
        profile.compute_ms_per_sample
        == [15, 20, 30, 41, 50, 60, 80, 100, 150, 199][row]
    )
    assert profile.bandwidth_kbps == 1000.0 * (row + 1)


def test_more_clients_than_trace_rows_is_refused(small_trace: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="10 devices"):
        devices.profiles_from_trace(small_trace, 11, seed=0)


def test_a_missing_trace_raises_data_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(data.DataError) as caught:
        devices.assign_devices(3, seed=0, data_dir=tmp_path)

    assert "client_device_capacity.csv" in str(caught.value)
    assert "meshctl data fetch" in str(caught.value)


@pytest.mark.data
def test_the_real_trace_gives_profiles_in_its_documented_ranges(data_dir: Path) -> None:
    profiles = devices.assign_devices(100, seed=0, data_dir=data_dir)

    assert all(15 <= p.compute_ms_per_sample <= 199 for p in profiles)
    assert all(1000 <= p.bandwidth_kbps <= 205_000 for p in profiles)
