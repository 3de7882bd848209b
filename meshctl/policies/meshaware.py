"""``mesh``: meshctl's own policy, driven by what the mesh sees of each client.

The mesh measures every request a client serves, the server reports every
round a client trains.  The policy keeps, per client:

- latency and error ratio as **level and trend** (Holt's linear smoothing),
  updated only from telemetry windows in which the mesh saw the client serve
  requests: a window without traffic leaves both as they were (no data is not
  zero).  The score uses the one-round-ahead forecast, level plus trend, so a
  client that is getting slower or failing more loses rank before its average
  says so;
- outlier ejections: a client that Envoy's outlier detection ejected in the
  window rests for ``ejection_cooldown_rounds`` rounds;
- failures the server saw (error or timeout) as a smoothed failure ratio, which
  also covers what the mesh cannot see (a reply that timed out client-side or
  failed the update checks);
- Oort's statistical utility of its last update, ``|B| * |mean loss|``.

The score of a measured client is

    (utility + staleness) ** w * speed * reliability * stickiness

- utility: relative to the best known; a client with no update yet gets the
  median of the known ones, neither rewarded nor punished;
- staleness: Oort's bonus ``sqrt(s * ln(round) / last round chosen)``, so
  that a client whose data the model has not seen for a while comes back;
- speed: a round lasts as long as its slowest client, so a client that
  finishes before the round's straggler costs nothing.  The expected
  straggler ``T`` is the ``k / (k + 1)`` quantile of the latency forecasts
  (the expected slowest of ``k`` clients drawn from them); speed is 1 up to
  ``T``, then ``(T / forecast) ** alpha``, Oort's deadline penalty;
- reliability: ``(1 - max(forecast error ratio, failure ratio)) ** 2``;
- stickiness: ``1 + hysteresis`` for the clients of the last round, so that a
  near tie does not move routes (the routing layer damps flapping again).

Each round: clients above ``max_error_ratio`` or ejected are filtered out
(refilled from the least bad ones if too few remain); a share ``exploration``
of the slots goes to clients never measured; one slot goes to a client idle
for more than ``max_idle_rounds`` (the participation floor, which is also how a
client that recovered gets measured again); a client that, chosen again, would
take part in more than ``max_share`` of the last ``share_window_rounds``
rounds rests (FedAvg on non-IID data needs every client's data, not the same
fast few); the rest go to the best scores.
"""

from __future__ import annotations

import heapq
import math
import operator
import random
import statistics
from collections import deque
from dataclasses import dataclass, field

from meshctl.policies import signals
from meshctl.policies.base import Selection, SelectionInput
from meshctl.types import ClientState, ClientTelemetry, SlotOutcome


@dataclass(frozen=True)
class MeshSettings:
    """The mesh policy's knobs and their defaults."""

    exploration: float = 0.2
    smoothing: float = 0.5  # level
    trend_smoothing: float = 0.3  # trend
    latency_penalty: float = 2.0  # alpha
    reliability_exponent: float = 2.0
    utility_weight: float = 1.0  # w
    max_error_ratio: float = 0.5
    exclude_ejected: bool = True
    ejection_cooldown_rounds: int = 2
    max_idle_rounds: int | None = 10
    max_share: float = 0.5
    share_window_rounds: int = 4
    staleness: float = 0.1  # s, Oort's staleness weight
    hysteresis: float = 0.15
    deadline_ms: float | None = None


@dataclass
class Smoothed:
    """Holt's linear smoothing of one signal: a level and a trend per update."""

    level: float | None = None
    trend: float = 0.0

    def update(self, value: float, alpha: float, beta: float) -> None:
        if self.level is None:
            self.level = value
            return
        previous = self.level
        self.level = alpha * value + (1 - alpha) * (self.level + self.trend)
        self.trend = beta * (self.level - previous) + (1 - beta) * self.trend

    def forecast(self, low: float = 0.0, high: float = math.inf) -> float | None:
        """Level plus trend, within ``[low, high]``; ``None`` when unmeasured."""
        if self.level is None:
            return None
        return min(high, max(low, self.level + self.trend))


@dataclass
class _Estimate:
    latency_ms: Smoothed = field(default_factory=Smoothed)
    error_ratio: Smoothed = field(default_factory=Smoothed)
    failure_ratio: float | None = None
    utility: float | None = None
    heard_round: int = 0  # the last round whose feedback is folded in
    selected_round: int = 0  # the last round the client was chosen for
    rested_until: int = 0
    rounds: deque[int] = field(default_factory=lambda: deque(maxlen=64))

    @property
    def measured(self) -> bool:
        return (
            self.latency_ms.level is not None
            or self.error_ratio.level is not None
            or self.failure_ratio is not None
        )


