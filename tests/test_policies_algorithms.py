"""Oort, PyramidFL and power-of-choice against values worked out by hand."""

from __future__ import annotations

import math
import random

import pytest

from meshctl.policies.base import SelectionInput
from meshctl.policies.oort import OortPolicy, OortSettings
from meshctl.policies.powerofchoice import (
    PowerOfChoicePolicy,
    PowerOfChoiceSettings,
)
from meshctl.policies.pyramidfl import AdaptationSettings, PyramidFLPolicy
from meshctl.types import ClientFeedback, SlotOutcome

CLIENTS = [f"c-{i:02d}" for i in range(10)]
EXPLOIT_ONLY = OortSettings(exploration=0.0, exploration_min=0.0, overcommit=1.0)


def _fed(
    client: str,
    server_round: int = 1,
    *,
    examples: int = 100,
    loss: float | None = 0.5,
    seconds: float | None = 10.0,
    status: str = "ok",
) -> ClientFeedback:
    outcome = SlotOutcome(
        server_round=server_round,
        slot=1,
        status=status,
        duration_s=1.0,
        num_examples=examples if status == "ok" else 0,
        train_loss=loss if status == "ok" else None,
        emulated_s=seconds if status == "ok" else None,
    )
    return ClientFeedback(client=client, outcome=outcome)


# Three played clients: rewards |B| * |loss| of 50, 20 and 10; 10, 20 and 40 s.
HISTORY = {
    "a": [_fed("a", loss=0.5, seconds=10.0)],
    "b": [_fed("b", loss=0.2, seconds=20.0)],
    "c": [_fed("c", loss=0.1, seconds=40.0)],
}


def _given(server_round=2, candidates=("a", "b", "c"), per_round=3, history=HISTORY):
    return SelectionInput(
        server_round=server_round,
        candidates=list(candidates),
        per_round=per_round,
        history=history,
    )


# -- oort -------------------------------------------------------------------


def test_oort_utility_is_clipped_reward_plus_staleness_times_the_deadline_penalty():
    policy = OortPolicy(EXPLOIT_ONLY)

    scores = policy.select(_given(), random.Random(0)).scores

    # Worked by hand.  Rewards sorted [10, 20, 50]; the clip is the value at
    # index int(3 * 0.9) = 2, i.e. 50; min = 10 * 0.999 = 9.99, range 40.01.
    # Staleness: sqrt(0.1 * ln 2 / 1) = 0.263277.  T: durations [10, 20, 40],
    # index int(3 * 30 / 100) = 0, i.e. T = 10 s, so b and c pay (10/t)^2.
    staleness = math.sqrt(0.1 * math.log(2) / 1)
    assert staleness == pytest.approx(0.263277, abs=1e-6)
    assert scores["a"] == pytest.approx(1.0 + staleness)
    assert scores["b"] == pytest.approx((10.01 / 40.01 + staleness) * 0.25)
    assert scores["c"] == pytest.approx((0.01 / 40.01 + staleness) * 0.0625)
    assert policy.preferred_duration_s() == 10.0


def test_oort_samples_only_above_the_cut_off_and_in_proportion_to_utility():
    counts = {"a": 0, "b": 0, "c": 0}
    for seed in range(300):
        policy = OortPolicy(EXPLOIT_ONLY)
        [chosen] = policy.select(_given(per_round=1), random.Random(seed)).clients
        counts[chosen] += 1

    # Cut-off: 0.95 * the utility ranked second (b, 0.12837) = 0.12195, so c
    # (0.01647) never qualifies; a is drawn with 1.26328 / (1.26328 + 0.12837).
    assert counts["c"] == 0
    assert counts["a"] / 300 == pytest.approx(1.26328 / 1.39165, abs=0.05)


def test_oort_over_commits_by_a_factor_of_1_3_rounded_up() -> None:
    policy = OortPolicy()
    given = SelectionInput(server_round=1, candidates=CLIENTS, per_round=5)

    selection = policy.select(given, random.Random(0))

    assert len(selection.clients) == 7  # ceil(5 * 1.3)
    assert len(set(selection.clients)) == 7
    assert all(r.startswith("explore") for r in selection.reasons.values())


def test_oort_exploration_decays_by_0_98_a_round_down_to_0_3() -> None:
    policy = OortPolicy()
    given = SelectionInput(server_round=1, candidates=CLIENTS, per_round=2)

    policy.select(given, random.Random(0))
    assert policy.exploration == pytest.approx(0.9 * 0.98)
    for _ in range(99):
        policy.select(given, random.Random(0))
    assert policy.exploration == pytest.approx(0.3)  # 0.9 * 0.98 ** 100 < 0.3


def test_oort_explores_and_exploits_by_epsilon() -> None:
    settings = OortSettings(exploration=0.5 / 0.98, overcommit=1.0)
    history = {c: [_fed(c, loss=0.3)] for c in CLIENTS[:5]}
    given = SelectionInput(
        server_round=2, candidates=CLIENTS, per_round=4, history=history
    )

    reasons = OortPolicy(settings).select(given, random.Random(0)).reasons

    # epsilon = 0.5 after this round's decay: int(4 * 0.5) = 2 of each.
    explored = [c for c, r in reasons.items() if r.startswith("explore")]
    assert sorted(explored) == sorted(set(explored) & set(CLIENTS[5:]))
    assert len(explored) == 2 and len(reasons) == 4


