"""``mesh``: meshctl's own policy, driven by what the mesh sees of each client.

Each client keeps a running estimate of its latency and error ratio, updated only
from windows in which the mesh saw it serve requests: a window with no traffic
leaves the estimate as it was (no data is not zero).  A client's score is

    utility * speed * reliability

- utility: Oort's statistical utility of its last update, examples times the root
  mean square of the training loss, relative to the best known;
- speed: 1 for clients at or under the preferred latency (the median of the known
  ones), ``(preferred / latency) ** alpha`` for slower ones;
- reliability: ``(1 - error_ratio) ** 2``.

A share of each round's slots (``exploration``) goes to clients that were never
measured, so that they can produce data; the rest go to the best scores.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from meshctl.policies.base import Selection, SelectionInput
from meshctl.types import ClientState, ClientTelemetry


@dataclass
class _Estimate:
    latency_ms: float | None = None
    error_ratio: float | None = None
    utility: float | None = None
    last_round: int = 0


class MeshPolicy:
    """Prefers fast, reliable clients with useful data; explores the unmeasured."""

    name = "mesh"

    def __init__(
        self,
        *,
        alpha: float = 2.0,
        exploration: float = 0.2,
        smoothing: float = 0.5,
        deadline_ms: float | None = None,
    ) -> None:
        self.alpha = alpha
        self.exploration = exploration
        self.smoothing = smoothing
        self.deadline_ms = deadline_ms
        self._estimates: dict[str, _Estimate] = {}

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        for client in given.candidates:
            self._update(client, given)
        k = min(given.per_round, len(given.candidates))
        unmeasured = [c for c in given.candidates if self._is_unmeasured(c)]
        scores = self._scores([c for c in given.candidates if c not in unmeasured])

        # Exploration first, so that unmeasured clients get a chance every round.
        explore = min(len(unmeasured), max(1, round(self.exploration * k)))
        if len(scores) < k - explore:
            explore = min(len(unmeasured), k - len(scores))
        chosen = rng.sample(unmeasured, explore)
        ranked = sorted(scores, key=lambda c: (-scores[c], rng.random()))
        chosen += ranked[: k - len(chosen)]
        reasons = {c: "explore: never measured" for c in chosen[:explore]}
        return Selection(clients=tuple(chosen), scores=scores, reasons=reasons)

    # -- estimates ------------------------------------------------------------

    def _update(self, client: str, given: SelectionInput) -> None:
        estimate = self._estimates.setdefault(client, _Estimate())
        telemetry = given.telemetry.get(client)
        if telemetry is not None and telemetry.state is not ClientState.UNOBSERVED:
            self._update_from_mesh(estimate, telemetry)
        for feedback in given.history.get(client, ()):
            outcome = feedback.outcome
            if outcome.server_round <= estimate.last_round:
                continue
            estimate.last_round = outcome.server_round
            if outcome.status == "timeout" and self.deadline_ms is not None:
                estimate.latency_ms = self._blend(estimate.latency_ms, self.deadline_ms)
            if outcome.status == "ok" and outcome.train_loss is not None:
                loss = outcome.train_loss
                estimate.utility = outcome.num_examples * math.sqrt(loss * loss)

    def _update_from_mesh(
        self, estimate: _Estimate, telemetry: ClientTelemetry
    ) -> None:
        if telemetry.latency_p95_ms is not None and math.isfinite(
            telemetry.latency_p95_ms
        ):
            estimate.latency_ms = self._blend(
                estimate.latency_ms, telemetry.latency_p95_ms
            )
        if telemetry.error_ratio is not None and math.isfinite(telemetry.error_ratio):
            estimate.error_ratio = self._blend(
                estimate.error_ratio, telemetry.error_ratio
            )

    def _blend(self, old: float | None, new: float) -> float:
        if old is None:
            return new
        return self.smoothing * new + (1 - self.smoothing) * old

    def _is_unmeasured(self, client: str) -> bool:
        estimate = self._estimates[client]
        return estimate.latency_ms is None and estimate.error_ratio is None

    # -- scores ---------------------------------------------------------------

    def _scores(self, clients: list[str]) -> dict[str, float]:
        estimates = {c: self._estimates[c] for c in clients}
        latencies = [e.latency_ms for e in estimates.values() if e.latency_ms]
        preferred_ms = statistics.median(latencies) if latencies else None
        utilities = [e.utility for e in estimates.values() if e.utility]
        best_utility = max(utilities) if utilities else None
        return {
            client: self._score(estimate, preferred_ms, best_utility)
            for client, estimate in estimates.items()
        }

    def _score(
        self,
        estimate: _Estimate,
        preferred_ms: float | None,
        best_utility: float | None,
    ) -> float:
        utility = 1.0
        if best_utility and estimate.utility is not None:
            utility = estimate.utility / best_utility
        speed = 1.0
        if preferred_ms and estimate.latency_ms and estimate.latency_ms > preferred_ms:
            speed = (preferred_ms / estimate.latency_ms) ** self.alpha
        reliability = (1.0 - (estimate.error_ratio or 0.0)) ** 2
        return utility * speed * reliability
