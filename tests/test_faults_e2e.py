"""Faults through the demo: real client processes, a real Envoy, real data.

One run carries a fault in almost every round, each in a round of its own, and
the tests read its report, its logs and the files it wrote.  Every client is
asked for in every round, so that a client left out of a round was left out
because it was not ready, and never by the policy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CLIENTS = 5
ROUNDS = 7
FAULTS = {
    1: "crash:c-02@1",
    2: "nan:c-01@2",
    3: "shape:c-03@3",
    4: "envoy-restart@4",
    5: "controller-restart@5",
    6: "oversized:c-04@6",
}


def _meshctl(
    *args: str, env: dict | None = None, **kwargs
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "meshctl", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "500", **(env or {})},
        **kwargs,
    )


class Run:
    def __init__(self, report: dict, stderr: str, work_dir: Path) -> None:
        self.report = report
        self.stderr = stderr
        self.work_dir = work_dir
        self.rounds = {r["round"]: r for r in report["rounds"]}


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Run:
    base = tmp_path_factory.mktemp("faults")
    out_dir, work_dir = base / "out", base / "work"
    # The deadline (12 s of wall time) lets the slowest device (about 2,900
    # emulated s) finish, so only the faults fail slots; a restart comes half
    # a second into its round, while every client trains.
    done = _meshctl(
        "demo",
        f"--clients={CLIENTS}",
        f"--per-round={CLIENTS}",
        f"--rounds={ROUNDS}",
        "--policy=random",
        "--time-scale=0.002",
        "--deadline-s=6000",
        "--failing-clients=0",
        f"--faults={','.join(FAULTS.values())}",
        f"--out={out_dir}",
        f"--work-dir={work_dir}",
        env={"MESHCTL_DATA_DIR": str(data_dir)},
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out_dir / "report.json").read_text())
    return Run(report, done.stderr, work_dir)


def _client_log(run: Run, client: str) -> str:
    return (run.work_dir / "logs" / f"{client}.log").read_text()


@pytest.mark.slow
@pytest.mark.envoy
@pytest.mark.data
class TestFaultsThroughTheDemo:
    def test_every_round_finishes_with_a_model(self, faulty_run: Run) -> None:
        assert sorted(faulty_run.rounds) == list(range(1, ROUNDS + 1))
        for entry in faulty_run.rounds.values():
            assert 0.0 <= entry["metrics"]["auroc"] <= 1.0
        events = faulty_run.report["faults"]["events"]
        assert {e["round"] for e in events} == set(FAULTS)
        assert not any("FAILED" in e["what"] for e in events)

    def test_a_bad_reply_is_refused_with_its_reason_and_the_round_goes_on(
        self, faulty_run: Run
    ) -> None:
        expected = {
            2: ("c-01", "holds NaN or infinite values"),
            3: ("c-03", "expected float32"),
            6: ("c-04", "exceeds"),
        }
        for server_round, (client, reason) in expected.items():
            entry = faulty_run.rounds[server_round]
            assert list(entry["failed"]) == [client], entry["failed"]
            assert reason in entry["failed"][client]
            # The others' updates made the round: they were all served.
            assert sorted(entry["served_by"]) == sorted(entry["selected"])
            assert f"round {server_round} slot" in faulty_run.stderr
        assert "the reply of round 6 is spoilt (oversized)" in _client_log(
            faulty_run, "c-04"
        )

    def test_a_crashed_client_is_unrouted_then_taken_back_when_healthy(
        self, faulty_run: Run
    ) -> None:
        crashed = faulty_run.rounds[1]
        assert "c-02" in crashed["selected"]
        assert list(crashed["failed"]) == ["c-02"]  # the round ends with the others
        assert "crashing in the middle of round 1" in _client_log(faulty_run, "c-02")
        # The next cycle routes it no more: it is not ready.
        assert "c-02" not in faulty_run.rounds[2]["selected"]
        assert len(faulty_run.rounds[2]["selected"]) == CLIENTS - 1
        # Restarted after round 2, it is taken back once it answers its probe,
        # and serves (round 4 loses its counters with the Envoy it restarts).
        back = [
            r
            for r in range(3, ROUNDS + 1)
            if "c-02" in faulty_run.rounds[r]["selected"]
        ]
        assert back, "c-02 never came back"
        assert any("c-02" in faulty_run.rounds[r]["served_by"] for r in back if r != 4)

    def test_envoy_comes_back_with_the_routes_and_training_goes_on(
        self, faulty_run: Run
    ) -> None:
        log = (faulty_run.work_dir / "envoy" / "envoy.log").read_text()
        assert log.count("starting main dispatch loop") >= 2  # two Envoy processes
        # Envoy died under the round's requests: they were lost by the mesh,
        # which is not the clients' failure.
        failed = faulty_run.rounds[4]["failed"]
        assert failed and all(why.startswith("lost: ") for why in failed.values())
        for server_round in range(5, ROUNDS + 1):
            entry = faulty_run.rounds[server_round]
            assert sorted(entry["served_by"]) == sorted(entry["selected"])
        # That the new Envoy starts from the routing directory's files is
        # tested in test_envoy_mesh; here, the restart fell in round 4.
        event = next(
            e for e in faulty_run.report["faults"]["events"] if e["round"] == 4
        )
        assert "Envoy restarted" in event["what"]

    def test_a_restarted_controller_takes_over_without_a_routing_gap(
        self, faulty_run: Run
    ) -> None:
        assert faulty_run.report["faults"]["controller_restarts"] == 1
        entry = faulty_run.rounds[5]
        # The routes stayed in place through the restart: every slot was served.
        assert entry["failed"] == {}
        assert sorted(entry["served_by"]) == sorted(entry["selected"])
        # The new controller put round 5's outcomes under the right clients.
        state = json.loads(
            (faulty_run.work_dir / "controller" / "state.json").read_text()
        )
        assert set(entry["selected"]) <= _clients_with_feedback(state, 5)
        vs = yaml.safe_load(
            (faulty_run.work_dir / "routing" / "virtualservice.yaml").read_text()
        )
        assert vs["metadata"]["annotations"]


def _clients_with_feedback(state: dict, server_round: int) -> set[str]:
    return {
        client
        for client, items in state["history"].items()
        if any(item["server_round"] == server_round for item in items)
    }


# --------------------------------------------------- errors before anything starts


def _nothing_started(work_dir: Path) -> bool:
    return not (work_dir / "logs").exists() and not (work_dir / "envoy").exists()


@pytest.mark.data
def test_an_unreadable_data_directory_stops_the_demo_before_it_starts(
    tmp_path: Path, data_dir: Path
) -> None:
    # The data directory's layout, one of its directories closed to its owner.
    unreadable = tmp_path / "data"
    unreadable.mkdir()
    for entry in data_dir.iterdir():
        (unreadable / entry.name).symlink_to(entry)
    closed = unreadable / "ton_iot_network"
    closed.unlink()
    closed.mkdir()
    for entry in (data_dir / "ton_iot_network").iterdir():
        (closed / entry.name).symlink_to(entry)
    closed.chmod(0)
    work_dir = tmp_path / "work"
    done = _meshctl(
        "demo",
        "--clients=3",
        "--per-round=2",
        "--rounds=1",
        f"--work-dir={work_dir}",
        env={"MESHCTL_DATA_DIR": str(unreadable)},
        timeout=120,
        preexec_fn=_without_root_file_access,
    )
    assert done.returncode == 3, done.stderr
    assert "cannot read data file" in done.stderr
    assert "ton_iot_network" in done.stderr
    assert _nothing_started(work_dir)


def _without_root_file_access() -> None:
    """In the child: root loses its right to read and search whatever it likes.

    Dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set
    makes the permission bits bind the command that is executed next, as they
    bind any other user.
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0)


_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE = 1
_CAP_DAC_READ_SEARCH = 2


def test_a_broken_policy_file_stops_the_demo_before_it_starts(tmp_path: Path) -> None:
    policy = tmp_path / "broken.yaml"
    policy.write_text(
        "apiVersion: meshctl.io/v1alpha1\nkind: SelectionPolicy\n"
        "metadata: {name: broken}\nspec:\n  algorithm: mesh\n  clientsPerRound: -3\n"
    )
    work_dir = tmp_path / "work"
    done = _meshctl("demo", f"--policy={policy}", f"--work-dir={work_dir}", timeout=60)
    assert done.returncode == 4, done.stderr
    assert f"{policy}:" in done.stderr and "clientsPerRound" in done.stderr
    assert _nothing_started(work_dir)


def test_a_bad_fault_spec_stops_the_demo_before_it_starts(tmp_path: Path) -> None:
    work_dir = tmp_path / "work"
    done = _meshctl(
        "demo",
        "--clients=6",
        "--faults=crash:c-07@2",
        f"--work-dir={work_dir}",
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "--faults item 'crash:c-07@2': no client 'c-07'" in done.stderr
    assert _nothing_started(work_dir)
