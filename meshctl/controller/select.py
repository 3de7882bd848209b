"""One selection cycle against a cluster: ``meshctl select``.

The cycle is the controller's own (``Controller.arm``): telemetry from
Prometheus, the policy's choice, the routes rendered onto the live objects and
applied through the cluster backend in make-before-break order.  A cluster has
no "served" signal for a route, so each step is followed by a settle time.
With ``dry_run`` nothing is written: the answer carries a unified diff of the
live objects' YAML against the desired ones.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import yaml

from meshctl.backends.cluster import ClusterBackend, ClusterBackendError
from meshctl.controller.cycle import ArmError, Controller, TelemetrySource
from meshctl.kube import errors as kube_errors
from meshctl.policies import Policy
from meshctl.protocol import ROUTING_VERSION_ANNOTATION
from meshctl.routing import plan, validate
from meshctl.types import ClientTelemetry

OUTPUTS = ("table", "json", "yaml")
DEFAULT_SETTLE_S = 5.0
_SERVER_FIELDS = ("resourceVersion", "uid", "managedFields", "creationTimestamp")
_ROUND_OF_VERSION = re.compile(r"^r(\d+)-")


class SelectError(RuntimeError):
    """A selection cycle failed; ``kube_error`` is the API server's answer, if any."""

    def __init__(self, message: str, kube_error: kube_errors.KubeError | None = None):
        super().__init__(message)
        self.kube_error = kube_error


@dataclass(frozen=True)
class SelectResult:
    """What one cycle chose and what it wrote (or would write)."""

    server_round: int
    slots: Mapping[int, str]
    weights: Mapping[str, int]
    routing_version: str
    states: Mapping[str, str]
    scores: Mapping[str, float]
    reasons: Mapping[str, str]
    steps: tuple[str, ...]
    applied: bool
    diff: str = ""
    note: str = ""
    telemetry: Mapping[str, ClientTelemetry] = field(default_factory=dict)

    def document(self) -> dict:
        """The machine-readable answer: plain JSON types, no NaN."""
        return {
            "server_round": self.server_round,
            "routing_version": self.routing_version,
            "applied": self.applied,
            "slots": {str(k): v for k, v in sorted(self.slots.items())},
            "weights": dict(sorted(self.weights.items())),
            "clients": [
                {
                    "client": client,
                    "state": self.states.get(client),
                    "score": _finite(self.scores.get(client)),
                    "selected": client in self.slots.values() or client in self.weights,
                    "reason": self.reasons.get(client),
                }
                for client in sorted(set(self.states) | set(self.scores))
            ],
            "steps": list(self.steps),
            "note": self.note,
            "diff": self.diff,
        }


class PodView:
    """The client pods as last listed: every name, and the ready ones."""

    def __init__(self, backend: ClusterBackend) -> None:
        self._backend = backend
        self._lock = threading.Lock()
        self.names: tuple[str, ...] = ()
        self._ready: frozenset[str] = frozenset()

    def refresh(self) -> tuple[str, ...]:
        """List the pods once; their names, sorted."""
        pods = self._backend.client_pods()
        with self._lock:
            self.names = tuple(sorted(pods))
            self._ready = frozenset(name for name, ready in pods.items() if ready)
        return self.names

    def ready(self) -> frozenset[str]:
        """The pods that were ready at the last ``refresh``."""
        with self._lock:
            return self._ready


class PlanRecorder:
    """A routing backend that reads the cluster and records the plan; no writes."""

    def __init__(self, backend: ClusterBackend) -> None:
        self._backend = backend
        self.steps: list[plan.Step] = []

    def read(self) -> tuple[dict | None, dict | None]:
        return self._backend.read()

    def apply_plan(
        self, steps: Sequence[plan.Step], wait: Callable[[plan.Step], float]
    ) -> list[float]:
        self.steps = list(steps)
        return []


class _FixedTelemetry:
    """The telemetry read once before the cycle, handed to the controller."""

    def __init__(self, telemetry: Mapping[str, ClientTelemetry]) -> None:
        self._telemetry = telemetry

    def read(self, window_s: float) -> Mapping[str, ClientTelemetry]:
        return self._telemetry


def settle_wait(settle_s: float, stop: threading.Event | None = None):
    """A step wait for a cluster: sleep ``settle_s`` (cut short by ``stop``)."""
    stop = stop or threading.Event()

    def wait(step: plan.Step) -> float:
        started = time.monotonic()
        if settle_s > 0:
            stop.wait(settle_s)
        return time.monotonic() - started

    return wait


