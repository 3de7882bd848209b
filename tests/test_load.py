"""The load benchmark's checks: fifty client services, nothing lost, and the
checks themselves caught out by a client that drops its update.

The harness lives in ``benchmarks/load.py``; its timings are its own output.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def load():
    """The benchmark module, loaded from its file beside its ClientApp."""
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        "load_benchmark", BENCHMARKS / "load.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        sys.path.remove(str(BENCHMARKS))


CLIENTS = [f"c-{i:02d}" for i in range(4)]
EXPECTED = {"c-00": 1, "c-01": 3, "c-03": 4}  # c-02 not expected


def _delta(weights: dict[str, float]) -> np.ndarray:
    return np.array([weights.get(c, 0.0) for c in CLIENTS])


@pytest.mark.parametrize(
    ("weights", "problem"),
    [
        pytest.param({"c-00": 1 / 8, "c-03": 4 / 8}, "c-01: update missing", id="lost"),
        pytest.param(
            {"c-00": 2 / 8, "c-01": 3 / 8, "c-03": 4 / 8},
            "c-00: aggregate weight",
            id="counted-twice",
        ),
        pytest.param(
            {"c-00": 1 / 8, "c-01": 3 / 8, "c-02": 0.1, "c-03": 4 / 8},
            "c-02: update in the aggregate but not expected",
            id="foreign",
        ),
    ],
)
def test_the_aggregate_check_flags_a_tampered_ledger(load, weights, problem) -> None:
    found, lost, problems = load.check_aggregate(_delta(weights), CLIENTS, EXPECTED)

    assert len(problems) == 1 and problems[0].startswith(problem)
    assert lost == (["c-01"] if "missing" in problem else [])


def test_the_aggregate_check_accepts_the_exact_fedavg_weights(load) -> None:
    delta = _delta({c: n / 8 for c, n in EXPECTED.items()})

    found, lost, problems = load.check_aggregate(delta, CLIENTS, EXPECTED)

    assert (found, lost, problems) == (sorted(EXPECTED), [], [])


def _client_processes(load) -> int:
    return load.client_memory_kib(os.getpid())["processes"]


@pytest.mark.slow
@pytest.mark.envoy
def test_fifty_client_services_lose_no_update_over_ten_rounds(
    load, tmp_path: Path
) -> None:
    settings = load.LoadSettings(
        clients=50, per_round=10, rounds=10, failing=load.spread_clients(50, 2)
    )

    result = load.run(settings, tmp_path)

    assert result.problems() == []
    assert result.lost_updates == 0 and result.unexpected_failures == 0
    assert [r.server_round for r in result.rounds] == list(range(1, 11))
    for check in result.rounds:
        selected = set(check.selected)
        assert len(selected) == 10
        # Envoy served each selected client once, bar ejected failing ones.
        assert set(check.served_by) | set(check.ejected) == selected
        assert set(check.served_by.values()) <= {1}
        # The global model holds exactly the updates of the sound clients.
        assert set(check.aggregated) == selected - set(settings.failing)
        assert set(check.planted_failures) == selected & set(settings.failing)
    assert result.sent == 100 and result.memory_kib["processes"] == 50
    assert result.envoy_counters == result.expected_counters()
    assert _client_processes(load) == 0


@pytest.mark.slow
@pytest.mark.envoy
def test_the_checks_catch_a_dropped_update_and_a_failure_nobody_planted(
    load, tmp_path: Path
) -> None:
    # Every round selects all four: c-01 silently drops its contribution,
    # c-02 fails without the checks being told, c-03 fails as planted.
    settings = load.LoadSettings(
        clients=4,
        per_round=4,
        rounds=2,
        failing=("c-03",),
        node_config={"c-01": {"drop": True}, "c-02": {"fail": True}},
    )

    result = load.run(settings, tmp_path)

    assert not result.ok
    for check in result.rounds:
        assert check.lost == ("c-01", "c-02")
        assert check.unexpected_failures == ("c-02",)
        assert check.planted_failures == ("c-03",)
        assert check.aggregated == ("c-00",)
    assert result.lost_updates == 4
    assert any("downstream_5xx=4, expected 2" in p for p in result.mesh_problems)
    assert _client_processes(load) == 0
