"""The controller's own metrics, in Prometheus' exposition format.

What an operator watches the controller by: how long arming a round takes, how
often the routes change, what fails (telemetry, routing), how many clients are
in each telemetry state, and which clients the routes serve with which weight;
and, when the FL server reports its rounds, the training's own series (the
round, the model's metrics, the round's duration and its stragglers).
Each :class:`ControllerMetrics` has its own registry, so two controllers in one
process (as in tests) never share a series.  The round API serves it on
``GET /metrics``.
"""

from __future__ import annotations

import math
from collections import Counter as Tally
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily

from meshctl.table import STATES, TelemetryTable
from meshctl.types import ClientState, ClientTelemetry

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Exact mode routes a slot's whole traffic to one client.
EXACT_ROUTE_WEIGHT = 100
SLOT_STATUSES = ("ok", "error", "timeout", "lost")
CYCLE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RoundLike(Protocol):
    """What the metrics read of a round's record (the cycle's ``RoundRecord``)."""

    server_round: int
    selected: Sequence[str]
    routing_version: str
    apply_s: float
    scores: Mapping[str, float]
    telemetry: Mapping[str, ClientTelemetry]
    weights: Mapping[str, int]


class ControllerMetrics:
    """The controller's metrics and the registry that holds them."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.cycle_seconds = Histogram(
            "meshctl_controller_cycle_seconds",
            "Seconds to arm a round: telemetry, policy, routing applied and served.",
            buckets=CYCLE_BUCKETS_S,
            registry=r,
        )
        self.routing_changes = Counter(
            "meshctl_controller_routing_changes",
            "Rounds whose routing version differs from the round before.",
            registry=r,
        )
        self.failures = Counter(
            "meshctl_controller_failures",
            "Failures by stage (telemetry, routing); the last good routes stayed.",
            ["stage"],
            registry=r,
        )
        self.clients = Gauge(
            "meshctl_controller_clients",
            "Clients in each telemetry state at the last armed round.",
            ["state"],
            registry=r,
        )
        self._per_client = _PerClientSeries()
        r.register(self._per_client)
        self.server_round = Gauge(
            "meshctl_controller_round",
            "The last round the controller armed.",
            registry=r,
        )
        self._training_metrics()
        self._last_version: str | None = None
        for state in ClientState:
            self.clients.labels(state.value)
        for stage in ("telemetry", "routing"):
            self.failures.labels(stage)

    def round_armed(self, record: RoundLike, clients: Sequence[str]) -> None:
        """Update every series from one armed round's record."""
        self.cycle_seconds.observe(record.apply_s)
        self.server_round.set(record.server_round)
        if self._last_version not in (None, record.routing_version):
            self.routing_changes.inc()
        self._last_version = record.routing_version

        states = TelemetryTable.of(record.telemetry).state_of(clients)
        counts = np.bincount(states, minlength=len(STATES))
        for state, count in zip(STATES, counts.tolist(), strict=True):
            self.clients.labels(state.value).set(count)
        self._per_client.record, self._per_client.clients = record, tuple(clients)

    def _training_metrics(self) -> None:
        """The FL server's view of each round, set when the server reports it."""
        r = self.registry
        self.training_round = Gauge(
            "meshctl_training_round",
            "The last round the FL server evaluated.",
            registry=r,
        )
        self.training_metric = Gauge(
            "meshctl_training_metric",
            "The global model's test metrics after the last evaluated round.",
            ["metric"],
            registry=r,
        )
        self.training_round_seconds = Gauge(
            "meshctl_training_round_seconds",
            "Wall seconds the last round took, from arming to evaluation.",
            registry=r,
        )
        self.training_round_slots = Gauge(
            "meshctl_training_round_slots",
            "The last round's slots by outcome (timeout: stragglers).",
            ["status"],
            registry=r,
        )
        for status in SLOT_STATUSES:
            self.training_round_slots.labels(status)

    def round_evaluated(
        self,
        server_round: int,
        metrics: Mapping[str, float],
        *,
        round_s: float,
        slot_statuses: Sequence[str],
    ) -> None:
        """Record what the FL server saw of a round: metrics, duration, slots."""
        self.training_round.set(server_round)
        for name, value in metrics.items():
            if math.isfinite(value):
                self.training_metric.labels(name).set(value)
        self.training_round_seconds.set(round_s)
        tally = Tally(slot_statuses)
        for status in {*SLOT_STATUSES, *tally}:
            self.training_round_slots.labels(status).set(tally.get(status, 0))

    def failed(self, stage: str) -> None:
        """Count one failure of ``stage`` (``telemetry`` or ``routing``)."""
        self.failures.labels(stage).inc()

    def exposition(self) -> bytes:
        """Every series in Prometheus' text format."""
        return generate_latest(self.registry)


class _PerClientSeries:
    """The per-client series, read from the last armed round when scraped.

    A collector rather than gauges set every round: a round's cost does not
    grow with the clients' series, which a hundred thousand clients would make
    a second per round; Prometheus pays for them when it scrapes.
    """

    def __init__(self) -> None:
        self.record: RoundLike | None = None
        self.clients: tuple[str, ...] = ()

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        selected, weight, score = self._families()
        record = self.record
        if record is not None:
            slots = Tally(record.selected)
            for client in self.clients:
                routed = record.weights.get(client)
                if routed is None:
                    routed = EXACT_ROUTE_WEIGHT * slots.get(client, 0)
                selected.add_metric([client], 1 if client in slots else 0)
                weight.add_metric([client], routed)
                value = record.scores.get(client)
                if value is not None and math.isfinite(value):
                    score.add_metric([client], value)
        yield from (selected, weight, score)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "meshctl_controller_client_selected",
                "1 when the live routes serve the client, else 0.",
                labels=["client"],
            ),
            GaugeMetricFamily(
                "meshctl_controller_client_weight",
                "The client's route weight (100 per slot in exact mode).",
                labels=["client"],
            ),
            GaugeMetricFamily(
                "meshctl_controller_client_score",
                "The policy's score of the client at the last armed round.",
                labels=["client"],
            ),
        )
