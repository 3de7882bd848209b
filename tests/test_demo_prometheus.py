"""The demo on the production PromQL: a real Prometheus scrapes the local mesh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from meshctl import cli
from meshctl.exitcodes import ExitCode
from meshctl.telemetry import localprom
from meshctl.types import Workload
from tests import prometheus_support as ps


def _leftovers(work_dir: Path) -> list[str]:
    """Command lines of processes still running from ``work_dir``."""
    found = subprocess.run(
        ["pgrep", "-af", str(work_dir)], capture_output=True, text=True
    ).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def test_telemetry_prometheus_without_the_binary_names_the_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))

    result = CliRunner().invoke(cli.app, ["demo", "--telemetry", "prometheus"])

    assert result.exit_code == ExitCode.USAGE
    assert "apt-get install --no-install-recommends prometheus" in result.output


def test_the_demo_prometheus_config_and_its_target_files_pass_promtool(
    tmp_path: Path,
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(ps.skip_message())
    targets = tmp_path / "targets"
    localprom.write_targets(
        targets,
        envoy_admin="127.0.0.1:9901",
        workloads=[Workload("c-00", "127.0.0.1", 8000, {})],
        controller="127.0.0.1:9000",
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(localprom.file_sd_config(targets)))

    checked = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    groups = json.loads((targets / "fl-clients.json").read_text())
    assert groups == [
        {"targets": ["127.0.0.1:8000"], "labels": {"pod": "c-00", "namespace": "fl"}}
    ]
    assert not list(targets.glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.envoy
@pytest.mark.data
def test_the_controller_reads_the_demo_from_a_local_prometheus(
    tmp_path: Path, data_dir: Path
) -> None:
    if ps.find_prometheus() is None:
        pytest.skip(ps.skip_message())
    out_dir, work_dir = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshctl",
            "demo",
            "--clients=3",
            "--per-round=2",
            "--rounds=3",
            "--failing-clients=0",
            "--telemetry=prometheus",
            f"--out={out_dir}",
            f"--work-dir={work_dir}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MESHCTL_DATA_DIR": str(data_dir)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "telemetry: production PromQL from Prometheus at" in proc.stderr

    report = json.loads((out_dir / "report.json").read_text())
    telemetry = report["telemetry"]
    assert telemetry["source"] == "prometheus"
    assert telemetry["prometheus_url"].startswith("http://127.0.0.1:")
    by_round = {
        t["round"]: {c["client"]: c for c in t["clients"]} for t in telemetry["rounds"]
    }
    assert sorted(by_round) == [1, 2, 3]

    # Nothing has trained before round 1: no figure at all, not a zero.
    assert all(c["state"] == "unobserved" for c in by_round[1].values())
    assert all(c["train_loss"] is None for c in by_round[1].values())

    # A counter's first sample is its baseline, so a client is observed from its
    # second served round; with 2 of 3 clients per round one serves rounds 1
    # and 2, and round 3 sees its rate, latency and loss through PromQL.
    served = [set(r["served_by"]) for r in report["rounds"]]
    observed = {c: t for c, t in by_round[3].items() if t["state"] == "observed"}
    assert observed
    assert set(observed) <= served[0] | served[1]
    for figures in observed.values():
        assert figures["requests_per_s"] > 0
        assert figures["error_ratio"] == 0.0
        assert figures["latency_p95_ms"] > 0
        assert figures["train_loss"] is not None
    for rows in by_round.values():
        for figures in rows.values():
            if figures["state"] == "unobserved":
                assert figures["requests_per_s"] is None
                assert figures["error_ratio"] is None

    # The demo's Prometheus read its targets from files and stopped with it.
    targets = work_dir / "prometheus" / "targets"
    assert sorted(p.name for p in targets.glob("*.json")) == [
        "envoy.json",
        "fl-clients.json",
        "meshctl-controller.json",
    ]
    assert _leftovers(work_dir) == []
