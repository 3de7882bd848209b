"""The scale benchmark's cycle: behaviour only (the timings are its own output).

A cycle over synthetic telemetry for N clients asks Prometheus a fixed number of
queries and routes K clients with objects whose size does not grow with N.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCALE_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale.py"


@pytest.fixture(scope="module")
def scale():
    """The benchmark module, loaded from its file."""
    spec = importlib.util.spec_from_file_location("scale_benchmark", SCALE_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _second_cycle(scale, n: int, schemas: dict):
    cycle = scale.Cycle(n, per_round=5, schemas=schemas)
    try:
        cycle.run()
        return cycle.run()
    finally:
        cycle.close()


def test_a_cycle_at_2000_clients_routes_k_with_objects_the_size_of_k(
    scale, istio_schemas
) -> None:
    small = _second_cycle(scale, 200, istio_schemas)
    large = _second_cycle(scale, 2000, istio_schemas)

    assert len(large.routed) == len(small.routed) == 5
    assert large.problems == small.problems == 0
    assert large.prometheus_requests == small.prometheus_requests == 8
    assert set(large.seconds) == set(scale.STAGES)
    # The routed objects hold K routes and subsets: same K, same size.
    assert large.object_bytes == small.object_bytes


def test_the_last_line_says_whether_the_production_cycle_met_one_second(
    scale,
) -> None:
    rows = [
        {"n": 1_000, "production_s": 0.05, "local_s": 0.06, "arm_s": 0.07},
        {"n": 100_000, "production_s": 0.8, "local_s": 4.0, "arm_s": 0.9},
    ]

    assert ": met (a whole controller arm" in scale.goal_line(rows)
    assert "written: 0.900 s; local Envoy path: 4.000 s)" in scale.goal_line(rows)
    rows[1]["production_s"] = 1.2
    assert "in 1.200 s, under 1 s: NOT met" in scale.goal_line(rows)
    assert "not measured" in scale.goal_line(rows[:1])


def test_the_production_and_local_cycles_sum_their_own_stages(scale) -> None:
    result = scale.CycleResult(seconds={s: 1.0 for s in scale.STAGES})
    result.seconds["prometheus"] = 10.0

    assert scale._cycle_s([result], scale.PRODUCTION) == 14.0  # no Envoy stage
    assert scale._cycle_s([result], scale.LOCAL) == 6.0  # no Prometheus
