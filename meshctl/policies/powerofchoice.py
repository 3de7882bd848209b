"""``power-of-choice``: biased selection towards higher local loss (Cho et al., 2020).

Each round the server draws a candidate set of d clients without replacement,
with probability proportional to their data fraction p_k, and keeps the K
candidates with the highest local loss.  Asking every candidate for its loss on
the current model would cost a round trip per candidate, so this is the
variant that reuses each client's last reported training loss.  A client whose
loss was never reported ranks first (it may well have the highest loss), and a
client whose data size was never reported weighs the mean of the known sizes
(1 when none is known).  ``d`` defaults to ``ceil(2 * K)``, at most the number
of ready clients; ``d = K`` is uniform sampling by data size.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from meshctl.policies import signals
from meshctl.policies.base import Selection, SelectionInput


@dataclass(frozen=True)
class PowerOfChoiceSettings:
    """The size of the candidate set: ``d``, or ``d_factor * K`` when unset."""

    d: int | None = None
    d_factor: float = 2.0


class PowerOfChoicePolicy:
    """Draw d candidates by data size; keep the K with the highest loss."""

    name = "power-of-choice"

    def __init__(self, settings: PowerOfChoiceSettings | None = None) -> None:
        self.settings = settings or PowerOfChoiceSettings()

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        k = min(given.per_round, len(given.candidates))
        d = self.candidate_count(k, len(given.candidates))
        sizes = self.data_sizes(given)
        drawn = signals.weighted_sample(sizes, d, rng)
        losses = {c: self.last_loss(given, c) for c in drawn}
        ranked = sorted(
            drawn,
            key=lambda c: (losses[c] is not None, -(losses[c] or 0.0), rng.random()),
        )
        chosen = tuple(ranked[:k])
        return Selection(
            clients=chosen,
            scores={c: losses[c] for c in drawn if losses[c] is not None},
            reasons={
                c: "loss never reported"
                if losses[c] is None
                else f"loss {losses[c]:.4f} among {d} candidates"
                for c in chosen
            },
        )

    def candidate_count(self, k: int, ready: int) -> int:
        """d: the setting, or ``ceil(d_factor * K)``; between K and the ready."""
        d = self.settings.d or math.ceil(self.settings.d_factor * k - 1e-9)
        return max(k, min(d, ready))

    @staticmethod
    def data_sizes(given: SelectionInput) -> dict[str, float]:
        """Each candidate's last reported example count, or the known mean."""
        known = {}
        for client in given.candidates:
            counts = [
                f.outcome.num_examples
                for f in given.history.get(client, ())
                if f.outcome.status == "ok" and f.outcome.num_examples > 0
            ]
            if counts:
                known[client] = float(counts[-1])
        default = statistics.fmean(known.values()) if known else 1.0
        return {c: known.get(c, default) for c in given.candidates}

    @staticmethod
    def last_loss(given: SelectionInput, client: str) -> float | None:
        """The client's last reported training loss; ``None`` if never reported."""
        for feedback in reversed(given.history.get(client, ())):
            loss = feedback.outcome.train_loss
            if feedback.outcome.status == "ok" and loss is not None:
                if math.isfinite(loss):
                    return loss
        return None
