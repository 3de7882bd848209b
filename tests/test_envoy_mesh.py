"""The local mesh with a real Envoy in front of real HTTP backends."""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
import time
from collections.abc import Callable

import httpx
import pytest
import yaml

from meshctl import protocol
from meshctl.localmesh import envoy
from meshctl.localmesh.envoy import LocalMesh
from meshctl.localmesh.translate import TranslationError
from tests.conftest import Backend

pytestmark = pytest.mark.envoy

NAMES = ("c-00", "c-01", "c-02")


def virtual_service(version: str, *http: dict) -> dict:
    """A VirtualService for fl-clients ending with the unarmed-slot fallback."""
    fallback = {
        "name": protocol.FALLBACK_ROUTE_NAME,
        "directResponse": {"status": 421, "body": {"string": "unarmed"}},
    }
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {
            "name": "fl-clients",
            "namespace": "fl",
            "annotations": {protocol.ROUTING_VERSION_ANNOTATION: version},
        },
        "spec": {"hosts": ["fl-clients"], "http": [*http, fallback]},
    }


def slots(assignment: dict[int, str]) -> list[dict]:
    """Exact-mode routes: one per slot, to the assigned client's subset."""
    return [
        {
            "name": protocol.slot_route_name(slot),
            "match": [{"headers": {protocol.SLOT_HEADER: {"exact": str(slot)}}}],
            "route": [{"destination": {"host": "fl-clients", "subset": client}}],
        }
        for slot, client in assignment.items()
    ]