def test_the_pacer_relaxes_t_when_exploited_utility_stays_flat() -> None:
    policy = OortPolicy(OortSettings(pacer_step=2, pacer_delta=5.0))
    for server_round in (1, 2, 3):
        policy.select(_given(server_round=server_round, history={}), random.Random(0))
    assert policy.round_threshold == 30.0

    # Round 4 = 2 * step and a multiple of it: flat utility (0 == 0) relaxes T.
    policy.select(_given(server_round=4, history={}), random.Random(0))
    assert policy.round_threshold == 35.0


def test_a_failed_round_earns_no_statistical_utility_only_staleness() -> None:
    history = dict(HISTORY)
    history["c"] = [_fed("c", status="error")]
    policy = OortPolicy(EXPLOIT_ONLY)

    scores = policy.select(_given(history=history), random.Random(0)).scores

    # c's reward is 0; its duration stays unknown, so no deadline penalty.
    assert scores["c"] == pytest.approx(math.sqrt(0.1 * math.log(2)))


@pytest.mark.parametrize("policy_class", [OortPolicy, PyramidFLPolicy])
def test_oort_holds_nothing_against_a_client_whose_request_the_mesh_lost(
    policy_class,
) -> None:
    lost, untouched = policy_class(EXPLOIT_ONLY), policy_class(EXPLOIT_ONLY)
    for policy in (lost, untouched):
        policy.select(_given(), random.Random(0))
    history = {c: list(f) for c, f in HISTORY.items()}
    history["a"].append(_fed("a", server_round=2, status="lost"))

    after_loss = lost.select(_given(server_round=3, history=history), random.Random(0))
    sat_out = untouched.select(_given(server_round=3), random.Random(0))

    # Envoy went away under a's request: a keeps its reward, as if it sat out.
    assert after_loss.scores == pytest.approx(sat_out.scores)
    assert lost.arms["a"] == untouched.arms["a"]


# -- pyramidfl --------------------------------------------------------------


def test_pyramidfl_gives_faster_clients_steps_in_proportion_to_their_slack():
    policy = PyramidFLPolicy(EXPLOIT_ONLY)

    selection = policy.select(_given(), random.Random(0))

    # Straggler: c at 40 s.  a: 1 + (40 - 10) / 10 = 4;  b: 1 + (40 - 20) / 20 = 2.
    assert selection.client_config == {
        "a": {"local-steps-factor": 4.0},
        "b": {"local-steps-factor": 2.0},
    }


def test_pyramidfl_caps_the_extra_work_and_scales_it_by_beta() -> None:
    policy = PyramidFLPolicy(
        EXPLOIT_ONLY, AdaptationSettings(beta=0.5, max_extra_factor=1.0)
    )

    factors = policy.select(_given(), random.Random(0)).client_config

    # a: 1 + min(1, 0.5 * 3) = 2;  b: 1 + min(1, 0.5 * 1) = 1.5.
    assert factors["a"]["local-steps-factor"] == pytest.approx(2.0)
    assert factors["b"]["local-steps-factor"] == pytest.approx(1.5)


def test_pyramidfl_measures_durations_at_the_base_amount_of_work() -> None:
    policy = PyramidFLPolicy(EXPLOIT_ONLY)
    policy.select(_given(), random.Random(0))  # a trains 4 times the steps
    history = {c: list(f) for c, f in HISTORY.items()}
    history["a"].append(_fed("a", server_round=2, seconds=40.0))

    policy.select(_given(server_round=3, history=history), random.Random(0))

    assert policy.arms["a"].duration_s == pytest.approx(10.0)  # 40 s / 4


# -- power-of-choice ----------------------------------------------------------


def test_power_of_choice_keeps_the_k_highest_losses_among_the_candidates() -> None:
    losses = {"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.7}
    history = {c: [_fed(c, loss=loss)] for c, loss in losses.items()}
    policy = PowerOfChoicePolicy(PowerOfChoiceSettings(d=4))

    chosen = policy.select(
        _given(candidates=losses, per_round=2, history=history), random.Random(3)
    ).clients

    assert chosen == ("b", "d")


def test_power_of_choice_ranks_a_client_with_no_reported_loss_first() -> None:
    history = {c: [_fed(c, loss=0.9)] for c in ("a", "b")}
    policy = PowerOfChoicePolicy(PowerOfChoiceSettings(d=3))

    chosen = policy.select(
        _given(candidates=("a", "b", "c"), per_round=1, history=history),
        random.Random(0),
    ).clients

    assert chosen == ("c",)


def test_power_of_choice_draws_candidates_in_proportion_to_data_size() -> None:
    history = {
        "big": [_fed("big", examples=900, loss=0.1)],
        "small": [_fed("small", examples=100, loss=0.1)],
    }
    policy = PowerOfChoicePolicy(PowerOfChoiceSettings(d=1))
    given = _given(candidates=("big", "small"), per_round=1, history=history)

    big = sum(
        policy.select(given, random.Random(seed)).clients == ("big",)
        for seed in range(400)
    )

    assert big / 400 == pytest.approx(0.9, abs=0.05)


@pytest.mark.parametrize(
    ("d", "d_factor", "k", "ready", "expected"),
    [
        pytest.param(None, 2.0, 3, 10, 6, id="twice-k"),
        pytest.param(None, 2.0, 3, 4, 4, id="capped-at-ready"),
        pytest.param(5, 2.0, 3, 10, 5, id="fixed-d"),
        pytest.param(2, 2.0, 3, 10, 3, id="never-under-k"),
    ],
)
def test_power_of_choice_candidate_count(d, d_factor, k, ready, expected) -> None:
    policy = PowerOfChoicePolicy(PowerOfChoiceSettings(d=d, d_factor=d_factor))
    assert policy.candidate_count(k, ready) == expected
