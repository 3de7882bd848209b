"""``oort``: guided participant selection (Lai et al., OSDI 2021).

Each client is an arm of a multi-armed bandit.  An arm that has been played
(the client took part in a round) has a utility

    U_i = statistical(i) + staleness(i), times (T / t_i) ** alpha if t_i > T

- statistical(i): the client's last reward ``|B_i| * sqrt(mean loss ** 2)``
  (see :func:`signals.statistical_utility`), clipped at the ``clip_bound``
  quantile of the known rewards and normalised as ``(r - min) / range``;
- staleness(i) = ``sqrt(0.1 * log(round) / last_round_selected)``, the bonus
  that brings back arms not played for a while;
- T, the preferred round duration: the ``round_threshold`` percentile of the
  known round durations; the **pacer** relaxes it by ``pacer_delta`` points
  when the exploited utility of the last ``pacer_step`` rounds stays flat, and
  tightens it when that utility changes sharply;
- t_i, the client's last round duration; slower clients are penalised by the
  factor ``(T / t_i) ** alpha`` (alpha is the ``round_penalty``).

Each round Oort plans ``ceil(K * overcommit)`` participants.  A share
epsilon (``exploration``, decayed by ``exploration_decay`` every round down to
``exploration_min``) goes to arms never played, the fastest first where the
mesh has measured them; the rest are sampled, with probability proportional to
utility, among the played arms whose utility is at least ``cut_off`` times the
utility of the arm just outside the top.

Defaults are FedScale's: epsilon 0.9, decay 0.98, floor 0.3, alpha 2, T at the
30th percentile, pacer step 20 rounds, pacer delta 5 points, clip bound 0.9,
sample window 5, over-commitment 1.3.  The cut-off is the paper's 95%.

A failed round (an error or a timeout) counts as a play that earned no
statistical utility, and leaves the last known duration in place.  A request
the mesh lost (``lost``: Envoy gave no answer) is no play at all: the client
stays as if it had sat the round out.
"""

from __future__ import annotations

import heapq
import math
import operator
import random
import statistics
from dataclasses import dataclass, field

import numpy as np

from meshctl import table
from meshctl.policies import meshaware, signals
from meshctl.policies.base import Selection, SelectionInput
from meshctl.table import TelemetryTable
from meshctl.types import SlotOutcome


@dataclass(frozen=True)
class OortSettings:
    """Oort's knobs, with FedScale's defaults."""

    exploration: float = 0.9
    exploration_decay: float = 0.98
    exploration_min: float = 0.3
    sample_window: float = 5.0
    round_threshold: float = 30.0  # percentile of known durations: T
    round_penalty: float = 2.0  # alpha
    pacer_step: int = 20
    pacer_delta: float = 5.0
    clip_bound: float = 0.9
    cut_off: float = 0.95
    staleness_weight: float = 0.1
    overcommit: float = 1.3
    blocklist_rounds: int | None = None  # arms played more often rest
    blocklist_max_share: float = 0.3


@dataclass
class Arm:
    """What Oort knows of one client."""

    reward: float = 0.0
    duration_s: float | None = None
    last_round: int = 0  # the round the client was last selected and heard of
    count: int = 0  # rounds it took part in


@dataclass
class _Pacer:
    threshold: float
    exploit_history: list[float] = field(default_factory=list)


