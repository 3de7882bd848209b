"""Selection policies: what each one chooses, given what it is told."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from meshctl import policies, table
from meshctl.policies.base import SelectionInput
from meshctl.policies.meshaware import MeshPolicy, MeshSettings
from meshctl.table import TelemetryTable
from meshctl.types import ClientFeedback, ClientState, ClientTelemetry, SlotOutcome

CLIENTS = [f"c-{i:02d}" for i in range(10)]
# Oort's staleness bonus in round 2 for a client last chosen in round 1 or never:
# sqrt(0.1 * ln 2 / 1) = 0.2633.
STALE_2 = math.sqrt(0.1 * math.log(2))


def _observed(
    client: str, p95_ms: float, errors: float = 0.0, ejections: int | None = None
) -> ClientTelemetry:
    state = ClientState.FAILING if errors >= 0.5 else ClientState.OBSERVED
    return ClientTelemetry(
        client=client,
        state=state,
        requests=10,
        requests_per_s=1.0,
        error_ratio=errors,
        latency_p50_ms=p95_ms / 2,
        latency_p95_ms=p95_ms,
        ejections=ejections,
    )


def test_random_chooses_k_distinct_ready_clients() -> None:
    policy = policies.create("random")
    given = SelectionInput(server_round=1, candidates=CLIENTS[:6], per_round=4)

    chosen = policy.select(given, random.Random(0)).clients

    assert len(chosen) == 4 and len(set(chosen)) == 4
    assert set(chosen) <= set(CLIENTS[:6])


def test_random_is_reproducible_with_a_seed() -> None:
    given = SelectionInput(server_round=1, candidates=CLIENTS, per_round=3)
    first = policies.create("random").select(given, random.Random(7)).clients
    again = policies.create("random").select(given, random.Random(7)).clients
    assert first == again


def test_an_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(policies.UnknownPolicy, match="mesh, oort, power-of-choice"):
        policies.create("oracle")


def test_mesh_prefers_fast_reliable_clients_over_slow_and_failing_ones() -> None:
    telemetry = {c: _observed(c, 1000.0) for c in CLIENTS}
    telemetry["c-01"] = _observed("c-01", 8000.0)  # slow
    telemetry["c-02"] = _observed("c-02", 1000.0, errors=0.6)  # failing
    policy = MeshPolicy(MeshSettings(exploration=0.0))
    given = SelectionInput(
        server_round=2, candidates=CLIENTS, per_round=8, telemetry=telemetry
    )

    selection = policy.select(given, random.Random(0))

    assert "c-01" not in selection.clients
    assert "c-02" not in selection.clients
    # Worked by hand: the expected straggler of 8 is the 8/9 quantile of nine
    # 1000s and one 8000, 1000 ms: speed (1000/8000)^2 = 1/64; reliability
    # (1-0.6)^2 = 0.16; utility unknown (1) plus the round-2 staleness bonus.
    assert selection.scores["c-01"] == pytest.approx((1 + STALE_2) / 64)
    assert selection.scores["c-02"] == pytest.approx((1 + STALE_2) * 0.16)
    assert selection.scores["c-00"] == pytest.approx(1 + STALE_2)


def test_mesh_explores_clients_it_never_measured() -> None:
    telemetry = {c: _observed(c, 1000.0) for c in CLIENTS[:5]}
    policy = MeshPolicy(MeshSettings(exploration=0.25))
    given = SelectionInput(
        server_round=2, candidates=CLIENTS, per_round=4, telemetry=telemetry
    )

    selection = policy.select(given, random.Random(0))

    explored = [c for c in selection.clients if c in CLIENTS[5:]]
    assert len(explored) == 1
    assert selection.reasons[explored[0]].startswith("explore")


def test_a_window_without_traffic_changes_no_estimate() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0))
    slow = {c: _observed(c, 1000.0) for c in CLIENTS}
    slow["c-03"] = _observed("c-03", 9000.0)
    policy.select(
        SelectionInput(server_round=1, candidates=CLIENTS, per_round=3, telemetry=slow),
        random.Random(0),
    )
    unobserved = {
        c: ClientTelemetry(client=c, state=ClientState.UNOBSERVED) for c in CLIENTS
    }

    selection = policy.select(
        SelectionInput(
            server_round=2, candidates=CLIENTS, per_round=3, telemetry=unobserved
        ),
        random.Random(0),
    )

    # Still slow: no data is not zero, and the old estimate stands.
    assert selection.scores["c-03"] == pytest.approx((1 + STALE_2) / 81)


def test_mesh_weighs_statistical_utility_from_feedback() -> None:
    telemetry = {c: _observed(c, 1000.0) for c in CLIENTS[:2]}
    history = {
        "c-00": [_feedback("c-00", examples=100, loss=0.2)],
        "c-01": [_feedback("c-01", examples=100, loss=0.1)],
    }
    policy = MeshPolicy(MeshSettings(exploration=0.0))
    given = SelectionInput(
        server_round=2,
        candidates=CLIENTS[:2],
        per_round=1,
        telemetry=telemetry,
        history=history,
    )

    selection = policy.select(given, random.Random(0))

    assert selection.clients == ("c-00",)
    assert selection.scores["c-01"] == pytest.approx(0.5 + STALE_2)


def _feedback(
    client: str, *, examples: int, loss: float, server_round: int = 1, status="ok"
) -> ClientFeedback:
    outcome = SlotOutcome(
        server_round=server_round,
        slot=1,
        status=status,
        duration_s=1.0,
        num_examples=examples,
        train_loss=loss,
    )
    return ClientFeedback(client=client, outcome=outcome)


def _round(policy, server_round, telemetry, per_round=1, candidates=None, seed=0):
    given = SelectionInput(
        server_round=server_round,
        candidates=candidates or sorted(telemetry),
        per_round=per_round,
        telemetry=telemetry,
    )
    return policy.select(given, random.Random(seed))


def test_mesh_scores_the_forecast_so_a_rising_latency_costs_before_it_averages():
    policy = MeshPolicy(MeshSettings(exploration=0.0, hysteresis=0.0))
    first = {"x": _observed("x", 100.0), "y": _observed("y", 150.0)}
    first["z"] = _observed("z", 100.0)
    _round(policy, 1, first)

    rising = dict(first, z=_observed("z", 200.0))
    selection = _round(policy, 2, rising)

    # Holt, level 0.5, trend 0.3: z's level 0.5 * 200 + 0.5 * 100 = 150, trend
    # 0.3 * (150 - 100) = 15, forecast 165.  The expected straggler of one
    # client is the 1/2 quantile: median(100, 150, 165) = 150.
    assert selection.scores["z"] == pytest.approx((1 + STALE_2) * (150 / 165) ** 2)
    assert selection.scores["y"] == pytest.approx(1 + STALE_2)


def test_mesh_rests_a_client_the_mesh_ejected() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0, hysteresis=0.0))
    telemetry = {c: _observed(c, 100.0) for c in ("a", "b")}
    telemetry["a"] = _observed("a", 50.0, ejections=1)

    chosen = [_round(policy, r, telemetry).clients for r in (1, 2)]

    # a is the faster, but Envoy ejected it: it rests for two rounds.
    assert chosen == [("b",), ("b",)]


def test_mesh_rests_a_client_whose_rounds_failed_on_the_server() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0))
    telemetry = {c: _observed(c, 100.0) for c in ("a", "b")}
    history = {"a": [_feedback("a", examples=0, loss=0.0, status="timeout")]}
    given = SelectionInput(
        server_round=2,
        candidates=["a", "b"],
        per_round=1,
        telemetry=telemetry,
        history=history,
    )

    selection = policy.select(given, random.Random(0))

    # The mesh saw no error, but the server's failure ratio is 1: reliability 0.
    assert selection.clients == ("b",)
    assert selection.scores["a"] == 0.0


def test_mesh_holds_nothing_against_a_client_whose_request_the_mesh_lost() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0, hysteresis=0.0))
    telemetry = {c: _observed(c, 100.0) for c in ("a", "b")}
    history = {"a": [_feedback("a", examples=0, loss=0.0, status="lost")]}
    given = SelectionInput(
        server_round=2,
        candidates=["a", "b"],
        per_round=2,
        telemetry=telemetry,
        history=history,
    )

    selection = policy.select(given, random.Random(0))

    # Envoy went away under the request: a scores as b does, and is chosen.
    assert selection.scores["a"] == pytest.approx(selection.scores["b"])
    assert selection.scores["a"] > 0
    assert set(selection.clients) == {"a", "b"}


def test_mesh_gives_a_client_idle_too_long_a_probe_slot() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0, max_idle_rounds=2))
    telemetry = {"a": _observed("a", 100.0), "b": _observed("b", 100.0)}
    telemetry["slow"] = _observed("slow", 900.0)

    rounds = [_round(policy, r, telemetry, per_round=2) for r in (1, 2, 3)]

    assert all("slow" not in s.clients for s in rounds[:2])
    assert "slow" in rounds[2].clients
    assert rounds[2].reasons["slow"] == "fairness: idle for 3 rounds"


def test_mesh_keeps_last_rounds_client_on_a_tie() -> None:
    telemetry = {c: _observed(c, 100.0) for c in ("a", "b", "c")}
    for seed in range(20):
        policy = MeshPolicy(MeshSettings(exploration=0.0))
        first = _round(policy, 1, telemetry, seed=seed).clients
        again = _round(policy, 2, telemetry, seed=seed + 100)
        assert again.clients == first
        assert again.scores[first[0]] == pytest.approx(1.15 * (1 + STALE_2))


def test_mesh_rests_a_client_over_its_share_of_recent_rounds() -> None:
    settings = MeshSettings(
        exploration=0.0, hysteresis=0.0, max_share=0.5, share_window_rounds=2
    )
    policy = MeshPolicy(settings)
    telemetry = {"fast": _observed("fast", 100.0), "slow": _observed("slow", 400.0)}

    chosen = [_round(policy, r, telemetry).clients[0] for r in (1, 2, 3, 4)]

    # Chosen again, fast would take part in 2 of the last 2 rounds (share 1 >
    # 0.5): it rests every other round, however fast it is.
    assert chosen == ["fast", "slow", "fast", "slow"]


def test_mesh_defaults_cap_a_client_at_half_of_any_four_rounds() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0, max_idle_rounds=None))
    telemetry = {c: _observed(c, 100.0) for c in ("fast", "other")}
    telemetry["other"] = _observed("other", 100.0, errors=0.2)

    chosen = [_round(policy, r, telemetry).clients[0] for r in range(1, 9)]

    # fast scores higher every round (reliability 1 against 0.64) but may be
    # in at most 2 of any 4 consecutive rounds.
    assert chosen == ["fast", "fast", "other", "other"] * 2


def test_mesh_speed_costs_nothing_below_the_expected_straggler() -> None:
    latencies = {"a": 100.0, "b": 300.0, "c": 200.0, "d": 900.0}
    losses = {"a": 0.1, "b": 0.2, "c": 0.1, "d": 0.2}
    policy = MeshPolicy(MeshSettings(exploration=0.0))
    given = SelectionInput(
        server_round=2,
        candidates=sorted(latencies),
        per_round=2,
        telemetry={c: _observed(c, ms) for c, ms in latencies.items()},
        history={c: [_feedback(c, examples=100, loss=x)] for c, x in losses.items()},
    )

    selection = policy.select(given, random.Random(0))

    # Utilities 10, 20, 10, 20, relative to the best 20: 0.5, 1, 0.5, 1.  The
    # expected straggler of 2 is the 2/3 quantile of (100, 200, 300, 900):
    # 300 ms.  b, slower than the median but not than the straggler, keeps
    # speed 1; d pays (300/900)^2 = 1/9.
    assert selection.scores["b"] == pytest.approx(1 + STALE_2)
    assert selection.scores["a"] == pytest.approx(0.5 + STALE_2)
    assert selection.scores["d"] == pytest.approx((1 + STALE_2) / 9)
    assert "b" in selection.clients and "d" not in selection.clients


def test_mesh_staleness_brings_back_a_client_not_seen_for_long() -> None:
    policy = MeshPolicy(MeshSettings(exploration=0.0, hysteresis=0.0))
    telemetry = {c: _observed(c, 100.0) for c in ("old", "recent", "x", "y")}
    _round(policy, 1, telemetry, candidates=["old"])
    _round(policy, 4, telemetry, candidates=["recent"])

    selection = _round(policy, 5, telemetry, candidates=["old", "recent"])

    # Round 5: sqrt(0.1 * ln 5 / 1) = 0.4012 for old, sqrt(0.1 * ln 5 / 4)
    # = 0.2006 for recent, on the same unknown utility 1.
    assert selection.scores["old"] == pytest.approx(1.4012, abs=1e-4)
    assert selection.scores["recent"] == pytest.approx(1.2006, abs=1e-4)
    assert selection.clients == ("old",)


def test_mesh_counts_a_timeout_as_slow_without_being_told_the_deadline() -> None:
    policy = MeshPolicy()
    late = SlotOutcome(
        server_round=1, slot=1, status="timeout", duration_s=7.2, reason="deadline"
    )
    fast = {c: _observed(c, 1000.0) for c in CLIENTS if c != "c-05"}
    given = SelectionInput(
        server_round=2,
        candidates=CLIENTS,
        per_round=3,
        telemetry=fast,
        history={"c-05": [ClientFeedback(client="c-05", outcome=late)]},
    )

    selection = policy.select(given, random.Random(0))

    # Measured (no more exploration) and slow: 7200 ms against a median of 1000.
    assert "c-05" not in selection.clients
    assert selection.scores["c-05"] < 0.05


def test_mesh_tries_an_unmeasured_client_before_one_that_just_failed() -> None:
    policy = MeshPolicy()
    failed = SlotOutcome(
        server_round=1, slot=1, status="error", duration_s=0.5, reason="HTTP 500"
    )
    healthy = SlotOutcome(
        server_round=1,
        slot=2,
        status="ok",
        duration_s=1.0,
        num_examples=100,
        train_loss=0.1,
    )
    given = SelectionInput(
        server_round=2,
        candidates=CLIENTS,
        per_round=3,
        history={
            "c-00": [ClientFeedback(client="c-00", outcome=failed)],
            "c-01": [ClientFeedback(client="c-01", outcome=healthy)],
        },
    )

    selection = policy.select(given, random.Random(0))

    assert "c-00" not in selection.clients
    assert "c-01" in selection.clients


def _many(n: int, reliable: set[str], seed: int = 0) -> TelemetryTable:
    """N observed clients at 500 to 2000 ms failing 30% of their requests, but
    ``reliable`` failing none."""
    rng = np.random.default_rng(seed)
    clients = [f"c-{i:06d}" for i in range(n)]
    errors = np.full(n, 0.3)
    errors[[clients.index(c) for c in reliable]] = 0.0
    return TelemetryTable(
        clients,
        state=np.full(n, table.OBSERVED),
        requests=np.full(n, 10),
        figures={
            "requests_per_s": np.ones(n),
            "error_ratio": errors,
            "latency_p95_ms": rng.uniform(500, 2000, n),
        },
    )


def test_mesh_finds_the_ten_reliable_clients_among_twenty_thousand() -> None:
    reliable = {f"c-{i:06d}" for i in range(7, 20_000, 1999)}
    telemetry = _many(20_000, reliable)
    policy = MeshPolicy(MeshSettings(exploration=0.0, hysteresis=0.0))

    selection = policy.select(
        SelectionInput(
            server_round=2,
            candidates=list(telemetry),
            per_round=len(reliable),
            telemetry=telemetry,
        ),
        random.Random(0),
    )

    # Below the expected straggler speed is 1 for all; reliability (1 - 0.3)^2
    # = 0.49 for the others.
    assert set(selection.clients) == reliable
    assert len(selection.scores) == 20_000
    others = [v for c, v in selection.scores.items() if c not in reliable]
    assert max(others) <= 0.49 * min(selection.scores[c] for c in reliable) + 1e-9


def test_mesh_chooses_the_same_from_a_table_and_from_its_rows() -> None:
    telemetry = _many(500, {"c-000003", "c-000042"}, seed=3)
    rows = {client: telemetry[client] for client in telemetry}
    chosen = []
    for given in (telemetry, rows):
        policy = MeshPolicy()
        for server_round in range(1, 6):
            selection = policy.select(
                SelectionInput(
                    server_round=server_round,
                    candidates=list(rows),
                    per_round=5,
                    telemetry=given,
                ),
                random.Random(server_round),
            )
        chosen.append((selection.clients, selection.scores, selection.reasons))

    assert chosen[0] == chosen[1]