def select_once(
    backend: ClusterBackend,
    source: TelemetrySource,
    policy: Policy,
    *,
    per_round: int,
    window_s: float = 300.0,
    settle_s: float = DEFAULT_SETTLE_S,
    dry_run: bool = False,
    server_round: int | None = None,
    mode: str = "exact",
    seed: int = 0,
) -> SelectResult:
    """Run one cycle; telemetry errors propagate as the source raises them.

    The cluster is read first, so an unreachable API server fails before any
    Prometheus query is sent.
    """
    pods = PodView(backend)
    try:
        clients = pods.refresh()
        live_vs, live_dr = backend.read()
    except (kube_errors.KubeError, ClusterBackendError) as exc:
        raise SelectError(str(exc), _kube_error(exc)) from exc
    telemetry = source.read(window_s)
    if server_round is None:
        server_round = next_round(live_vs)

    recorder = PlanRecorder(backend)
    controller = Controller(
        clients=clients,
        policy=policy,
        telemetry=_FixedTelemetry(telemetry),
        backend=recorder if dry_run else backend,
        wait=settle_wait(settle_s),
        ready=pods.ready,
        window_s=window_s,
        seed=seed,
        namespace=backend.namespace,
        mode=mode,
    )
    try:
        controller.arm(server_round, per_round)
    except ArmError as exc:
        raise SelectError(str(exc), _kube_error(exc)) from exc
    record = controller.records[-1]
    steps = recorder.steps if dry_run else []
    return SelectResult(
        server_round=server_round,
        slots=controller.assignment(server_round) if mode == "exact" else {},
        weights=dict(record.weights),
        routing_version=record.routing_version,
        states={c: str(t.state) for c, t in telemetry.items()},
        scores=dict(record.scores),
        reasons=dict(record.reasons),
        steps=tuple(f"{s.kind}: {s.reason}" for s in steps)
        or tuple(f"step waited {w:.1f} s" for w in record.served_waits_s),
        applied=not dry_run,
        diff=plan_diff(live_vs, live_dr, steps) if dry_run else "",
        note=record.routing_note,
        telemetry=telemetry,
    )


def next_round(live_vs: Mapping | None) -> int:
    """One after the round the live routing version names, else 1."""
    annotations = ((live_vs or {}).get("metadata") or {}).get("annotations") or {}
    found = _ROUND_OF_VERSION.match(annotations.get(ROUTING_VERSION_ANNOTATION, ""))
    return int(found.group(1)) + 1 if found else 1


def plan_diff(
    live_vs: dict | None, live_dr: dict | None, steps: Sequence[plan.Step]
) -> str:
    """A unified diff of the live objects' YAML against the plan's final objects."""
    live = {validate.VIRTUAL_SERVICE: live_vs, validate.DESTINATION_RULE: live_dr}
    final = {step.kind: step.obj for step in steps}
    chunks = []
    for kind in (validate.DESTINATION_RULE, validate.VIRTUAL_SERVICE):
        if kind not in final:
            continue
        before, after = live[kind], final[kind]
        label = validate.object_label(after)
        chunks.extend(
            difflib.unified_diff(
                _yaml_lines(before),
                _yaml_lines(after),
                fromfile=f"live/{label}",
                tofile=f"desired/{label}",
            )
        )
    return "".join(chunks)


def render(result: SelectResult, output: str) -> str:
    """The answer as ``table``, ``json`` or ``yaml`` text."""
    if output == "json":
        return json.dumps(result.document(), indent=2, allow_nan=False)
    if output == "yaml":
        return yaml.safe_dump(result.document(), sort_keys=False)
    if output != "table":
        raise ValueError(f"-o must be one of {', '.join(OUTPUTS)}, not {output!r}")
    doc = result.document()
    slot_of = {client: slot for slot, client in result.slots.items()}
    rows = [("CLIENT", "STATE", "SCORE", "SLOT", "WEIGHT", "REASON")]
    for item in doc["clients"]:
        client = item["client"]
        score = item["score"]
        rows.append(
            (
                client,
                item["state"] or "-",
                "-" if score is None else f"{score:.4g}",
                str(slot_of.get(client, "-")),
                str(result.weights.get(client, "-")),
                item["reason"] or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    verb = "applied" if result.applied else "would apply (dry run)"
    lines.append(
        f"round {result.server_round}: routing version {result.routing_version} "
        f"{verb}; {len(result.steps)} step(s)"
    )
    return "\n".join(lines)


def _yaml_lines(obj: Mapping | None) -> list[str]:
    if obj is None:
        return []
    shown = copy.deepcopy(dict(obj))
    meta = shown.get("metadata") or {}
    for key in (*_SERVER_FIELDS, "generation"):
        meta.pop(key, None)
    return yaml.safe_dump(shown, sort_keys=True).splitlines(keepends=True)


def _kube_error(exc: BaseException | None) -> kube_errors.KubeError | None:
    """The API server's error somewhere in ``exc``'s chain of causes."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kube_errors.KubeError):
            return exc
        found = getattr(exc, "kube_error", None)
        if isinstance(found, kube_errors.KubeError):
            return found
        exc = exc.__cause__ or exc.__context__
    return None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
