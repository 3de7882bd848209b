"""What users put in their routes does in a real Envoy what Istio says it does."""

from __future__ import annotations

import concurrent.futures
import re
import time
from collections.abc import Callable

import httpx
import pytest

from meshctl import protocol
from meshctl.localmesh.envoy import LocalMesh
from meshctl.localmesh.translate import cluster_name
from tests.conftest import Backend
from tests.test_envoy_mesh import destination_rule, slots, virtual_service

pytestmark = pytest.mark.envoy

HOST = protocol.SERVICE_HOST


def _stat(mesh: LocalMesh, name: str) -> int:
    """One counter from Envoy's admin stats (0 when Envoy has not created it)."""
    response = httpx.get(
        mesh.admin_url + "/stats", params={"filter": "^" + re.escape(name) + "$"}
    )
    for line in response.text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def _post(mesh: LocalMesh, slot: int = 1, **headers: str) -> httpx.Response:
    """One request through the mesh with a slot header and any other headers."""
    sent = {"host": HOST, protocol.SLOT_HEADER: str(slot), **headers}
    return httpx.post(mesh.listen_url + protocol.MESSAGE_PATH, headers=sent)


def _route(client: str, **fields: object) -> dict:
    """Slot 1's route to ``client``, with extra http route fields."""
    (route,) = slots({1: client})
    route.update(fields)
    return route


def _mesh(
    local_mesh: Callable[..., LocalMesh], backends: list[Backend], *routes: dict, **dr
) -> LocalMesh:
    """A mesh serving ``routes`` over one subset per backend."""
    mesh = local_mesh([b.workload for b in backends])
    rule = destination_rule("t1", *(b.name for b in backends))
    rule["spec"].update(dr)
    mesh.sync(virtual_service("t1", *routes), rule)
    return mesh


def test_header_matches_exact_prefix_and_regex(local_mesh, http_backends) -> None:
    backends = [http_backends(name) for name in ("c-00", "c-01", "c-02")]
    routes = [
        {
            "name": f"tenant-{kind}",
            "match": [{"headers": {"x-tenant": {kind: value}}}],
            "route": [{"destination": {"host": HOST, "subset": client}}],
        }
        for kind, value, client in [
            ("exact", "alpha", "c-00"),
            ("prefix", "beta-", "c-01"),
            ("regex", "gamma-[0-9]+", "c-02"),
        ]
    ]
    mesh = _mesh(local_mesh, backends, *routes)

    answers = {
        tenant: _post(mesh, **{"x-tenant": tenant})
        for tenant in ["alpha", "alphabet", "beta-7", "gamma-42", "gamma-x"]
    }

    assert answers["alpha"].text == "c-00"
    assert answers["beta-7"].text == "c-01"
    assert answers["gamma-42"].text == "c-02"
    assert answers["alphabet"].status_code == protocol.UNARMED_SLOT_STATUS
    assert answers["gamma-x"].status_code == protocol.UNARMED_SLOT_STATUS


def test_a_route_timeout_is_enforced(local_mesh, http_backends) -> None:
    slow = http_backends("c-00", delay_s=2.0)
    mesh = _mesh(local_mesh, [slow], _route("c-00", timeout="0.2s"))

    response = _post(mesh)

    assert response.status_code == 504
    assert response.text == "upstream request timeout"
    assert _stat(mesh, f"cluster.{cluster_name(HOST, 'c-00')}.upstream_rq_timeout") == 1


def test_a_delay_fault_holds_every_request(local_mesh, http_backends) -> None:
    delay = {"fixedDelay": "0.3s", "percentage": {"value": 100}}
    mesh = _mesh(
        local_mesh, [http_backends("c-00")], _route("c-00", fault={"delay": delay})
    )

    started = time.monotonic()
    answers = [_post(mesh).text for _ in range(3)]
    elapsed_s = time.monotonic() - started

    assert answers == ["c-00"] * 3
    assert _stat(mesh, "http.fl_clients.fault.delays_injected") == 3
    assert elapsed_s >= 3 * 0.3


@pytest.mark.parametrize(
    ("attempts", "all_succeed"), [(2, True), (0, False)], ids=["retries", "none"]
)
def test_retries_retry_a_failed_attempt(
    local_mesh, http_backends, attempts: int, all_succeed: bool
) -> None:
    flaky = http_backends("c-00", fail_every=2)
    retries = {"attempts": attempts, "retryOn": "5xx"}
    mesh = _mesh(local_mesh, [flaky], _route("c-00", retries=retries))

    codes = [_post(mesh).status_code for _ in range(10)]

    retried = _stat(mesh, f"cluster.{cluster_name(HOST, 'c-00')}.upstream_rq_retry")
    if all_succeed:
        assert codes == [200] * 10
        assert retried >= 5  # one per failed first attempt at least
    else:
        assert codes.count(500) == 5
        assert retried == 0


def test_outlier_detection_ejects_an_endpoint_that_keeps_failing(
    local_mesh, http_backends
) -> None:
    good, bad = http_backends("c-00"), http_backends("c-01", fail_every=1)
    route = {
        "name": "all-clients",
        "route": [{"destination": {"host": HOST}}],
        "retries": {"attempts": 0},
    }
    outlier = {
        "consecutive5xxErrors": 2,
        "interval": "1s",
        "baseEjectionTime": "60s",
        "maxEjectionPercent": 100,
    }
    mesh = _mesh(
        local_mesh, [good, bad], route, trafficPolicy={"outlierDetection": outlier}
    )

    answers = [_post(mesh) for _ in range(30)]

    host_cluster = cluster_name(HOST)
    ejected = _stat(
        mesh, f"cluster.{host_cluster}.outlier_detection.ejections_enforced_total"
    )
    assert ejected == 1
    assert sum(a.status_code == 500 for a in answers) == 2
    assert [a.text for a in answers[-20:]] == ["c-00"] * 20


def test_connection_pool_limits_overflow_with_503(local_mesh, http_backends) -> None:
    slow = http_backends("c-00", delay_s=0.5)
    pool = {"tcp": {"maxConnections": 1}, "http": {"http1MaxPendingRequests": 1}}
    mesh = _mesh(
        local_mesh,
        [slow],
        _route("c-00", retries={"attempts": 0}),
        trafficPolicy={"connectionPool": pool},
    )

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool_threads:
        answers = list(pool_threads.map(lambda _: _post(mesh), range(6)))

    overflowed = [a for a in answers if a.status_code == 503]
    assert overflowed
    assert all(a.headers.get("x-envoy-overloaded") == "true" for a in overflowed)
    assert {a.text for a in answers if a.status_code == 200} == {"c-00"}
    pending_overflow = _stat(
        mesh, f"cluster.{cluster_name(HOST, 'c-00')}.upstream_rq_pending_overflow"
    )
    assert pending_overflow == len(overflowed)
