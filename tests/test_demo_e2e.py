"""The main job end to end: real data, real Envoy, real client processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.envoy, pytest.mark.data]


def _meshctl(*args: str, env: dict | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "meshctl", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def _leftovers(work_dir: Path) -> list[str]:
    """Command lines of processes still running from ``work_dir``."""
    found = subprocess.run(
        ["pgrep", "-af", str(work_dir)], capture_output=True, text=True
    ).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def test_two_rounds_with_three_clients_are_routed_by_the_mesh(
    tmp_path: Path, data_dir: Path
) -> None:
    out_dir, work_dir = tmp_path / "out", tmp_path / "work"
    proc = _meshctl(
        "demo",
        "--clients=3",
        "--per-round=2",
        "--rounds=2",
        "--failing-clients=0",
        f"--out={out_dir}",
        f"--work-dir={work_dir}",
        env={"MESHCTL_DATA_DIR": str(data_dir)},
    )
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]

    report = json.loads((out_dir / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for entry in report["rounds"]:
        # Envoy's own counters: exactly the chosen clients served the round.
        assert sorted(entry["served_by"]) == sorted(entry["selected"])
        assert all(count == 1 for count in entry["served_by"].values())
        assert len(set(entry["selected"])) == 2
        assert entry["routing_version"].startswith(f"r{entry['round']}-") or (
            entry["round"] > 1
        )
        assert 0.0 <= entry["metrics"]["auroc"] <= 1.0
        assert entry["emulated_s"] > 0 and entry["wall_s"] > 0
        assert f"round {entry['round']}: routed" in stderr
    assert report["final"] == report["rounds"][-1]["metrics"]
    assert {"metric", "target", "emulated_s"} <= set(report["time_to_target"])
    for name in ("report.md", "metric_vs_time.png", "selection.png"):
        assert (out_dir / name).stat().st_size > 0
    assert "time to auroc" in stdout

    # What the controller wrote is what a cluster would take.
    assert (work_dir / "routing" / "virtualservice.yaml").exists()
    assert _leftovers(work_dir) == []


def test_ctrl_c_stops_every_process_the_demo_started(
    tmp_path: Path, data_dir: Path
) -> None:
    work_dir = tmp_path / "work"
    proc = _meshctl(
        "demo",
        "--clients=3",
        "--per-round=2",
        "--rounds=50",
        f"--work-dir={work_dir}",
        env={"MESHCTL_DATA_DIR": str(data_dir)},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(
        (work_dir / "routing").glob("virtualservice.yaml")
    ):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.5)
    assert _leftovers(work_dir), "the demo should be running by now"

    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)

    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert _leftovers(work_dir) == []


def test_missing_data_is_one_clear_message_before_anything_starts(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no-such-dir"
    proc = _meshctl(
        "demo",
        "--clients=3",
        "--per-round=2",
        "--rounds=1",
        env={"MESHCTL_DATA_DIR": str(missing)},
    )
    _, stderr = proc.communicate(timeout=120)

    assert proc.returncode == 3
    assert str(missing) in stderr
    assert "meshctl data fetch" in stderr
    assert "Traceback" not in stderr
