"""Per-client telemetry from Envoy's own statistics."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from meshctl import protocol
from meshctl.localmesh.envoy import STATS_FLUSH_INTERVAL_S, LocalMesh
from meshctl.telemetry import envoystats
from meshctl.telemetry.envoystats import ClientCounters, EnvoyStatsSource, Snapshot
from meshctl.types import ClientState
from tests.conftest import Backend

BOUNDS = (5.0, 10.0, 25.0, 50.0, 100.0, 250.0, float("inf"))


def counters(
    total: int, ok: int, failed: int, latencies_ms: list[float]
) -> ClientCounters:
    """Cumulative counters for requests with the given latencies."""
    buckets = tuple((b, sum(1 for x in latencies_ms if x <= b)) for b in BOUNDS)
    classes = {"2": ok, "5": failed}
    return ClientCounters(total, classes, buckets, len(latencies_ms))


def snapshot(at: float, **clients: ClientCounters) -> Snapshot:
    """A synthetic snapshot."""
    return Snapshot(taken_at=at, clients=clients)


# ------------------------------------------------------------- synthetic data


def test_window_computes_rates_ratios_and_quantiles() -> None:
    older = snapshot(100.0, **{"c-00": counters(10, 10, 0, [1.0] * 10)})
    newer = snapshot(
        110.0, **{"c-00": counters(30, 25, 5, [1.0] * 10 + [7.0] * 10 + [30.0] * 10)}
    )

    (telemetry,) = envoystats.window(older, newer).values()

    assert telemetry.client == "c-00"
    assert telemetry.state is ClientState.OBSERVED
    assert telemetry.requests == 20
    assert telemetry.requests_per_s == pytest.approx(2.0)
    assert telemetry.error_ratio == pytest.approx(0.25)
    # 20 new observations: 10 in (5, 10], 10 in (25, 50].
    assert telemetry.latency_p50_ms == pytest.approx(10.0)
    assert telemetry.latency_p95_ms == pytest.approx(25.0 + 25.0 * 0.9)


def test_a_client_without_requests_is_unobserved_with_no_numbers() -> None:
    same = counters(5, 5, 0, [1.0] * 5)

    (telemetry,) = envoystats.window(
        snapshot(0.0, **{"c-01": same}), snapshot(30.0, **{"c-01": same})
    ).values()

    assert telemetry.state is ClientState.UNOBSERVED
    assert telemetry.requests_per_s is None
    assert telemetry.error_ratio is None
    assert telemetry.latency_p50_ms is None
    assert telemetry.latency_p95_ms is None


def test_a_counter_that_went_down_is_a_reset() -> None:
    older = snapshot(0.0, **{"c-02": counters(100, 90, 10, [3.0] * 100)})
    newer = snapshot(10.0, **{"c-02": counters(4, 2, 2, [40.0] * 4)})

    (telemetry,) = envoystats.window(older, newer).values()

    assert envoystats.served_by(older, newer) == {"c-02": 4}
    assert telemetry.requests == 4
    assert telemetry.error_ratio == pytest.approx(0.5)
    assert telemetry.state is ClientState.FAILING
    assert 25.0 < telemetry.latency_p50_ms <= 50.0


def test_failing_threshold_is_a_parameter() -> None:
    older = snapshot(0.0, **{"c-03": counters(0, 0, 0, [])})
    newer = snapshot(10.0, **{"c-03": counters(10, 8, 2, [1.0] * 10)})

    lenient = envoystats.window(older, newer)["c-03"]
    strict = envoystats.window(older, newer, failing_ratio=0.2)["c-03"]

    assert lenient.state is ClientState.OBSERVED
    assert strict.state is ClientState.FAILING


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        pytest.param(0.5, [(10.0, 4), (20.0, 8), (float("inf"), 8)], 10.0, id="bound"),
        pytest.param(0.25, [(10.0, 4), (20.0, 8), (float("inf"), 8)], 5.0, id="first"),
        pytest.param(
            0.75, [(10.0, 4), (20.0, 8), (float("inf"), 8)], 15.0, id="second"
        ),
        pytest.param(0.9, [(10.0, 1), (20.0, 1), (float("inf"), 10)], 20.0, id="inf"),
        pytest.param(0.5, [(10.0, 0), (float("inf"), 0)], None, id="empty"),
    ],
)
def test_histogram_quantile_interpolates_like_prometheus(
    q: float, buckets: list[tuple[float, int]], expected: float | None
) -> None:
    assert envoystats.histogram_quantile(q, buckets) == expected


def test_prometheus_text_is_parsed_per_subset_of_the_host() -> None:
    c04 = 'envoy_cluster_name="outbound|80|c-04|fl-clients"'
    text = """\
