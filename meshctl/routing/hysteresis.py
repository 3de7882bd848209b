"""Hysteresis: routes change only when the change is worth it and old enough.

A policy whose scores oscillate between two sets of clients would otherwise
rewrite the routes every round.  :class:`Hysteresis` sits between the policy's
proposal and the renderer and keeps the live selection unless

- the live selection cannot stay: it is the first one, its size differs from
  the one asked for, or one of its clients has no ready endpoint any more
  (safety always wins over stability);
- the live routes are at least ``min_dwell_s`` seconds old, **and**
- the proposed clients score at least ``min_gain`` (a fraction: 0.1 is 10 %;
  0 turns the check off) higher in total than the live ones, both summed over
  the policy's current scores.  When a client on either side has no finite
  score (no data is not a number) the gain cannot be judged and only the
  dwell time applies.

The same set of clients in another order is no change: the live slot order
stays, so no slot is re-pointed for nothing.  In weighted mode a new set of
weights for the same clients replaces the live one only when some weight moves
by at least ``min_weight_change`` units (and the dwell time has passed).

The time a selection went live is recorded by :meth:`Hysteresis.commit`, called
once the routes are served; a proposal that was never applied starts no dwell.
:meth:`Hysteresis.state` and :meth:`Hysteresis.restore` carry the live selection
and its age across a controller restart (the clock need not survive it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class HysteresisState:
    """The live selection, its weights, and for how long it had been served.

    ``age_s`` is None when no selection was ever committed with a known time.
    """

    live: tuple[str, ...] | None
    live_weights: Mapping[str, int] | None
    age_s: float | None


@dataclass(frozen=True)
class Decision:
    """The clients (and, in weighted mode, weights) to route, and why."""

    clients: tuple[str, ...]
    weights: Mapping[str, int] | None
    held: bool
    reason: str


class Hysteresis:
    """Holds the live selection against small or too frequent changes."""

    def __init__(
        self,
        *,
        min_gain: float = 0.0,
        min_dwell_s: float = 0.0,
        min_weight_change: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not math.isfinite(min_gain) or min_gain < 0:
            raise ValueError(f"min_gain must be a finite fraction >= 0, not {min_gain}")
        if not math.isfinite(min_dwell_s) or min_dwell_s < 0:
            raise ValueError(f"min_dwell_s must be >= 0 seconds, not {min_dwell_s}")
        if min_weight_change < 0:
            raise ValueError(f"min_weight_change must be >= 0, not {min_weight_change}")
        self.min_gain = min_gain
        self.min_dwell_s = min_dwell_s
        self.min_weight_change = min_weight_change
        self._clock = clock
        self._live: tuple[str, ...] | None = None
        self._live_weights: dict[str, int] | None = None
        self._changed_at = -math.inf

    @property
    def live(self) -> tuple[str, ...] | None:
        """The clients of the last committed selection, in slot order."""
        return self._live

    def decide(
        self,
        proposed: Sequence[str],
        scores: Mapping[str, float],
        *,
        ready: Collection[str],
        weights: Mapping[str, int] | None = None,
    ) -> Decision:
        """The selection to route: the proposed one, or the live one held."""
        proposed = tuple(proposed)
        live = self._live
        if live is None:
            return Decision(proposed, weights, False, "first selection")
        forced = self._forced(live, proposed, ready)
        if forced:
            return Decision(proposed, weights, False, forced)
        if set(live) == set(proposed):
            return self._same_clients(live, weights)

        age_s = self._clock() - self._changed_at
        if age_s < self.min_dwell_s:
            reason = (
                f"routes are {age_s:.1f} s old, under the {self.min_dwell_s:g} s dwell"
            )
            return Decision(live, self._live_weights, True, reason)
        gain = _gain(live, proposed, scores)
        if self.min_gain > 0 and gain is not None and gain < self.min_gain:
            reason = f"score gain {gain:+.1%} is under the {self.min_gain:.0%} minimum"
            return Decision(live, self._live_weights, True, reason)
        judged = "not judged (no score)" if gain is None else f"{gain:+.1%}"
        return Decision(proposed, weights, False, f"score gain {judged}")

    def commit(
        self, clients: Sequence[str], weights: Mapping[str, int] | None = None
    ) -> None:
        """Record that ``clients`` (and ``weights``) are now served."""
        clients = tuple(clients)
        weights = dict(weights) if weights is not None else None
        if clients != self._live or weights != self._live_weights:
            self._changed_at = self._clock()
        self._live = clients
        self._live_weights = weights

    def state(self) -> HysteresisState:
        """The live selection and its age, to carry across a restart."""
        age_s = self._clock() - self._changed_at
        return HysteresisState(
            live=self._live,
            live_weights=dict(self._live_weights)
            if self._live_weights is not None
            else None,
            age_s=age_s if math.isfinite(age_s) else None,
        )

    def restore(self, saved: HysteresisState) -> None:
        """Take up a saved live selection; its age keeps counting from now."""
        self._live = tuple(saved.live) if saved.live is not None else None
        self._live_weights = (
            dict(saved.live_weights) if saved.live_weights is not None else None
        )
        if saved.age_s is None:
            self._changed_at = -math.inf
        else:
            self._changed_at = self._clock() - max(saved.age_s, 0.0)

    def _forced(
        self, live: tuple[str, ...], proposed: tuple[str, ...], ready: Collection[str]
    ) -> str:
        """Why the live selection cannot stay, or "" when it can."""
        if len(live) != len(proposed):
            return (
                f"the policy proposes {len(proposed)} clients, {len(live)} are routed"
            )
        gone = [client for client in live if client not in ready]
        if gone:
            return f"no ready endpoint for live client(s) {', '.join(gone)}"
        return ""

    def _same_clients(
        self, live: tuple[str, ...], weights: Mapping[str, int] | None
    ) -> Decision:
        """The live clients stay in their slots; weights change only by enough."""
        old = self._live_weights
        if weights is None or old is None or set(old) != set(weights):
            return Decision(live, weights, False, "same clients")
        moved = max(abs(weights[c] - old[c]) for c in weights)
        if moved == 0:
            return Decision(live, old, False, "same clients and weights")
        age_s = self._clock() - self._changed_at
        if moved < self.min_weight_change or age_s < self.min_dwell_s:
            reason = (
                f"weights move by at most {moved} (minimum {self.min_weight_change}), "
                f"routes {age_s:.1f} s old (dwell {self.min_dwell_s:g} s)"
            )
            return Decision(live, old, True, reason)
        return Decision(live, weights, False, f"weights move by up to {moved}")


def _gain(
    live: Sequence[str], proposed: Sequence[str], scores: Mapping[str, float]
) -> float | None:
    """Relative score gain of ``proposed`` over ``live``; None when not judgeable."""
    values = [scores.get(client, math.nan) for client in (*live, *proposed)]
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        return None
    live_sum = math.fsum(scores[c] for c in live)
    proposed_sum = math.fsum(scores[c] for c in proposed)
    if live_sum <= 0:
        return None if proposed_sum <= 0 else math.inf
    return proposed_sum / live_sum - 1
