"""The controller's cycle: telemetry, policy, routing plan, apply.

One cycle arms one round: it reads what the mesh saw of every client over the
window, lets the policy choose, renders the routes for the chosen clients, and
applies them in make-before-break order through the backend, waiting for the
data plane after each step.  It answers with the slots only once the final
routes are served.  Feedback from the server on each slot is kept, under the
client's name, for the policy's next decision.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshctl.policies import Policy, SelectionInput
from meshctl.protocol import ROUTING_VERSION_ANNOTATION
from meshctl.routing import plan, render
from meshctl.types import ArmedRound, ClientFeedback, ClientTelemetry, SlotOutcome

log = logging.getLogger("meshctl.controller")


class TelemetrySource(Protocol):
    """Per-client telemetry over the last ``window_s`` seconds."""

    def read(self, window_s: float) -> Mapping[str, ClientTelemetry]: ...


class RoutingBackend(Protocol):
    """Where the routing objects live: a directory, a cluster."""

    def read(self) -> tuple[dict | None, dict | None]: ...

    def apply_plan(
        self, steps: Sequence[plan.Step], wait: Callable[[plan.Step], float]
    ) -> list[float]: ...


class ArmError(RuntimeError):
    """A round could not be armed; the routes in place stay as they were."""


@dataclass(frozen=True)
class RoundRecord:
    """What the controller decided for one round, and how long applying took."""

    server_round: int
    selected: tuple[str, ...]
    routing_version: str
    apply_s: float
    served_waits_s: tuple[float, ...] = ()
    scores: Mapping[str, float] = field(default_factory=dict)
    reasons: Mapping[str, str] = field(default_factory=dict)
    telemetry: Mapping[str, ClientTelemetry] = field(default_factory=dict)


class Controller:
    """Arms rounds by routing and keeps the server's feedback per client."""

    def __init__(
        self,
        *,
        clients: Sequence[str],
        policy: Policy,
        telemetry: TelemetrySource,
        backend: RoutingBackend,
        wait: Callable[[plan.Step], float],
        ready: Callable[[], Collection[str]],
        window_s: float = 60.0,
        seed: int = 0,
        namespace: str = "fl",
    ) -> None:
        self.clients = tuple(clients)
        self.policy = policy
        self._telemetry = telemetry
        self._backend = backend
        self._wait = wait
        self._ready = ready
        self._window_s = window_s
        self._namespace = namespace
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._history: dict[str, list[ClientFeedback]] = defaultdict(list)
        self._slots: dict[int, dict[int, str]] = {}
        self.records: list[RoundRecord] = []

    def arm(self, server_round: int, per_round: int) -> ArmedRound:
        """Choose the round's clients and route one slot to each of them."""
        with self._lock:
            started = time.monotonic()
            telemetry = self._read_telemetry()
            candidates = [c for c in self.clients if c in set(self._ready())]
            if not candidates:
                raise ArmError(f"round {server_round}: no client has a ready endpoint")
            selection = self.policy.select(
                SelectionInput(
                    server_round=server_round,
                    candidates=candidates,
                    per_round=per_round,
                    telemetry=telemetry,
                    history={c: tuple(f) for c, f in self._history.items()},
                ),
                self._rng,
            )
            assignment = {slot: c for slot, c in enumerate(selection.clients, start=1)}
            try:
                version, waits = self._apply(
                    assignment, routing_version(server_round, assignment), candidates
                )
            except ArmError as exc:
                assignment, version = self._last_good(server_round, exc)
                waits = []
            self._slots[server_round] = assignment
            record = RoundRecord(
                server_round=server_round,
                selected=tuple(assignment.values()),
                routing_version=version,
                apply_s=time.monotonic() - started,
                served_waits_s=tuple(waits),
                scores=dict(selection.scores),
                reasons=dict(selection.reasons),
                telemetry=dict(telemetry),
            )
            self.records.append(record)
        log.info(
            "round %d: routed %s (policy %s, routing version %s, %.0f ms)",
            server_round,
            ", ".join(record.selected),
            self.policy.name,
            version,
            record.apply_s * 1000,
        )
        return ArmedRound(server_round, tuple(assignment), version)

    def _last_good(
        self, server_round: int, error: ArmError
    ) -> tuple[dict[int, str], str]:
        """The routes of the last armed round, which are still in place."""
        if not self.records:
            raise error
        last = self.records[-1]
        log.error(
            "round %d: %s; the round runs on routing version %s",
            server_round,
            error,
            last.routing_version,
        )
        return dict(self._slots[last.server_round]), last.routing_version

    def record_feedback(
        self, server_round: int, outcomes: Sequence[SlotOutcome]
    ) -> list[ClientFeedback]:
        """Put each slot's outcome under the name of the client behind the slot."""
        with self._lock:
            assignment = self._slots.get(server_round, {})
            feedback = []
            for outcome in outcomes:
                client = assignment.get(outcome.slot)
                if client is None:
                    log.warning(
                        "round %d: feedback for unarmed slot %d ignored",
                        server_round,
                        outcome.slot,
                    )
                    continue
                item = ClientFeedback(client=client, outcome=outcome)
                self._history[client].append(item)
                feedback.append(item)
            return feedback

    def assignment(self, server_round: int) -> Mapping[int, str]:
        """The slot-to-client map of an armed round."""
        return dict(self._slots.get(server_round, {}))

    def _read_telemetry(self) -> Mapping[str, ClientTelemetry]:
        try:
            return self._telemetry.read(self._window_s)
        except Exception as exc:  # any source failure: decide without telemetry
            log.warning("telemetry unavailable (%s); choosing without it", exc)
            return {}

    def _apply(
        self, assignment: Mapping[int, str], version: str, ready: Collection[str]
    ) -> tuple[str, list[float]]:
        """Route the assignment; the version that serves it and each step's wait.

        When the live routes already serve the assignment nothing is written, and
        the live version stands.
        """
        try:
            live_vs, live_dr = self._backend.read()
            desired_vs, desired_dr = render.render_exact(
                assignment,
                routing_version=version,
                live_vs=live_vs,
                live_dr=live_dr,
                namespace=self._namespace,
            )
            steps = plan.plan_transition(
                live_vs, live_dr, desired_vs, desired_dr, ready_subsets=set(ready)
            )
            if not steps and live_vs is not None:
                annotations = live_vs["metadata"]["annotations"]
                return annotations[ROUTING_VERSION_ANNOTATION], []
            waits = self._backend.apply_plan(steps, self._wait)
        except Exception as exc:  # any failure: the live routes must stay as they are
            raise ArmError(
                f"routing version {version} was not applied ({exc}); "
                "the last good routes stay in place"
            ) from exc
        return version, waits


def routing_version(server_round: int, assignment: Mapping[int, str]) -> str:
    """A short version that names the round and the slot map it routes."""
    text = ",".join(f"{slot}={client}" for slot, client in sorted(assignment.items()))
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"r{server_round}-{digest}"