class OortPolicy:
    """Oort's training selector over the clients with a ready endpoint."""

    name = "oort"

    def __init__(self, settings: OortSettings | None = None) -> None:
        self.settings = settings or OortSettings()
        self.exploration = self.settings.exploration
        self.arms: dict[str, Arm] = {}
        self._pacer = _Pacer(threshold=self.settings.round_threshold)
        self._exploited: tuple[str, ...] = ()
        self._successful: set[str] = set()

    # -- the round ------------------------------------------------------------

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        self._absorb(given)
        self._pace(given.server_round)
        blocked = self._blocklist()
        candidates = [c for c in given.candidates if c not in blocked]
        planned = signals.overcommitted(
            given.per_round, self.settings.overcommit, len(candidates)
        )
        self.exploration = max(
            self.exploration * self.settings.exploration_decay,
            self.settings.exploration_min,
        )
        preferred_s = self.preferred_duration_s()
        arms = self.arms
        played = [c for c in candidates if arms[c].count > 0]
        unplayed = [c for c in candidates if arms[c].count == 0]

        explore_len = min(len(unplayed), int(planned * self.exploration))
        exploit_len = min(planned - explore_len, len(played))
        explore_len = min(len(unplayed), planned - exploit_len)

        scores = self.utilities(played, given.server_round, preferred_s)
        exploit = self._exploit(scores, exploit_len, rng)
        first_looks = self._explore_weights(unplayed, given)
        explore = self._explore(first_looks, explore_len, rng)
        self._exploited = tuple(exploit)
        reasons = {c: "explore: never played" for c in explore}
        reasons |= {c: f"exploit: utility {scores[c]:.3f}" for c in exploit}
        return Selection(
            clients=tuple(explore + exploit),
            scores={**first_looks, **scores},
            reasons=reasons,
        )

    # -- feedback -------------------------------------------------------------

    def _absorb(self, given: SelectionInput) -> None:
        """Fold every outcome not seen yet into the arms."""
        self._successful = set()
        arms = self.arms
        for client in given.candidates:
            if client not in arms:
                arms[client] = Arm()
        for client, feedback in given.history.items():
            arm = self.arms.setdefault(client, Arm())
            if not feedback or feedback[-1].outcome.server_round <= arm.last_round:
                continue  # nothing new since the last round folded in
            for outcome in signals.outcomes_after(
                given.history, client, arm.last_round
            ):
                self._play(client, arm, outcome)

    def _play(self, client: str, arm: Arm, outcome: SlotOutcome) -> None:
        if outcome.status == "lost":
            return  # the mesh failed, not the client: nothing to learn of it
        arm.count += 1
        arm.last_round = outcome.server_round
        reward = signals.statistical_utility(outcome)
        arm.reward = reward if reward is not None else 0.0
        duration_s = self.observed_duration_s(client, outcome)
        if duration_s is not None:
            arm.duration_s = duration_s
        if reward is not None:
            self._successful.add(client)

    def observed_duration_s(self, client: str, outcome: SlotOutcome) -> float | None:
        """The round duration an outcome tells of (PyramidFL rescales it)."""
        return signals.round_seconds(outcome)

    # -- the pacer and the preferred duration ---------------------------------

    def _pace(self, server_round: int) -> None:
        """Record the last round's exploited utility; move T every pacer step."""
        rewards = [
            self.arms[c].reward for c in self._exploited if c in self._successful
        ]
        history = self._pacer.exploit_history
        history.append(sum(rewards) / (len(rewards) + 1e-4))
        step = self.settings.pacer_step
        if server_round < 2 * step or server_round % step != 0:
            return
        last = sum(history[-2 * step : -step])
        current = sum(history[-step:])
        if abs(current - last) <= last * 0.1:
            self._pacer.threshold = min(
                100.0, self._pacer.threshold + self.settings.pacer_delta
            )
        elif abs(current - last) >= last * 5:
            self._pacer.threshold = max(
                self.settings.pacer_delta,
                self._pacer.threshold - self.settings.pacer_delta,
            )

    @property
    def round_threshold(self) -> float:
        """The percentile of known durations that sets T, as the pacer left it."""
        return self._pacer.threshold

    def preferred_duration_s(self) -> float:
        """T: the ``round_threshold`` percentile of the known durations."""
        durations = sorted(
            a.duration_s for a in self.arms.values() if a.duration_s is not None
        )
        if not durations or self._pacer.threshold >= 100.0:
            return math.inf
        index = min(
            int(len(durations) * self._pacer.threshold / 100.0), len(durations) - 1
        )
        return durations[index]

    # -- utilities ------------------------------------------------------------

    def utilities(
        self, clients: list[str], server_round: int, preferred_s: float
    ) -> dict[str, float]:
        """Each played client's utility: clipped reward, staleness, deadline."""
        rewards = sorted(
            self.arms[c].reward for c in clients if self.arms[c].reward > 0
        )
        if rewards:
            clip = rewards[
                min(int(len(rewards) * self.settings.clip_bound), len(rewards) - 1)
            ]
            low = rewards[0] * 0.999
            spread = max(rewards[-1] - low, 1e-4)
        else:
            clip, low, spread = 0.0, 0.0, 1.0
        return {
            c: self._utility(self.arms[c], server_round, preferred_s, clip, low, spread)
            for c in clients
        }

    def _utility(
        self,
        arm: Arm,
        server_round: int,
        preferred_s: float,
        clip: float,
        low: float,
        spread: float,
    ) -> float:
        statistical = max(0.0, (min(arm.reward, clip) - low) / spread)
        staleness = math.sqrt(
            self.settings.staleness_weight
            * math.log(max(server_round, 1))
            / max(arm.last_round, 1)
        )
        utility = statistical + staleness
        if arm.duration_s is not None and arm.duration_s > preferred_s:
            utility *= (
                preferred_s / max(arm.duration_s, 1e-4)
            ) ** self.settings.round_penalty
        return utility

    # -- choosing -------------------------------------------------------------

    def _exploit(
        self, scores: dict[str, float], count: int, rng: random.Random
    ) -> list[str]:
        """Sample ``count`` among the clients above the cut-off, by utility."""
        if count <= 0:
            return []
        # Only the arm just outside the top counts: the sample draws from the
        # pool in the order of its keys, so the pool's own order does not matter.
        if any(map(math.isnan, scores.values())):
            ranked = sorted(scores, key=lambda c: (-scores[c], c))
        else:
            keys = zip(map(operator.neg, scores.values()), scores, strict=True)
            ranked = [c for _, c in heapq.nsmallest(count + 1, keys)]
        cut_off = scores[ranked[min(count, len(ranked) - 1)]] * self.settings.cut_off
        pool = {c: s for c, s in scores.items() if s >= cut_off}
        return signals.weighted_sample(pool, count, rng)

    def _explore_weights(
        self, clients: list[str], given: SelectionInput
    ) -> dict[str, float]:
        """First-look priority: faster first where the mesh measured latency.

        ``(fastest / latency) ** alpha`` for measured clients; a client the mesh
        never saw gets the median weight of the measured ones (1 if none).
        """
        telemetry = TelemetryTable.of(given.telemetry)
        p95 = telemetry.figure_of("latency_p95_ms", clients)
        seen = (
            (telemetry.state_of(clients) != table.UNOBSERVED)
            & np.isfinite(p95)
            & (p95 != 0)
        )
        latencies = {clients[i]: float(p95[i]) for i in np.flatnonzero(seen).tolist()}
        if not latencies:
            return {c: 1.0 for c in clients}
        fastest = min(latencies.values())
        alpha = self.settings.round_penalty
        weights = {c: (fastest / latency) ** alpha for c, latency in latencies.items()}
        unknown = statistics.median(weights.values())
        return {c: weights.get(c, unknown) for c in clients}

    def _explore(
        self, weights: dict[str, float], count: int, rng: random.Random
    ) -> list[str]:
        """The ``sample_window * count`` highest priorities, then sample by weight."""
        if count <= 0:
            return []
        randoms = [rng.random() for _ in weights]
        size = max(count, int(self.settings.sample_window * count))
        window = meshaware.first_ranked(weights, randoms, size)
        return signals.weighted_sample({c: weights[c] for c in window}, count, rng)

    def _blocklist(self) -> set[str]:
        """Arms played more than ``blocklist_rounds`` times rest (fairness)."""
        limit = self.settings.blocklist_rounds
        if limit is None:
            return set()
        busiest = sorted(self.arms, key=lambda c: -self.arms[c].count)
        blocked = [c for c in busiest if self.arms[c].count > limit]
        return set(blocked[: int(self.settings.blocklist_max_share * len(self.arms))])
