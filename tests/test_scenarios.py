"""Scenarios: who fails, slows down or joins late, in which round, by seed."""

from __future__ import annotations

import random

import pytest

from meshctl import scenarios
from meshctl.scenarios import ClientSchedule

# Twenty devices: client i computes at 10 * (i + 1) ms per sample, so the
# lower the index, the faster the device.
SPEEDS = [10.0 * (i + 1) for i in range(20)]


def _plans(name: str, seed: int = 0, rounds: int = 15, failing: int = 2):
    return scenarios.schedule(
        scenarios.get(name),
        ms_per_sample=SPEEDS,
        rounds=rounds,
        failing_clients=failing,
        fail_rate=0.5,
        seed=seed,
    )


def test_static_fails_the_same_seeded_clients_from_the_first_round() -> None:
    plans = _plans("static", seed=3)

    expected = set(random.Random(3).sample(range(20), 2))
    assert {p.index for p in plans if p.fail_rate} == expected
    for plan in plans:
        assert plan.present(1) and not plan.slow(15)
        assert plan.fail_rate_at(1) == (0.5 if plan.index in expected else 0.0)


def test_dynamic_keeps_the_static_failures_and_shifts_after_a_third() -> None:
    static, dynamic = _plans("static", seed=5), _plans("dynamic", seed=5)

    assert scenarios.DYNAMIC.shift_round(15) == 6
    for before, after in zip(static, dynamic, strict=True):
        if before.fail_rate:
            assert after == before
    assert all(p.fail_from_round in (1, 6) for p in dynamic)


def test_dynamic_turns_a_third_of_the_fast_clients_slow_or_failing() -> None:
    plans = _plans("dynamic", seed=1)
    late = [p for p in plans if p.join_round > 1]
    slow = [p for p in plans if p.slow_from_round is not None]
    failing_later = [p for p in plans if p.fail_from_round > 1]

    # 3 of 20 join late; of the 15 present and healthy clients, the fast 8
    # are candidates, and a third of them (3) change: two slow, one failing.
    assert len(late) == 3
    assert (len(slow), len(failing_later)) == (2, 1)
    failing_from_start = {p.index for p in plans if p.fail_rate_at(1)}
    healthy_present = [
        p.index
        for p in plans
        if p.join_round == 1 and p.index not in failing_from_start
    ]
    fast = set(healthy_present[:8])
    assert {p.index for p in slow + failing_later} <= fast


@pytest.mark.parametrize(
    ("plan", "server_round", "present", "slow", "fail_rate"),
    [
        (ClientSchedule(0, join_round=6), 5, False, False, 0.0),
        (ClientSchedule(0, join_round=6), 6, True, False, 0.0),
        (ClientSchedule(0, slow_factor=4.0, slow_from_round=6), 5, True, False, 0.0),
        (ClientSchedule(0, slow_factor=4.0, slow_from_round=6), 6, True, True, 0.0),
        (ClientSchedule(0, fail_rate=0.8, fail_from_round=6), 5, True, False, 0.0),
        (ClientSchedule(0, fail_rate=0.8, fail_from_round=6), 9, True, False, 0.8),
        (ClientSchedule(0, fail_rate=0.5), 1, True, False, 0.5),
    ],
    ids=[
        "late-before",
        "late-from",
        "slow-before",
        "slow-from",
        "failing-before",
        "failing-after",
        "failing-always",
    ],
)
def test_a_schedule_says_what_the_client_does_in_each_round(
    plan: ClientSchedule, server_round: int, present: bool, slow: bool, fail_rate: float
) -> None:
    assert plan.present(server_round) is present
    assert plan.slow(server_round) is slow
    assert plan.fail_rate_at(server_round) == fail_rate


def test_the_schedule_reaches_the_client_through_its_node_config() -> None:
    assert ClientSchedule(0).node_config() == {"fail-rate": 0.0}
    assert ClientSchedule(0, slow_factor=4.0, slow_from_round=6).node_config() == {
        "fail-rate": 0.0,
        "slow-from-round": 6,
        "slow-factor": 4.0,
    }
    assert ClientSchedule(0, fail_rate=0.8, fail_from_round=6).node_config() == {
        "fail-rate": 0.8,
        "fail-from-round": 6,
    }


def test_the_same_seed_gives_the_same_schedule_and_another_seed_another() -> None:
    assert _plans("dynamic", seed=7) == _plans("dynamic", seed=7)
    assert any(_plans("dynamic", seed=s) != _plans("dynamic", seed=7) for s in (8, 9))


def test_a_short_run_still_shifts_after_its_first_round() -> None:
    assert scenarios.DYNAMIC.shift_round(2) == 2
    assert scenarios.STATIC.shift_round(15) is None


def test_describe_names_each_changed_client_once() -> None:
    plans = _plans("dynamic", seed=1)
    lines = scenarios.describe(plans)

    changed = [p for p in plans if p != ClientSchedule(p.index)]
    assert len(lines) == len(changed)
    assert any("joins in round 6" in line for line in lines)
    assert any("4x slower from round 6" in line for line in lines)


def test_an_unknown_scenario_names_the_valid_ones() -> None:
    with pytest.raises(scenarios.UnknownScenario, match="static, dynamic"):
        scenarios.get("chaos")


def test_the_client_app_applies_a_schedule_from_its_round() -> None:
    client_app = pytest.importorskip("fl_app.client_app")

    node = {"slow-from-round": 6}
    assert not client_app._from_round(node, "slow-from-round", 5)
    assert client_app._from_round(node, "slow-from-round", 6)
    assert not client_app._from_round({}, "slow-from-round", 99)
    assert client_app._from_round({}, "fail-from-round", 1, default=0)
