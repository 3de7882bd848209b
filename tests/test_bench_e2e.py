"""The bench end to end, at its smallest: two policies, three clients, two rounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.envoy, pytest.mark.data]


def test_a_quick_bench_writes_its_json_table_and_plot(
    tmp_path: Path, data_dir: Path
) -> None:
    out_dir, work_dir = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshctl",
            "bench",
            "--quick",
            "--policies=random,mesh",
            "--scenario=static",
            "--clients=3",
            "--per-round=2",
            "--rounds=2",
            f"--out={out_dir}",
            f"--work-dir={work_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=280,
        env={**os.environ, "MESHCTL_DATA_DIR": str(data_dir)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    bench = json.loads((out_dir / "bench.json").read_text())
    assert list(bench) == ["scenarios"]
    static = bench["scenarios"]["static"]
    assert static["target"] == {"metric": "auroc", "value": 0.97}
    assert list(static["policies"]) == ["random", "mesh"]
    for entry in static["policies"].values():
        assert set(entry) == {"time_to_target_emulated_s", "final", "rounds", "wall_s"}
        ttt = entry["time_to_target_emulated_s"]
        assert ttt is None or ttt > 0
        assert set(entry["final"]) == {"auroc", "f1", "accuracy"}
        assert 0.0 <= entry["final"]["auroc"] <= 1.0
        assert entry["rounds"] == 2 and entry["wall_s"] > 0
    assert "| mesh |" in (out_dir / "bench.md").read_text()
    assert (out_dir / "static.png").stat().st_size > 0
    assert "| random |" in proc.stdout

    # Every process the bench started is gone.
    found = subprocess.run(
        ["pgrep", "-af", str(work_dir)], capture_output=True, text=True
    ).stdout
    assert [line for line in found.splitlines() if "pgrep" not in line] == []
