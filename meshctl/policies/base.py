"""What a selection policy sees and what it answers."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshctl.types import ClientFeedback, ClientTelemetry


@dataclass(frozen=True)
class SelectionInput:
    """Everything known about the clients when a round is armed.

    ``candidates`` are the clients with a ready endpoint; only they may be chosen.
    ``telemetry`` holds the mesh's view over the window, ``history`` the server's
    feedback on every round a client took part in, newest last.
    """

    server_round: int
    candidates: Sequence[str]
    per_round: int
    telemetry: Mapping[str, ClientTelemetry] = field(default_factory=dict)
    history: Mapping[str, Sequence[ClientFeedback]] = field(default_factory=dict)


ConfigValue = int | float | str | bool


@dataclass(frozen=True)
class Selection:
    """The chosen clients, in slot order, and each candidate's score.

    A policy may choose more clients than ``per_round`` (over-commitment): the
    controller routes one slot per chosen client.  ``client_config`` holds
    per-client training settings (for example ``{"local-steps-factor": 1.5}``)
    that the grid merges into the configuration of that client's training
    messages; a client missing from it trains with the server's settings.
    """

    clients: tuple[str, ...]
    scores: Mapping[str, float] = field(default_factory=dict)
    reasons: Mapping[str, str] = field(default_factory=dict)
    client_config: Mapping[str, Mapping[str, ConfigValue]] = field(default_factory=dict)


class Policy(Protocol):
    """Chooses the clients of one round."""

    name: str

    def select(self, given: SelectionInput, rng: random.Random) -> Selection: ...
