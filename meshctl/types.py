"""Plain values shared by every layer.  Units are in the names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class ClientState(StrEnum):
    """What the telemetry says of a client over a window."""

    OBSERVED = "observed"  # it served requests and most of them succeeded
    UNOBSERVED = "unobserved"  # no traffic in the window: no data, never a number
    FAILING = "failing"  # it served requests and too many of them failed


@dataclass(frozen=True)
class Workload:
    """One client service: where it listens and the labels subsets select it by."""

    name: str
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientTelemetry:
    """A client's traffic over the telemetry window, as the mesh saw it."""

    client: str
    state: ClientState
    requests: int = 0
    requests_per_s: float | None = None
    error_ratio: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    # Outlier-detection ejections of the client's endpoint in the window;
    # None when the source does not report them.
    ejections: int | None = None


@dataclass(frozen=True)
class SlotOutcome:
    """What the server saw of one slot's message in one round."""

    server_round: int
    slot: int
    # "ok", "error" (a bad or failed reply), "timeout", or "lost" (the mesh
    # itself gave no answer: says nothing about the client)
    status: str
    duration_s: float
    num_examples: int = 0
    train_loss: float | None = None
    emulated_s: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class ClientFeedback:
    """A slot outcome once the controller has put the client's name on it."""

    client: str
    outcome: SlotOutcome


@dataclass(frozen=True)
class ArmedRound:
    """The answer to "arm round r": the slots to send to and the routes serving them."""

    server_round: int
    slots: tuple[int, ...]
    routing_version: str
    # Per-slot training settings the policy asked for (e.g. local-steps-factor);
    # the grid merges them into the configuration of that slot's messages.
    slot_config: Mapping[int, Mapping[str, int | float | str | bool]] = field(
        default_factory=dict
    )
