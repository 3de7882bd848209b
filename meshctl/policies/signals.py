"""What the policies read from the server's feedback, and small shared tools.

Every value here is ``None`` when the feedback does not say it: no data is not
zero, and a policy decides what an unknown means for it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import numpy as np

from meshctl.types import ClientFeedback, SlotOutcome

LOCAL_STEPS_FACTOR = "local-steps-factor"
"""The training-config key through which a policy scales a client's local steps.

A client app that honours it trains ``round(local-steps * factor)`` steps."""


def statistical_utility(outcome: SlotOutcome) -> float | None:
    """Oort's statistical utility ``|B| * sqrt(1/|B| * sum(loss_k ** 2))``.

    The reply carries the example count ``|B|`` and the mean training loss, not
    the per-example losses, so the root mean square of the per-example loss is
    approximated by the mean loss: ``|B| * |mean loss|``.  ``None`` for a
    failed slot or a reply without a loss.
    """
    if outcome.status != "ok" or outcome.train_loss is None:
        return None
    if outcome.num_examples <= 0 or not math.isfinite(outcome.train_loss):
        return None
    return outcome.num_examples * math.sqrt(outcome.train_loss**2)


def round_seconds(outcome: SlotOutcome) -> float | None:
    """How long the client's round took: its device time when it reports one.

    Only successful slots say how long the work took; a failure says nothing
    about the duration of a completed round.
    """
    if outcome.status != "ok":
        return None
    if outcome.emulated_s is not None and math.isfinite(outcome.emulated_s):
        return outcome.emulated_s
    return outcome.duration_s


def outcomes_after(
    history: Mapping[str, Sequence[ClientFeedback]], client: str, after_round: int
) -> list[SlotOutcome]:
    """The client's outcomes of rounds later than ``after_round``, oldest first."""
    return [
        feedback.outcome
        for feedback in history.get(client, ())
        if feedback.outcome.server_round > after_round
    ]


def overcommitted(per_round: int, factor: float, candidates: int) -> int:
    """``ceil(per_round * factor)`` clients, at most the candidates there are.

    FedScale truncates; rounding up makes any factor above 1 add a client even
    for small cohorts.
    """
    return max(0, min(candidates, math.ceil(per_round * factor - 1e-9)))


def weighted_sample(
    weights: Mapping[str, float], count: int, rng: random.Random
) -> list[str]:
    """``count`` distinct keys drawn with probability proportional to weight.

    Successive draws without replacement over the keys in sorted order, one
    ``rng.random()`` each; when every remaining weight is zero the rest are
    drawn uniformly.  A negative weight counts as zero.
    """
    keys = sorted(weights)
    left = np.array([max(0.0, weights[k]) for k in keys], dtype=np.float64)
    remaining = np.ones(len(keys), dtype=bool)
    chosen: list[str] = []
    while remaining.any() and len(chosen) < count:
        cumulative = np.cumsum(left)
        total = float(cumulative[-1])
        if total <= 0:
            pick = rng.choice(np.flatnonzero(remaining).tolist())
        else:
            point = rng.random() * total
            # The first key whose share of the line reaches past the point.
            pick = int(np.searchsorted(cumulative, point, side="right"))
            if pick >= len(keys):  # rounding at the very end of the line
                pick = int(np.flatnonzero(remaining)[-1])
        chosen.append(keys[pick])
        remaining[pick] = False
        left[pick] = 0.0
    return chosen
