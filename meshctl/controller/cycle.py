"""The controller's cycle: telemetry, policy, routing plan, apply.

One cycle arms one round: it reads what the mesh saw of every client over the
window, lets the policy choose, renders the routes for the chosen clients, and
applies them in make-before-break order through the backend, waiting for the
data plane after each step.  It answers with the slots only once the final
routes are served.  Feedback from the server on each slot is kept, under the
client's name, for the policy's next decision.

With a ``state_path`` the controller survives a restart: after each armed
round and each round's feedback it saves its state (see
:mod:`meshctl.controller.state`), and a new controller on the same file takes
it up without writing any route: the data plane serves the last routes
throughout, feedback for the round armed before the restart is put under the
right clients, and the next round plans from the live objects.
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
from pathlib import Path
from typing import Protocol

from meshctl.controller import state
from meshctl.controller.metrics import ControllerMetrics
from meshctl.policies import Policy, Selection, SelectionInput
from meshctl.protocol import ROUTING_VERSION_ANNOTATION
from meshctl.routing import plan, render, validate
from meshctl.routing.errors import RoutingError
from meshctl.routing.hysteresis import Decision, Hysteresis, HysteresisState
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


# Records that keep their per-client detail: the round armed and the one before.
_DETAILED_RECORDS = 2


class ArmError(RuntimeError):
    """A round could not be armed; the routes in place stay as they were."""


@dataclass(frozen=True)
class RoundRecord:
    """What the controller decided for one round, and how long applying took.

    ``scores``, ``reasons`` and ``telemetry`` hold one entry per client; the
    controller keeps them for its last two records only.
    """

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

    ``state_path`` names the state file the controller saves after each arm
    and each feedback, and recovers from when it exists.  A file that cannot be
    used raises :class:`~meshctl.controller.state.ControllerStateError` (the
    controller refuses to start); with ``discard_bad_state`` the file is set
    aside, a warning says so, and the controller starts fresh.  Each client
    keeps its last ``history_limit`` feedback outcomes, in memory and on file.
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
        state_path: str | Path | None = None,
        discard_bad_state: bool = False,
        history_limit: int = state.DEFAULT_HISTORY_LIMIT,
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
        if history_limit < 1:
            raise ValueError(f"history_limit must be >= 1, not {history_limit}")
        self._history_limit = history_limit
        self._store = state.StateStore(state_path) if state_path is not None else None
        self._save_policy_memory = True
        # Set when a restart found live routes other than the saved ones: the
        # last round's routes cannot be kept blindly until a round is applied.
        self._routes_unknown = False
        if self._store is not None:
            self._store.check_writable()
            self._recover(self._store, discard_bad_state)

    @property
    def state_path(self) -> Path | None:
        """The state file, or None when the controller keeps no state."""
        return self._store.path if self._store is not None else None

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
                self._routes_unknown = False
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
                telemetry=telemetry,
                weights=weights,
                routing_note=note,
            )
            self._keep(record)
            self.metrics.round_armed(record, self.clients)
            self._save()
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
                history = self._history[client]
                history.append(item)
                del history[: -self._history_limit]
                feedback.append(item)
            self._save()
            return feedback

    def _keep(self, record: RoundRecord) -> None:
        """Add the round's record; older records keep their decision, not the
        per-client detail (scores, reasons, telemetry), so that memory does
        not grow with rounds times clients."""
        self.records.append(record)
        del self.records[: -state.DEFAULT_ROUNDS_KEPT]
        if len(self.records) > _DETAILED_RECORDS:
            older = self.records[-_DETAILED_RECORDS - 1]
            self.records[-_DETAILED_RECORDS - 1] = dataclasses.replace(
                older, scores={}, reasons={}, telemetry={}
            )

    def assignment(self, server_round: int) -> Mapping[int, str]:
        """The slot-to-client map of an armed round."""
        return dict(self._slots.get(server_round, {}))

    # -- the state file: save after each change, recover at start

    def _save(self) -> None:
        """Write the state file; a failed write is logged and the round goes on."""
        if self._store is None:
            return
        kept = self.records[-state.DEFAULT_ROUNDS_KEPT :]
        saved = state.ControllerState(
            history={c: list(f) for c, f in self._history.items()},
            slots={
                r.server_round: dict(self._slots[r.server_round])
                for r in kept
                if r.server_round in self._slots
            },
            rounds=[_summary(r) for r in kept],
            hysteresis=self._hysteresis.state(),
            rng_state=self._rng.getstate(),
            policy_name=self.policy.name,
            policy_memory=self._policy_memory(),
            saved_at_unix=time.time(),
        )
        try:
            self._store.save(saved)
        except (OSError, TypeError, ValueError) as exc:  # the round itself stands
            last = f"round {kept[-1].server_round}" if kept else "the feedback"
            log.error(
                "cannot write the controller state to %s (%s); the controller goes "
                "on, but a restart now would not know %s",
                self._store.path,
                exc,
                last,
            )

    def _policy_memory(self) -> dict | None:
        """The policy's learnt attributes as JSON data, or None if unsavable."""
        if not self._save_policy_memory:
            return None
        try:
            return state.policy_memory(self.policy)
        except state.PolicyMemoryMismatch as exc:
            self._save_policy_memory = False
            log.warning(
                "policy %s: what it learnt cannot be saved (%s); after a restart it "
                "relearns from the feedback history",
                self.policy.name,
                exc,
            )
            return None

    def _recover(self, store: state.StateStore, discard_bad_state: bool) -> None:
        """Take up the saved state, if any, then check it against the live routes."""
        try:
            saved = store.load()
            if saved is not None:
                self._restore(saved, store.path)
        except state.ControllerStateError as exc:
            if not discard_bad_state:
                raise
            aside = store.set_aside()
            log.warning(
                "%s; the file is set aside as %s and the controller starts fresh: "
                "the policy relearns, and feedback of the round in flight is dropped",
                exc,
                aside,
            )
            return
        if saved is None:
            log.info("no controller state at %s yet: starting fresh", store.path)
            return
        self._check_live_routes()

    def _restore(self, saved: state.ControllerState, path: Path) -> None:
        """Put the saved state in place; nothing changes if the state is bad."""
        memory_note = self._restore_policy_memory(saved, path)
        self._history = defaultdict(
            list, {c: list(f)[-self._history_limit :] for c, f in saved.history.items()}
        )
        self._slots = {r: dict(slots) for r, slots in saved.slots.items()}
        self.records = [_record(summary) for summary in saved.rounds]
        downtime_s = max(0.0, time.time() - saved.saved_at_unix)
        hysteresis = saved.hysteresis
        if hysteresis.age_s is not None:
            age_s = hysteresis.age_s + downtime_s
            hysteresis = dataclasses.replace(hysteresis, age_s=age_s)
        self._hysteresis.restore(hysteresis)
        self._rng.setstate(saved.rng_state)
        log.info(
            "recovered the controller state from %s: %d round(s) (last %s), "
            "feedback of %d client(s), %s",
            path,
            len(self.records),
            self.records[-1].server_round if self.records else "none",
            len(self._history),
            memory_note,
        )

    def _restore_policy_memory(self, saved: state.ControllerState, path: Path) -> str:
        """Restore what the policy learnt; what happened, for the log line."""
        if saved.policy_memory is None:
            return "no policy memory saved"
        if saved.policy_name != self.policy.name:
            log.warning(
                "%s was saved with policy %s; policy %s starts without memory and "
                "learns from the feedback history",
                path,
                saved.policy_name,
                self.policy.name,
            )
            return "policy memory left out"
        try:
            state.restore_policy_memory(self.policy, saved.policy_memory, path)
        except state.PolicyMemoryMismatch as exc:
            log.warning(
                "%s: the saved memory of policy %s does not fit it (%s); it "
                "relearns from the feedback history",
                path,
                self.policy.name,
                exc,
            )
            return "policy memory left out"
        return f"policy {self.policy.name} memory restored"

    def _check_live_routes(self) -> None:
        """Compare the live VirtualService with the last round; the live one wins.

        When they differ (routes applied by hand, or a crash between an apply
        and its save), the next round plans from the live routes and holds
        them against the hysteresis; it does not keep them blindly without
        telemetry.  Feedback of the saved round still goes to the clients the
        round was armed with.
        """
        if not self.records:
            return
        last = self.records[-1]
        try:
            live_vs, _ = self._backend.read()
        except Exception as exc:  # the next round reads the live objects again
            log.warning(
                "cannot read the live routes to check the recovered round %d (%s); "
                "the next round plans from what it reads then",
                last.server_round,
                exc,
            )
            return
        slots, weights = render.routed_clients(live_vs)
        annotations = ((live_vs or {}).get("metadata") or {}).get("annotations") or {}
        version = str(annotations.get(ROUTING_VERSION_ANNOTATION, "unversioned"))
        positive = {c: w for c, w in weights.items() if w > 0}
        if self.mode == "exact":
            agrees = slots == self._slots.get(last.server_round)
        else:
            agrees = positive == {c: w for c, w in last.weights.items() if w > 0}
        if agrees and version == last.routing_version:
            log.info(
                "round %d: the live routes serve routing version %s, as saved",
                last.server_round,
                version,
            )
            return
        self._routes_unknown = True
        live = tuple(client for _, client in sorted(slots.items())) or tuple(
            sorted(positive)
        )
        if live:
            self._hysteresis.restore(HysteresisState(live, positive or None, 0.0))
            now = f"moved on to routing version {version} ({', '.join(live)})"
        else:
            self._hysteresis.restore(HysteresisState(None, None, None))
            now = "hold no meshctl route"
        log.warning(
            "round %d was saved with routing version %s, but the live routes %s; "
            "the live routes win: the next round plans from them (its feedback "
            "still goes to the clients it was armed with)",
            last.server_round,
            last.routing_version,
            now,
        )

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
        if not self.records or self._routes_unknown:
            return False
        return set(self.records[-1].selected) <= set(ready)

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
        self._keep(record)
        self.metrics.round_armed(record, self.clients)
        self._save()
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


def _summary(record: RoundRecord) -> state.RoundSummary:
    """What the state file keeps of a round."""
    return state.RoundSummary(
        server_round=record.server_round,
        selected=record.selected,
        routing_version=record.routing_version,
        weights=dict(record.weights),
        routing_note=record.routing_note,
    )


def _record(summary: state.RoundSummary) -> RoundRecord:
    """A recovered round: what was decided, without what it was decided from."""
    return RoundRecord(
        server_round=summary.server_round,
        selected=summary.selected,
        routing_version=summary.routing_version,
        apply_s=0.0,
        weights=dict(summary.weights),
        routing_note=summary.routing_note,
    )


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
