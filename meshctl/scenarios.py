"""Scenarios: the same devices and the same faults for every policy.

A scenario says which clients fail, slow down or join late, and from which
round.  It is decided once, from the seed and the devices' speeds, before any
policy runs, and it reaches the clients only through their node config (each
client knows the round from the server's training config) or through the
moment their process starts.  Policies see nothing of it but what the mesh and
the server observe.

- ``static``: the devices of the FedScale trace, and a fixed set of clients
  that fail a fixed share of their training requests from the first round.
- ``dynamic``: ``static``, then a shift after a third of the rounds: a third
  of the fast clients turn slow (their device slows down ``slow_factor``
  times) or start failing, alternately, and some clients that were absent
  until then join.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from meshctl import protocol


class UnknownScenario(ValueError):
    """A scenario name that meshctl does not know."""


@dataclass(frozen=True)
class Scenario:
    """What changes during a run, as shares of the clients and of the rounds."""

    name: str
    description: str
    shift_after_share: float | None = None  # of the rounds; None: nothing shifts
    changed_fast_share: float = 0.0  # of the fast clients, which change at the shift
    slow_factor: float = 1.0  # how much slower a client that turns slow gets
    shift_fail_rate: float = 0.0  # share of requests a client that starts failing fails
    late_share: float = 0.0  # of all clients, absent until the shift

    def shift_round(self, rounds: int) -> int | None:
        """The first round after the shift, or None when nothing shifts."""
        if self.shift_after_share is None:
            return None
        return max(2, 1 + math.floor(rounds * self.shift_after_share))


STATIC = Scenario(
    name="static",
    description="FedScale devices, a fixed set of clients failing a fixed share "
    "of their requests",
)
DYNAMIC = Scenario(
    name="dynamic",
    description="static, then after a third of the rounds a third of the fast "
    "clients turn 4x slower or start failing 80% of their requests, and 15% of "
    "the clients join late",
    shift_after_share=1 / 3,
    changed_fast_share=1 / 3,
    slow_factor=4.0,
    shift_fail_rate=0.8,
    late_share=0.15,
)
SCENARIOS = {s.name: s for s in (STATIC, DYNAMIC)}
NAMES = tuple(SCENARIOS)


def get(name: str) -> Scenario:
    """The scenario called ``name``; raises :class:`UnknownScenario`."""
    try:
        return SCENARIOS[name]
    except KeyError:
        raise UnknownScenario(
            f"unknown scenario {name!r}; choose one of {', '.join(NAMES)}"
        ) from None


@dataclass(frozen=True)
class ClientSchedule:
    """One client's faults, by round; rounds count from 1."""

    index: int
    fail_rate: float = 0.0
    fail_from_round: int = 1
    slow_factor: float = 1.0
    slow_from_round: int | None = None
    join_round: int = 1

    def present(self, server_round: int) -> bool:
        """True when the client's service runs in this round."""
        return server_round >= self.join_round

    def slow(self, server_round: int) -> bool:
        """True when the client's device is slowed down in this round."""
        return self.slow_from_round is not None and server_round >= self.slow_from_round

    def fail_rate_at(self, server_round: int) -> float:
        """The share of training requests the client fails in this round."""
        return self.fail_rate if server_round >= self.fail_from_round else 0.0

    def node_config(self) -> dict[str, float | int]:
        """The node config keys the FLUIDS ``ClientApp`` reads the schedule from."""
        config: dict[str, float | int] = {"fail-rate": self.fail_rate}
        if self.fail_from_round > 1:
            config["fail-from-round"] = self.fail_from_round
        if self.slow_from_round is not None:
            config["slow-from-round"] = self.slow_from_round
            config["slow-factor"] = self.slow_factor
        return config


def schedule(
    scenario: Scenario,
    *,
    ms_per_sample: Sequence[float],
    rounds: int,
    failing_clients: int,
    fail_rate: float,
    seed: int,
) -> list[ClientSchedule]:
    """Every client's schedule, from the seed and the devices' speeds.

    The draws are made in a fixed order from one generator seeded with
    ``seed``: first the clients failing from the start (the same ones in every
    scenario), then the late joiners, then the fast clients that change.
    """
    count = len(ms_per_sample)
    rng = random.Random(seed)
    failing = set(rng.sample(range(count), failing_clients))
    plans = {
        i: ClientSchedule(index=i, fail_rate=fail_rate if i in failing else 0.0)
        for i in range(count)
    }
    shift = scenario.shift_round(rounds)
    if shift is None:
        return [plans[i] for i in range(count)]

    # Late joiners: any client that does not fail from the start.
    healthy = sorted(set(range(count)) - failing)
    late = rng.sample(healthy, min(len(healthy), round(count * scenario.late_share)))
    for i in late:
        plans[i] = ClientSchedule(index=i, join_round=shift)

    # The fast half of the clients present from the start; a share of them change.
    present = [i for i in healthy if i not in late]
    fast = sorted(present, key=lambda i: (ms_per_sample[i], i))[
        : math.ceil(len(present) / 2)
    ]
    changed = rng.sample(fast, round(len(fast) * scenario.changed_fast_share))
    for order, i in enumerate(changed):
        if order % 2 == 0:
            plans[i] = ClientSchedule(
                index=i, slow_factor=scenario.slow_factor, slow_from_round=shift
            )
        else:
            plans[i] = ClientSchedule(
                index=i, fail_rate=scenario.shift_fail_rate, fail_from_round=shift
            )
    return [plans[i] for i in range(count)]


def describe(plans: Sequence[ClientSchedule]) -> list[str]:
    """One line per client whose schedule is not plain, for logs and reports."""
    lines = []
    for plan in plans:
        parts = []
        if plan.join_round > 1:
            parts.append(f"joins in round {plan.join_round}")
        if plan.fail_rate:
            since = (
                f" from round {plan.fail_from_round}"
                if plan.fail_from_round > 1
                else ""
            )
            parts.append(f"fails {plan.fail_rate:.0%} of requests{since}")
        if plan.slow_from_round is not None:
            parts.append(
                f"{plan.slow_factor:g}x slower from round {plan.slow_from_round}"
            )
        if parts:
            lines.append(f"{protocol.client_id(plan.index)}: {', '.join(parts)}")
    return lines
