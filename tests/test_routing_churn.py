"""Routes change 200 times under training traffic and no request fails."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.envoy

_BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "routing_churn.py"


def _churn_module():
    """The churn harness lives with the benchmark that prints its numbers."""
    name = "benchmarks_routing_churn"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _BENCHMARK)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_200_routing_changes_under_training_traffic_fail_no_request(
    tmp_path: Path,
) -> None:
    churn = _churn_module()

    result = churn.run_churn(
        tmp_path, clients=6, per_round=3, changes=200, senders=2, pause_s=0.02
    )

    assert result.changes == 200
    assert result.requests >= result.changes
    assert result.failures == {}
    assert result.mesh_failure_stats == dict.fromkeys(churn.MESH_FAILURE_STATS, 0)
    # Every change re-pointed the routes: 201 VirtualService writes were served.
    assert len(result.served_ms["VirtualService"]) == 201
