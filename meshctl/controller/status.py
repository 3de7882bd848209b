"""What ``meshctl status`` shows: the clients, their states and the live routes.

The clients are the FL client pods with their readiness, from the API server;
their states come from Prometheus when a source is given; the selection, the
weights and the routing version come from the live VirtualService (the routes
named ``meshctl-*`` and the annotation ``meshctl.io/routing-version``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

from meshctl import protocol
from meshctl.backends.cluster import ClusterBackend, ClusterBackendError
from meshctl.controller.cycle import TelemetrySource
from meshctl.kube import errors as kube_errors
from meshctl.routing import render

OUTPUTS = ("table", "json", "yaml")


class StatusError(RuntimeError):
    """The API server could not be read; ``kube_error`` says how."""

    def __init__(self, message: str, kube_error: kube_errors.KubeError | None):
        super().__init__(message)
        self.kube_error = kube_error


@dataclass(frozen=True)
class ClusterStatus:
    """The FL namespace as meshctl sees it."""

    namespace: str
    routing_version: str | None
    pods: Mapping[str, bool]
    slots: Mapping[int, str] = field(default_factory=dict)
    weights: Mapping[str, int] = field(default_factory=dict)
    states: Mapping[str, str] = field(default_factory=dict)

    def document(self) -> dict:
        """The machine-readable answer."""
        slot_of = {client: slot for slot, client in self.slots.items()}
        clients = sorted(set(self.pods) | set(self.slots.values()) | set(self.weights))
        return {
            "namespace": self.namespace,
            "routing_version": self.routing_version,
            "mode": "weighted" if self.weights else "exact" if self.slots else "none",
            "slots": {str(s): c for s, c in sorted(self.slots.items())},
            "weights": dict(sorted(self.weights.items())),
            "clients": [
                {
                    "client": client,
                    "ready": self.pods.get(client),
                    "state": self.states.get(client),
                    "selected": client in slot_of or client in self.weights,
                    "slot": slot_of.get(client),
                    "weight": self.weights.get(client),
                }
                for client in clients
            ],
        }


def read_status(
    backend: ClusterBackend,
    telemetry: TelemetrySource | None = None,
    *,
    window_s: float = 300.0,
) -> ClusterStatus:
    """Read the pods and the live routes, and the states if ``telemetry`` is given."""
    try:
        pods = backend.client_pods()
        live_vs, _ = backend.read()
    except (kube_errors.KubeError, ClusterBackendError) as exc:
        cause = exc if isinstance(exc, kube_errors.KubeError) else exc.kube_error
        raise StatusError(str(exc), cause) from exc
    states = {}
    if telemetry is not None:
        states = {c: str(t.state) for c, t in telemetry.read(window_s).items()}
    slots, weights = render.routed_clients(live_vs)
    annotations = ((live_vs or {}).get("metadata") or {}).get("annotations") or {}
    return ClusterStatus(
        namespace=backend.namespace,
        routing_version=annotations.get(protocol.ROUTING_VERSION_ANNOTATION),
        pods=pods,
        slots=slots,
        weights=weights,
        states=states,
    )


def render_status(status: ClusterStatus, output: str) -> str:
    """The answer as ``table``, ``json`` or ``yaml`` text."""
    doc = status.document()
    if output == "json":
        return json.dumps(doc, indent=2)
    if output == "yaml":
        return yaml.safe_dump(doc, sort_keys=False)
    if output != "table":
        raise ValueError(f"-o must be one of {', '.join(OUTPUTS)}, not {output!r}")
    rows = [("CLIENT", "READY", "STATE", "SELECTED", "SLOT", "WEIGHT")]
    for item in doc["clients"]:
        rows.append(
            tuple(
                "-" if item[k] is None else str(item[k]).lower()
                for k in ("client", "ready", "state", "selected", "slot", "weight")
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    lines.append(
        f"namespace {status.namespace}: routing version "
        f"{status.routing_version or '-'} ({doc['mode']})"
    )
    return "\n".join(lines)