def destination_rule(version: str, *subsets: str) -> dict:
    """A DestinationRule with one pod-name subset per client."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {
            "name": "fl-clients",
            "namespace": "fl",
            "annotations": {protocol.ROUTING_VERSION_ANNOTATION: version},
        },
        "spec": {
            "host": "fl-clients",
            "trafficPolicy": {"tls": {"mode": "ISTIO_MUTUAL"}},
            "subsets": [
                {"name": name, "labels": {protocol.CLIENT_LABEL: name}}
                for name in subsets
            ],
        },
    }


def send(mesh: LocalMesh, slot: int | None = None) -> httpx.Response:
    """One request through the mesh, as the FL server sends it."""
    headers = {"host": protocol.SERVICE_HOST}
    if slot is not None:
        headers[protocol.SLOT_HEADER] = str(slot)
    return httpx.post(mesh.listen_url + protocol.MESSAGE_PATH, headers=headers)


@pytest.fixture
def backends(http_backends: Callable[..., Backend]) -> list[Backend]:
    """Three client services, each answering its own name."""
    return [http_backends(name) for name in NAMES]


@pytest.fixture
def mesh(local_mesh: Callable[..., LocalMesh], backends: list[Backend]) -> LocalMesh:
    """A running mesh that knows the three client services."""
    return local_mesh([backend.workload for backend in backends])


def test_before_any_object_every_request_is_an_unarmed_slot(mesh: LocalMesh) -> None:
    assert send(mesh, slot=1).status_code == protocol.UNARMED_SLOT_STATUS
    assert mesh.served_versions()["routes"] == envoy.INITIAL_VERSION


def test_slot_headers_reach_the_assigned_clients(mesh: LocalMesh) -> None:
    mesh.apply_destination_rule(destination_rule("v1", *NAMES))
    mesh.wait_served("clusters", "v1", timeout_s=5)
    mesh.apply_virtual_service(virtual_service("v1", *slots({1: "c-01", 2: "c-02"})))
    mesh.wait_served("routes", "v1", timeout_s=5)

    assert send(mesh, slot=1).text == "c-01"
    assert send(mesh, slot=2).text == "c-02"
    unarmed = send(mesh, slot=3)
    assert unarmed.status_code == 421
    assert unarmed.text == "unarmed"
    assert send(mesh).status_code == 421


def test_a_new_assignment_is_served_once_wait_served_returns(mesh: LocalMesh) -> None:
    dr = destination_rule("v1", *NAMES)
    mesh.sync(virtual_service("v1", *slots({1: "c-01", 2: "c-02"})), dr)

    mesh.apply_virtual_service(virtual_service("v2", *slots({1: "c-02", 2: "c-00"})))
    waited_s = mesh.wait_served("routes", "v2", timeout_s=5)

    assert 0 <= waited_s < 5
    assert mesh.served_versions() == {"clusters": "v1", "routes": "v2"}
    assert send(mesh, slot=1).text == "c-02"
    assert send(mesh, slot=2).text == "c-00"


def test_a_new_version_with_the_same_routes_is_still_reported(mesh: LocalMesh) -> None:
    assignment = slots({1: "c-01"})
    mesh.sync(virtual_service("v1", *assignment), destination_rule("v1", *NAMES))

    mesh.apply_virtual_service(virtual_service("v2", *assignment))

    assert mesh.wait_served("routes", "v2", timeout_s=5) < 5


def test_a_bad_object_changes_nothing(mesh: LocalMesh) -> None:
    mesh.sync(
        virtual_service("v1", *slots({1: "c-01"})), destination_rule("v1", *NAMES)
    )
    bad = virtual_service("v2", *slots({1: "Not_A_Subset"}))

    with pytest.raises(TranslationError, match=r"spec\.http\[0\]\.route\[0\]"):
        mesh.apply_virtual_service(bad)

    assert mesh.served_versions() == {"clusters": "v1", "routes": "v1"}
    assert send(mesh, slot=1).text == "c-01"


def test_waiting_for_a_version_never_written_times_out(mesh: LocalMesh) -> None:
    with pytest.raises(envoy.EnvoyTimeoutError, match="keeps the previous routes"):
        mesh.wait_served("routes", "never", timeout_s=0.2)


def test_a_restarted_envoy_serves_the_routing_directory(mesh: LocalMesh) -> None:
    vs = virtual_service("v7", *slots({1: "c-02", 2: "c-01"}))
    dr = destination_rule("v7", *NAMES)
    (mesh.routing_dir / envoy.VIRTUAL_SERVICE_FILE).write_text(yaml.safe_dump(vs))
    (mesh.routing_dir / envoy.DESTINATION_RULE_FILE).write_text(yaml.safe_dump(dr))
    listen_url = mesh.listen_url

    mesh.stop()
    assert not mesh.running
    mesh.start()

    assert mesh.listen_url == listen_url
    assert mesh.served_versions() == {"clusters": "v7", "routes": "v7"}
    assert send(mesh, slot=1).text == "c-02"
    assert send(mesh, slot=2).text == "c-01"


def test_a_killed_envoy_comes_back_with_the_routes_it_served(
    local_mesh: Callable[..., LocalMesh], http_backends: Callable[..., Backend]
) -> None:
    slow = http_backends("c-00", delay_s=2.0)
    fast = http_backends("c-01")
    mesh = local_mesh([slow.workload, fast.workload])
    vs = virtual_service("v3", *slots({1: "c-00", 2: "c-01"}))
    dr = destination_rule("v3", "c-00", "c-01")
    # As the controller's directory backend does: the files, then the mesh.
    (mesh.routing_dir / envoy.VIRTUAL_SERVICE_FILE).write_text(yaml.safe_dump(vs))
    (mesh.routing_dir / envoy.DESTINATION_RULE_FILE).write_text(yaml.safe_dump(dr))
    mesh.sync(vs, dr)
    first_pid = mesh.pid
    in_flight = concurrent.futures.ThreadPoolExecutor(1).submit(send, mesh, 1)
    time.sleep(0.5)  # the request waits on the slow client

    mesh.restart()

    with pytest.raises(httpx.HTTPError):  # what was in flight is lost
        in_flight.result(timeout=10)
    assert mesh.pid != first_pid
    assert mesh.served_versions() == {"clusters": "v3", "routes": "v3"}
    assert send(mesh, slot=2).text == "c-01"
    assert send(mesh, slot=1).text == "c-00"


def test_a_restart_with_a_bad_routing_directory_keeps_the_last_routes(
    mesh: LocalMesh,
) -> None:
    mesh.sync(
        virtual_service("v1", *slots({1: "c-01"})), destination_rule("v1", *NAMES)
    )
    bad = virtual_service("v2", *slots({1: "Not_A_Subset"}))
    (mesh.routing_dir / envoy.VIRTUAL_SERVICE_FILE).write_text(yaml.safe_dump(bad))

    mesh.stop()
    mesh.start()

    assert mesh.served_versions()["routes"] == "v1"
    assert send(mesh, slot=1).text == "c-01"


def test_a_weighted_route_splits_requests_by_weight(mesh: LocalMesh) -> None:
    weighted = {
        "name": "meshctl-weighted",
        "route": [
            {"destination": {"host": "fl-clients", "subset": "c-00"}, "weight": 90},
            {"destination": {"host": "fl-clients", "subset": "c-01"}, "weight": 10},
        ],
    }
    mesh.sync(virtual_service("w1", weighted), destination_rule("w1", *NAMES))

    with httpx.Client(
        base_url=mesh.listen_url, headers={"host": "fl-clients"}
    ) as client:
        answers = collections.Counter(client.get("/").text for _ in range(1000))

    # Five standard deviations of a binomial(1000, 0.9): about 47 requests.
    tolerance = 5 * math.sqrt(1000 * 0.9 * 0.1)
    assert set(answers) == {"c-00", "c-01"}
    assert abs(answers["c-00"] - 900) <= tolerance


def test_an_abort_fault_at_100_percent_answers_its_status(mesh: LocalMesh) -> None:
    (route,) = slots({1: "c-01"})
    route["fault"] = {"abort": {"httpStatus": 418, "percentage": {"value": 100}}}
    mesh.sync(virtual_service("f1", route), destination_rule("f1", *NAMES))

    assert [send(mesh, slot=1).status_code for _ in range(5)] == [418] * 5


def test_a_subset_without_workloads_answers_503(
    local_mesh: Callable[..., LocalMesh],
) -> None:
    mesh = local_mesh([])
    mesh.sync(
        virtual_service("e1", *slots({1: "c-09"})), destination_rule("e1", "c-09")
    )

    assert send(mesh, slot=1).status_code == 503


def test_stop_ends_the_envoy_process(mesh: LocalMesh) -> None:
    pid = mesh.pid

    mesh.stop()

    assert pid is not None
    assert not mesh.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def upstream_requests(mesh: LocalMesh, client: str) -> int | None:
    """Envoy's ``upstream_rq_total`` of a client's cluster; None when it has none."""
    text = httpx.get(mesh.admin_url + "/stats/prometheus").text
    cluster = f'envoy_cluster_name="outbound|80|{client}|fl-clients"'
    for line in text.splitlines():
        if line.startswith("envoy_cluster_upstream_rq_total{") and cluster in line:
            return int(line.rsplit(" ", 1)[1])
    return None


def test_a_client_routed_unrouted_and_routed_again_keeps_its_counters(
    mesh: LocalMesh,
) -> None:
    both = destination_rule("r1", "c-00", "c-01")
    mesh.sync(virtual_service("r1", *slots({1: "c-00", 2: "c-01"})), both)
    assert [send(mesh, slot=2).text for _ in range(2)] == ["c-01"] * 2
    counts = [upstream_requests(mesh, "c-01")]

    # Round 2 leaves c-01 out: routes first, then its subset is pruned.
    mesh.apply_virtual_service(virtual_service("r2", *slots({1: "c-00"})))
    mesh.wait_served("routes", "r2", timeout_s=5)
    mesh.sync(
        virtual_service("r2", *slots({1: "c-00"})), destination_rule("r2", "c-00")
    )
    assert send(mesh, slot=1).text == "c-00"
    counts.append(upstream_requests(mesh, "c-01"))

    mesh.sync(
        virtual_service("r3", *slots({1: "c-01"})), destination_rule("r3", "c-01")
    )
    assert send(mesh, slot=1).text == "c-01"
    counts.append(upstream_requests(mesh, "c-01"))

    assert counts == [2, 2, 3]
