"""``random``: uniform sampling without replacement, FedAvg's baseline."""

from __future__ import annotations

import random

from meshctl.policies.base import Selection, SelectionInput


class RandomPolicy:
    """Every ready client is equally likely; nothing else is looked at."""

    name = "random"

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        k = min(given.per_round, len(given.candidates))
        return Selection(clients=tuple(rng.sample(list(given.candidates), k)))