class MeshPolicy:
    """Prefers fast, reliable, useful clients; explores, rests and probes."""

    name = "mesh"

    def __init__(self, settings: MeshSettings | None = None) -> None:
        self.settings = settings or MeshSettings()
        self._estimates: dict[str, _Estimate] = {}
        self._last: tuple[str, ...] = ()

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        self._observe(given)
        k = min(given.per_round, len(given.candidates))
        scores = self.scores(
            [c for c in given.candidates if self._estimates[c].measured],
            server_round=given.server_round,
            per_round=k,
        )
        chosen, reasons = [], {}

        # Exploration first, so that never-measured clients get a chance.
        unmeasured = [c for c in given.candidates if c not in scores]
        explore = min(len(unmeasured), max(1, round(self.settings.exploration * k)))
        explore = max(explore, min(len(unmeasured), k - len(scores)))
        for client in rng.sample(unmeasured, explore):
            chosen.append(client)
            reasons[client] = "explore: never measured"

        # The participation floor: the longest idle client, if idle long enough.
        probe = self._idle(given, scores, exclude=chosen)
        if probe is not None and len(chosen) < k:
            chosen.append(probe)
            idle = given.server_round - self._estimates[probe].selected_round
            reasons[probe] = f"fairness: idle for {idle} rounds"

        # The best scores among the clients that pass the filters.
        # Then unmeasured clients rather than rested ones: a client that just
        # failed is a worse bet than one nobody has tried.
        eligible, rested = self._filter(given.server_round, scores)
        # The loop below looks at most k eligible clients (each either taken or
        # already chosen), so the first k of the ranking are enough.
        ranked = first_ranked(eligible, [rng.random() for _ in eligible], k)
        untried = [c for c in unmeasured if c not in chosen]
        ranked += rng.sample(untried, len(untried))
        ranked += sorted(rested, key=lambda c: (-rested[c], rng.random()))
        for client in ranked:
            if len(chosen) >= k:
                break
            if client in chosen:
                continue
            chosen.append(client)
            if client in unmeasured:
                reasons[client] = (
                    "explore: never measured, preferred to a rested client"
                )
            else:
                reasons[client] = self._reason(client, scores, rested)
        self._remember(given.server_round, chosen)
        return Selection(clients=tuple(chosen), scores=scores, reasons=reasons)

    # -- estimates ------------------------------------------------------------

    def _observe(self, given: SelectionInput) -> None:
        for client in set(given.candidates) | set(given.history):
            estimate = self._estimates.setdefault(client, _Estimate())
            telemetry = given.telemetry.get(client)
            if telemetry is not None:
                self._observe_mesh(given.server_round, estimate, telemetry)
            for outcome in signals.outcomes_after(
                given.history, client, estimate.heard_round
            ):
                self._observe_outcome(estimate, outcome)

    def _observe_mesh(
        self, server_round: int, estimate: _Estimate, telemetry: ClientTelemetry
    ) -> None:
        if telemetry.state is ClientState.UNOBSERVED or telemetry.requests <= 0:
            return
        alpha, beta = self.settings.smoothing, self.settings.trend_smoothing
        if _finite(telemetry.latency_p95_ms):
            estimate.latency_ms.update(telemetry.latency_p95_ms, alpha, beta)
        if _finite(telemetry.error_ratio):
            estimate.error_ratio.update(telemetry.error_ratio, alpha, beta)
        if self.settings.exclude_ejected and telemetry.ejections:
            cooldown = self.settings.ejection_cooldown_rounds
            estimate.rested_until = max(estimate.rested_until, server_round + cooldown)

    def _observe_outcome(self, estimate: _Estimate, outcome: SlotOutcome) -> None:
        estimate.heard_round = max(estimate.heard_round, outcome.server_round)
        if outcome.status == "lost":
            return  # the mesh failed, not the client: nothing to learn of it
        failed = 0.0 if outcome.status == "ok" else 1.0
        if estimate.failure_ratio is None:
            estimate.failure_ratio = failed
        else:
            alpha = self.settings.smoothing
            estimate.failure_ratio = (
                alpha * failed + (1 - alpha) * estimate.failure_ratio
            )
        if outcome.status == "timeout":
            # A late client took at least as long as the server waited for it,
            # and at least the configured deadline.
            waited_ms = max(outcome.duration_s * 1000, self.settings.deadline_ms or 0)
            estimate.latency_ms.update(
                waited_ms, self.settings.smoothing, self.settings.trend_smoothing
            )
        utility = signals.statistical_utility(outcome)
        if utility is not None:
            estimate.utility = utility

    # -- scores ---------------------------------------------------------------

    def scores(
        self, clients: list[str], server_round: int = 1, per_round: int = 1
    ) -> dict[str, float]:
        """The score of each measured client; see the module's docstring."""
        estimates = {c: self._estimates[c] for c in clients}
        latencies = [
            e.latency_ms.forecast() for e in estimates.values() if e.latency_ms.level
        ]
        straggler_ms = _quantile(latencies, per_round / (per_round + 1))
        utilities = [e.utility for e in estimates.values() if e.utility]
        best = max(utilities) if utilities else None
        unknown = statistics.median([u / best for u in utilities]) if best else 1.0
        return {
            client: self._score(
                client, estimate, server_round, straggler_ms, best, unknown
            )
            for client, estimate in estimates.items()
        }

    def _score(
        self,
        client: str,
        estimate: _Estimate,
        server_round: int,
        straggler_ms: float | None,
        best_utility: float | None,
        unknown_utility: float,
    ) -> float:
        utility = unknown_utility
        if best_utility and estimate.utility is not None:
            utility = estimate.utility / best_utility
        utility += self._staleness(server_round, estimate)
        speed = 1.0
        latency_ms = estimate.latency_ms.forecast(low=1e-3)
        if straggler_ms and latency_ms and latency_ms > straggler_ms:
            speed = (straggler_ms / latency_ms) ** self.settings.latency_penalty
        reliability = (1.0 - self._unreliability(estimate)) ** (
            self.settings.reliability_exponent
        )
        sticky = 1.0 + self.settings.hysteresis if client in self._last else 1.0
        return utility**self.settings.utility_weight * speed * reliability * sticky

    def _staleness(self, server_round: int, estimate: _Estimate) -> float:
        """Oort's ``sqrt(s * ln(round) / last round chosen)``; 0 in round 1."""
        last_round = max(1, estimate.selected_round)
        return math.sqrt(
            self.settings.staleness * math.log(max(1, server_round)) / last_round
        )

    @staticmethod
    def _unreliability(estimate: _Estimate) -> float:
        error = estimate.error_ratio.forecast(high=1.0) or 0.0
        return min(1.0, max(error, estimate.failure_ratio or 0.0))

    # -- filters and fairness -------------------------------------------------

    def _filter(
        self, server_round: int, scores: dict[str, float]
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Split the scored clients into eligible and rested ones."""
        eligible, rested = {}, {}
        for client, score in scores.items():
            estimate = self._estimates[client]
            if (
                estimate.rested_until >= server_round
                or self._unreliability(estimate) > self.settings.max_error_ratio
                or self._share(server_round, estimate) > self.settings.max_share
            ):
                rested[client] = score
            else:
                eligible[client] = score
        return eligible, rested

    def _share(self, server_round: int, estimate: _Estimate) -> float:
        """The client's share of the last rounds if it were chosen this round."""
        window = self.settings.share_window_rounds
        recent = [
            r for r in estimate.rounds if server_round - window < r < server_round
        ]
        return (len(recent) + 1) / window

    def _idle(
        self, given: SelectionInput, scores: dict[str, float], exclude: list[str]
    ) -> str | None:
        limit = self.settings.max_idle_rounds
        if limit is None:
            return None
        idle = {
            c: given.server_round - self._estimates[c].selected_round
            for c in scores
            if c not in exclude and self._estimates[c].rested_until < given.server_round
        }
        overdue = [c for c, rounds in idle.items() if rounds > limit]
        return max(overdue, key=lambda c: (idle[c], scores[c]), default=None)

    def _reason(
        self, client: str, scores: dict[str, float], rested: dict[str, float]
    ) -> str:
        if client in rested:
            return f"score {scores[client]:.3f} (filtered, but too few others)"
        return f"score {scores[client]:.3f}"

    def _remember(self, server_round: int, chosen: list[str]) -> None:
        for client in chosen:
            estimate = self._estimates[client]
            estimate.rounds.append(server_round)
            estimate.selected_round = server_round
        self._last = tuple(chosen)


def first_ranked(
    scores: dict[str, float], randoms: list[float], count: int
) -> list[str]:
    """The ``count`` first clients of ``sorted(scores, key=(-score, random))``.

    The same order as that sort (the position breaks exact ties, as a stable
    sort does), without sorting a hundred thousand clients to route ten; with
    a score that is not a number the full sort decides, as before.
    """
    clients = list(scores)
    if any(map(math.isnan, scores.values())):
        order = sorted(
            range(len(clients)), key=lambda i: (-scores[clients[i]], randoms[i])
        )
        return [clients[i] for i in order[:count]]
    keys = zip(
        map(operator.neg, scores.values()), randoms, range(len(clients)), strict=True
    )
    best = heapq.nsmallest(count, keys) if count < len(clients) else sorted(keys)
    return [clients[i] for _, _, i in best]


def _quantile(values: list[float], share: float) -> float | None:
    """The ``share`` quantile of ``values``, linearly interpolated; ``None``
    when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