# TYPE envoy_cluster_upstream_rq_total counter
envoy_cluster_upstream_rq_total{C04} 7
envoy_cluster_upstream_rq_total{envoy_cluster_name="outbound|80||fl-clients"} 9
envoy_cluster_upstream_rq_total{envoy_cluster_name="outbound|80|c-04|other"} 9
# TYPE envoy_cluster_upstream_rq_xx counter
envoy_cluster_upstream_rq_xx{envoy_response_code_class="2",C04} 6
envoy_cluster_upstream_rq_xx{envoy_response_code_class="5",C04} 1
# TYPE envoy_cluster_upstream_rq_time histogram
envoy_cluster_upstream_rq_time_bucket{C04,le="5"} 3
envoy_cluster_upstream_rq_time_bucket{C04,le="+Inf"} 7
envoy_cluster_upstream_rq_time_sum{C04} 70
envoy_cluster_upstream_rq_time_count{C04} 7
""".replace("C04", c04)

    parsed = envoystats.parse_prometheus(text)

    assert parsed == {
        "c-04": ClientCounters(
            requests_total=7,
            responses_by_class={"2": 6, "5": 1},
            latency_buckets=((5.0, 3), (float("inf"), 7)),
            latency_count=7,
        )
    }


def envoy_text(*clients: str, total: int = 7) -> str:
    """Envoy's own lines for ``clients``: totals (and a per-code one), classes,
    latency buckets and counts."""
    lines = []
    for client in clients:
        name = f'envoy_cluster_name="outbound|80|{client}|fl-clients"'
        lines += [
            f"envoy_cluster_upstream_rq_total{{{name}}} {total}",
            f'envoy_cluster_upstream_rq_total{{envoy_response_code="200",{name}}} 6',
            f'envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",{name}}} '
            f"{total - total // 7}",
            f'envoy_cluster_upstream_rq_xx{{envoy_response_code_class="5",{name}}} '
            f"{total // 7}",
            f'envoy_cluster_upstream_rq_time_bucket{{{name},le="5"}} {total * 3 // 7}',
            f'envoy_cluster_upstream_rq_time_bucket{{{name},le="+Inf"}} {total}',
            f"envoy_cluster_upstream_rq_time_count{{{name}}} {total}",
        ]
    return "\n".join(lines) + "\n"


def test_envoys_own_lines_give_every_subsets_counters() -> None:
    parsed = envoystats.parse_prometheus(envoy_text("c-06", "c-07"))

    assert parsed == {
        client: ClientCounters(
            requests_total=7,
            responses_by_class={"2": 6, "5": 1},
            latency_buckets=((5.0, 3), (float("inf"), 7)),
            latency_count=7,
        )
        for client in ("c-06", "c-07")
    }


@pytest.mark.parametrize(
    "odd_line",
    [
        pytest.param(
            'envoy_cluster_upstream_rq_total{envoy_cluster_name="outbound|80|c-09'
            '|fl-clients"} 9 1700000000000',
            id="timestamp",
        ),
        pytest.param(
            'envoy_cluster_upstream_rq_total{note="a \\"quoted\\" word",'
            'envoy_cluster_name="outbound|80|c-09|fl-clients"} 9',
            id="escaped-label",
        ),
        pytest.param(
            'envoy_cluster_upstream_rq_total{envoy_cluster_name="outbound|80|c-09'
            '|fl-clients"}\t9',
            id="tab",
        ),
    ],
)
def test_a_line_of_another_shape_is_read_as_any_exposition_line(odd_line) -> None:
    text = envoy_text("c-08") + odd_line + "\n"

    parsed = envoystats.parse_prometheus(text)

    assert parsed["c-09"] == ClientCounters(requests_total=9)
    assert parsed["c-08"] == envoystats.parse_prometheus(envoy_text("c-08"))["c-08"]


def test_a_restarted_envoy_counts_from_zero_again() -> None:
    older = Snapshot(0.0, envoystats.parse_prometheus(envoy_text("c-10", total=70)))
    newer = Snapshot(10.0, envoystats.parse_prometheus(envoy_text("c-10", total=7)))

    telemetry = envoystats.window(older, newer)["c-10"]

    # Every counter went down: the newer values are the increase.
    assert envoystats.served_by(older, newer) == {"c-10": 7}
    assert telemetry.requests == 7
    assert telemetry.error_ratio == pytest.approx(1 / 7)
    assert telemetry.latency_p95_ms == 5.0


# ----------------------------------------------------------------- real Envoy


def _slot_routes(assignment: dict[int, str]) -> list[dict]:
    """Exact-mode routes for ``assignment`` with no retries."""
    return [
        {
            "name": protocol.slot_route_name(slot),
            "match": [{"headers": {protocol.SLOT_HEADER: {"exact": str(slot)}}}],
            "route": [{"destination": {"host": "fl-clients", "subset": client}}],
            "retries": {"attempts": 0},
        }
        for slot, client in assignment.items()
    ]


def _objects(assignment: dict[int, str]) -> tuple[dict, dict]:
    """A VirtualService and DestinationRule routing ``assignment``."""
    metadata = {
        "name": "fl-clients",
        "namespace": "fl",
        "annotations": {protocol.ROUTING_VERSION_ANNOTATION: "t1"},
    }
    vs = {
        "metadata": metadata,
        "spec": {"hosts": ["fl-clients"], "http": _slot_routes(assignment)},
    }
    subsets = [
        {"name": client, "labels": {protocol.CLIENT_LABEL: client}}
        for client in assignment.values()
    ]
    dr = {"metadata": metadata, "spec": {"host": "fl-clients", "subsets": subsets}}
    return vs, dr


@pytest.fixture
def traffic_mesh(
    http_backends: Callable[..., Backend], local_mesh: Callable[..., LocalMesh]
) -> LocalMesh:
    """A mesh with a healthy, a half-failing, a slow and an idle client."""
    backends = [
        http_backends("c-00"),
        http_backends("c-01", fail_every=2),
        http_backends("c-02", delay_s=0.2),
        http_backends("c-03"),
    ]
    mesh = local_mesh([backend.workload for backend in backends])
    mesh.sync(*_objects({1: "c-00", 2: "c-01", 3: "c-02", 4: "c-03"}))
    return mesh


def _send(mesh: LocalMesh, per_slot: dict[int, int]) -> None:
    """Send ``per_slot[slot]`` requests to each slot."""
    with httpx.Client(
        base_url=mesh.listen_url, headers={"host": "fl-clients"}
    ) as client:
        for slot, count in per_slot.items():
            for _ in range(count):
                client.post(
                    protocol.MESSAGE_PATH, headers={protocol.SLOT_HEADER: str(slot)}
                )


@pytest.mark.envoy
def test_served_by_counts_exactly_the_requests_sent_without_waiting(
    traffic_mesh: LocalMesh,
) -> None:
    source = EnvoyStatsSource(traffic_mesh.admin_url)
    before = source.snapshot()

    _send(traffic_mesh, {1: 7, 2: 4, 3: 2})

    # Counters are live in the admin interface: no wait for a stats flush.
    assert source.served_by(before, source.snapshot()) == {
        "c-00": 7,
        "c-01": 4,
        "c-02": 2,
    }


@pytest.mark.envoy
def test_window_reports_errors_latency_and_idle_clients(
    traffic_mesh: LocalMesh,
) -> None:
    source = EnvoyStatsSource(traffic_mesh.admin_url)
    before = source.snapshot()

    _send(traffic_mesh, {1: 20, 2: 20, 3: 8})
    # Histograms are merged at each stats flush: wait for one after the traffic.
    time.sleep(STATS_FLUSH_INTERVAL_S * 1.5)
    telemetry = source.window(before, source.snapshot())

    healthy, failing, slow, idle = (
        telemetry[c] for c in ("c-00", "c-01", "c-02", "c-03")
    )
    assert healthy.state is ClientState.OBSERVED
    assert healthy.error_ratio == 0.0
    assert healthy.requests == 20
    assert failing.state is ClientState.FAILING
    assert failing.error_ratio == pytest.approx(0.5)
    assert slow.latency_p95_ms is not None and slow.latency_p95_ms >= 150.0
    assert healthy.latency_p95_ms is not None and healthy.latency_p95_ms < 150.0
    assert idle.state is ClientState.UNOBSERVED
    assert (idle.requests_per_s, idle.error_ratio, idle.latency_p50_ms) == (None,) * 3


@pytest.mark.envoy
def test_read_uses_the_oldest_snapshot_within_the_window(
    traffic_mesh: LocalMesh,
) -> None:
    source = EnvoyStatsSource(traffic_mesh.admin_url)

    first = source.read(window_s=60)
    _send(traffic_mesh, {1: 5})
    second = source.read(window_s=60)

    assert {t.state for t in first.values()} == {ClientState.UNOBSERVED}
    assert second["c-00"].requests == 5
    assert second["c-01"].state is ClientState.UNOBSERVED


@pytest.mark.envoy
def test_reads_further_apart_than_the_window_still_cover_the_traffic(
    traffic_mesh: LocalMesh,
) -> None:
    source = EnvoyStatsSource(traffic_mesh.admin_url)
    source.read(window_s=0.05)

    _send(traffic_mesh, {1: 3})
    time.sleep(0.1)
    telemetry = source.read(window_s=0.05)

    assert telemetry["c-00"].requests == 3
    assert telemetry["c-00"].requests_per_s is not None


@pytest.mark.envoy
def test_envoys_own_stats_text_is_read_in_one_pass(traffic_mesh: LocalMesh) -> None:
    source = EnvoyStatsSource(traffic_mesh.admin_url)
    _send(traffic_mesh, {1: 3, 2: 2})
    time.sleep(STATS_FLUSH_INTERVAL_S * 1.5)

    text = source._fetch()
    source.close()

    # Every line has Envoy's own shape: the text is never read line by line.
    one_pass = envoystats._envoy_lines(text, protocol.SERVICE_HOST)
    assert one_pass is not None
    assert one_pass == envoystats._any_lines(text, protocol.SERVICE_HOST)
    assert envoystats.parse_prometheus(text)["c-00"].requests_total == 3
