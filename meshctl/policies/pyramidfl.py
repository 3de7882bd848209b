"""``pyramidfl``: Oort plus client-side adaptation (Li et al., MobiCom 2022).

PyramidFL keeps Oort's participant selection, over-commitment included, and
then uses the time a fast client would spend waiting for the round's straggler:
it trains longer.  For each selected client with a known round duration t_i
(measured at the base amount of local work), with T_r the longest predicted
duration among the round's selected clients (the straggler),

    local-steps factor_i = 1 + min(cap, beta * (T_r - t_i) / t_i)

PyramidFL computes extra steps as ``floor((T_r - t_i) / step time)`` from the
client's local compute time alone; the reply here carries only the whole
round's time, so a step's time is approximated by ``t_i / local steps``, which
counts communication as compute and errs towards fewer extra steps.  The
rounding to whole steps is left to the client (``round(steps * factor)``).
Defaults are PyramidFL's: beta 1, cap 10.

The factor reaches the client through :attr:`Selection.client_config` under
``local-steps-factor``; the controller hands it to the server's grid per slot,
and the grid merges it into that slot's training configuration.  A client that
ran with factor f reports a round f times longer in its compute part: its
duration is divided by f before it enters Oort's estimates, so that the
deadline penalty and the next factor see the base amount of work.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meshctl.policies import signals
from meshctl.policies.base import Selection, SelectionInput
from meshctl.policies.oort import OortPolicy, OortSettings
from meshctl.types import SlotOutcome


@dataclass(frozen=True)
class AdaptationSettings:
    """How much extra local work a fast client gets."""

    beta: float = 1.0
    max_extra_factor: float = 10.0  # the cap on beta * slack


class PyramidFLPolicy(OortPolicy):
    """Oort's selection; fast clients train longer instead of waiting."""

    name = "pyramidfl"

    def __init__(
        self,
        settings: OortSettings | None = None,
        adaptation: AdaptationSettings | None = None,
    ) -> None:
        super().__init__(settings)
        self.adaptation = adaptation or AdaptationSettings()
        self._factors: dict[tuple[str, int], float] = {}

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        selection = super().select(given, rng)
        factors = self.local_steps_factors(selection.clients)
        for client, factor in factors.items():
            self._factors[(client, given.server_round)] = factor
        return Selection(
            clients=selection.clients,
            scores=selection.scores,
            reasons=selection.reasons,
            client_config={
                c: {signals.LOCAL_STEPS_FACTOR: round(f, 4)}
                for c, f in factors.items()
                if f > 1.0
            },
        )

    def local_steps_factors(self, clients: tuple[str, ...]) -> dict[str, float]:
        """Each chosen client's factor from its slack before the straggler."""
        durations = {
            c: self.arms[c].duration_s
            for c in clients
            if self.arms[c].duration_s is not None and self.arms[c].duration_s > 0
        }
        if not durations:
            return {}
        straggler_s = max(durations.values())
        return {
            c: 1.0
            + min(
                self.adaptation.max_extra_factor,
                self.adaptation.beta * (straggler_s - t) / t,
            )
            for c, t in durations.items()
        }

    def observed_duration_s(self, client: str, outcome: SlotOutcome) -> float | None:
        """The duration at the base amount of work: divided by the factor sent."""
        duration_s = signals.round_seconds(outcome)
        factor = self._factors.pop((client, outcome.server_round), 1.0)
        return None if duration_s is None else duration_s / factor
