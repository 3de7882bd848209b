"""The controller's cycle: telemetry, policy, routing plan, apply.

One cycle arms one round: it reads what the mesh saw of every client over the
window, lets the policy choose, renders the routes for the chosen clients, and
applies them in make-before-break order through the backend, waiting for the
data plane after each step.  It answers with the slots only once the final
routes are served.  Feedback from the server on each slot is kept, under the
client's name, for the policy's next decision.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from meshctl.controller.metrics import ControllerMetrics
from meshctl.policies import Policy, Selection, SelectionInput
from meshctl.protocol import ROUTING_VERSION_ANNOTATION
from meshctl.routing import plan, render, validate
from meshctl.routing.errors import RoutingError
from meshctl.routing.hysteresis import Decision, Hysteresis
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
    weights: Mapping[str, int] = field(default_factory=dict)
    routing_note: str = ""


class Controller:
    """Arms rounds by routing and keeps the server's feedback per client.

    ``mode`` is ``exact`` (one route per slot) or ``weighted`` (one route whose
    weights come from the policy's scores; the server's feedback cannot then be
    put under a client's name and is ignored).  ``hysteresis`` holds the live
    selection against small or too frequent changes; ``budget_bytes`` caps the
    size of each rendered object.
    """

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
        mode: str = "exact",
        hysteresis: Hysteresis | None = None,
        budget_bytes: int = render.DEFAULT_SIZE_BUDGET_BYTES,
        telemetry_retry_s: tuple[float, float] = (5.0, 300.0),
        clock: Callable[[], float] = time.monotonic,
        metrics: ControllerMetrics | None = None,
    ) -> None:
        if mode not in ("exact", "weighted"):
            raise ValueError(f"mode is 'exact' or 'weighted', not {mode!r}")
        self.clients = tuple(clients)
        self.policy = policy
        self._telemetry = telemetry
        self._backend = backend
        self._wait = wait
        self._ready = ready
        self._window_s = window_s
        self._namespace = namespace
        self.mode = mode
        self._hysteresis = hysteresis or Hysteresis()
        self._budget_bytes = budget_bytes
        # Telemetry back-off: first and longest delay, failures in a row, next try.
        self._retry_s = telemetry_retry_s
        self._clock = clock
        self._telemetry_failures = 0
        self._telemetry_retry_at = -math.inf
        self.metrics = metrics or ControllerMetrics()
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
            ready = set(self._ready())
            candidates = [c for c in self.clients if c in ready]
            if not candidates:
                raise ArmError(f"round {server_round}: no client has a ready endpoint")
            if telemetry is None and self._last_routes_ready(candidates):
                return self._keep_last_routes(server_round, started)
            telemetry = telemetry if telemetry is not None else {}
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
            note = ""
            try:
                decision = self._decide(selection, candidates)
                note = decision.reason
                assignment = dict(enumerate(decision.clients, start=1))
                weights = dict(decision.weights or {})
                version = routing_version(server_round, assignment, weights)
                version, waits = self._apply(assignment, weights, version, candidates)
                self._hysteresis.commit(decision.clients, decision.weights)
            except ArmError as exc:
                self.metrics.failed("routing")
                assignment, version = self._last_good(server_round, exc)
                weights, waits, note = {}, [], str(exc)
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
                weights=weights,
                routing_note=note,
            )
            self.records.append(record)
            self.metrics.round_armed(record, self.clients)
        log.info(
            "round %d: routed %s (policy %s, %s, routing version %s, %.0f ms)",
            server_round,
            ", ".join(record.selected),
            self.policy.name,
            record.routing_note or "no note",
            version,
            record.apply_s * 1000,
        )
        slot_config = {
            slot: dict(selection.client_config[client])
            for slot, client in assignment.items()
            if client in selection.client_config
        }
        return ArmedRound(server_round, tuple(assignment), version, slot_config)

    def _last_good(
        self, server_round: int, error: ArmError
    ) -> tuple[dict[int, str], str]:
        """The slots the live routes serve after a failed apply, read back.

        A plan can fail midway, after its VirtualService was written (a wait for
        the data plane that timed out), so the routes in place are read, never
        assumed to be the last round's.
        """
        try:
            live_vs, _ = self._backend.read()
        except Exception as exc:  # nothing can be said about the routes in place
            raise error from exc
        assignment, weights = render.routed_clients(live_vs)
        if not assignment:  # weighted mode: every slot goes to the weighted route
            routed = sorted(client for client, weight in weights.items() if weight > 0)
            assignment = dict(enumerate(routed, start=1))
        if not assignment or not self.records:
            raise error
        annotations = live_vs.get("metadata", {}).get("annotations") or {}
        version = str(annotations.get(ROUTING_VERSION_ANNOTATION, "unversioned"))
        log.error(
            "round %d: %s; the round runs on the live routing version %s",
            server_round,
            error,
            version,
        )
        return dict(sorted(assignment.items())), version

    def _decide(self, selection: Selection, ready: Collection[str]) -> Decision:
        """The policy's choice after hysteresis, with weights in weighted mode."""
        weights = None
        if self.mode == "weighted":
            scores = {c: selection.scores.get(c, math.nan) for c in selection.clients}
            try:
                weights = render.weights_for_clients(scores)
            except RoutingError as exc:
                raise ArmError(f"{exc}; the last good routes stay in place") from exc
        return self._hysteresis.decide(
            selection.clients, selection.scores, ready=ready, weights=weights
        )

    def record_feedback(
        self, server_round: int, outcomes: Sequence[SlotOutcome]
    ) -> list[ClientFeedback]:
        """Put each slot's outcome under the name of the client behind the slot."""
        if self.mode == "weighted":
            log.warning(
                "round %d: weighted routes pick a client per request; feedback "
                "cannot be put under a client's name and is ignored",
                server_round,
            )
            return []
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

    def _read_telemetry(self) -> Mapping[str, ClientTelemetry] | None:
        """The window's telemetry, or None while the source fails or backs off."""
        now = self._clock()
        if now < self._telemetry_retry_at:
            wait_s = self._telemetry_retry_at - now
            log.info("telemetry: next try in %.0f s (back-off)", wait_s)
            return None
        try:
            telemetry = self._telemetry.read(self._window_s)
        except Exception as exc:  # any source failure: decide without telemetry
            self._telemetry_failed(exc, now)
            return None
        if self._telemetry_failures:
            log.info(
                "telemetry recovered after %d failures in a row",
                self._telemetry_failures,
            )
        self._telemetry_failures = 0
        self._telemetry_retry_at = -math.inf
        return telemetry

    def _telemetry_failed(self, error: Exception, now: float) -> None:
        """Count a failure and back off: the delay doubles up to its longest."""
        self.metrics.failed("telemetry")
        self._telemetry_failures += 1
        first_s, longest_s = self._retry_s
        delay_s = min(first_s * 2 ** (self._telemetry_failures - 1), longest_s)
        self._telemetry_retry_at = now + delay_s
        then = "keeping the last good routes" if self.records else "choosing without it"
        log.warning(
            "telemetry unavailable (%s); %s; retrying in %.0f s (%d failed in a row)",
            error,
            then,
            delay_s,
            self._telemetry_failures,
        )

    def _last_routes_ready(self, ready: Collection[str]) -> bool:
        """True when a round was armed and every client it routes is still ready."""
        return bool(self.records) and set(self.records[-1].selected) <= set(ready)

    def _keep_last_routes(self, server_round: int, started: float) -> ArmedRound:
        """Arm the round on the live routes: without telemetry, nothing is chosen."""
        last = self.records[-1]
        assignment = dict(self._slots[last.server_round])
        self._slots[server_round] = assignment
        record = dataclasses.replace(
            last,
            server_round=server_round,
            apply_s=time.monotonic() - started,
            served_waits_s=(),
            telemetry={},
            routing_note="no telemetry: the last good routes stay in place",
        )
        self.records.append(record)
        self.metrics.round_armed(record, self.clients)
        log.warning(
            "round %d: no telemetry; the round runs on routing version %s (%s)",
            server_round,
            last.routing_version,
            ", ".join(record.selected),
        )
        return ArmedRound(server_round, tuple(assignment), last.routing_version)

    def _apply(
        self,
        assignment: Mapping[int, str],
        weights: Mapping[str, int],
        version: str,
        ready: Collection[str],
    ) -> tuple[str, list[float]]:
        """Route the assignment; the version that serves it and each step's wait.

        When the live routes already serve the assignment nothing is written, and
        the live version stands.
        """
        try:
            live_vs, live_dr = self._backend.read()
            _report_invalid(live_vs, live_dr)
            options = {
                "routing_version": version,
                "live_vs": live_vs,
                "live_dr": live_dr,
                "namespace": self._namespace,
                "budget_bytes": self._budget_bytes,
            }
            if self.mode == "weighted":
                desired_vs, desired_dr = render.render_weighted(weights, **options)
            else:
                desired_vs, desired_dr = render.render_exact(assignment, **options)
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


def _report_invalid(live_vs: dict | None, live_dr: dict | None) -> None:
    """Say what is wrong with the live objects; rendering then refuses user errors.

    meshctl replaces its own routes and subsets whole, so a broken owned route
    is rewritten; a broken user route (several destinations and no weights,
    say) is never read as anything and makes the round keep the last routes.
    """
    live = [obj for obj in (live_vs, live_dr) if obj is not None]
    for problem in validate.validate_objects(live, source="live"):
        log.warning("invalid live routing object: %s", problem)


def routing_version(
    server_round: int,
    assignment: Mapping[int, str],
    weights: Mapping[str, int] | None = None,
) -> str:
    """A short version that names the round and the slot map (or weights) it routes."""
    text = ",".join(f"{slot}={client}" for slot, client in sorted(assignment.items()))
    if weights:
        text += ";" + ",".join(f"{c}={w}" for c, w in sorted(weights.items()))
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"r{server_round}-{digest}"
