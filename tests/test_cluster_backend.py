"""The cluster backend writes only meshctl's fields, in make-before-break order,
through the official client to a fake API server over HTTP."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from meshctl import protocol
from meshctl.backends import cluster
from meshctl.kube import client as kube
from meshctl.kube import errors
from meshctl.routing import plan, render

ROOT = Path(__file__).resolve().parents[1]
VS_PATH = "/apis/networking.istio.io/v1/namespaces/fl/virtualservices/fl-clients"
DR_PATH = "/apis/networking.istio.io/v1/namespaces/fl/destinationrules/fl-clients"
USER_ROUTE = {
    "name": "canary-debug",
    "match": [{"headers": {"x-debug": {"exact": "1"}}}],
    "route": [{"destination": {"host": "fl-clients"}}],
}


def manifest_objects() -> dict[str, dict]:
    """The base manifests' routing objects, as `kubectl apply` would create them."""
    docs = yaml.safe_load_all((ROOT / "manifests/base/routing.yaml").read_text())
    objects = {}
    for doc in docs:
        doc["metadata"]["namespace"] = "fl"
        objects[doc["kind"]] = doc
    return objects


def controller_role_rules() -> list[dict]:
    docs = yaml.safe_load_all((ROOT / "manifests/base/controller.yaml").read_text())
    (role,) = [d for d in docs if d["kind"] == "Role"]
    return role["rules"]


@pytest.fixture
def backend(kubeconfig: Path, istio_schemas: dict) -> cluster.ClusterBackend:
    api = kube.Api(kube.connect(kubeconfig))
    return cluster.ClusterBackend(api, namespace="fl", schemas=istio_schemas)


@pytest.fixture
def deployed(fake_kube) -> dict[str, dict]:
    """The manifests' VirtualService and DestinationRule, applied by kubectl."""
    for obj in manifest_objects().values():
        fake_kube.put(obj, manager="kubectl-client-side-apply")
    return manifest_objects()


def arm(backend, assignment: dict[int, str], version: str) -> list[plan.Step]:
    """Read, render and plan one round the way the controller does."""
    live_vs, live_dr = backend.read()
    desired = render.render_exact(
        assignment, routing_version=version, live_vs=live_vs, live_dr=live_dr
    )
    return plan.plan_transition(live_vs, live_dr, *desired)


def live(fake_kube, kind: str) -> dict:
    return fake_kube.get("networking.istio.io/v1", kind, "fl-clients", "fl")


def slot_targets(vs: dict) -> dict[str, str]:
    return {
        r["name"]: r["route"][0]["destination"]["subset"]
        for r in vs["spec"]["http"]
        if r["name"].startswith("meshctl-slot-")
    }


def no_wait(step: plan.Step) -> float:
    return 0.0


def test_reading_an_empty_namespace_finds_no_routes(backend) -> None:
    assert backend.read() == (None, None)


def test_a_round_creates_both_objects_when_the_cluster_has_none(
    backend, fake_kube
) -> None:
    steps = arm(backend, {1: "fl-clients-0", 2: "fl-clients-1"}, "r1")

    backend.apply_plan(steps, no_wait)

    vs, dr = live(fake_kube, "VirtualService"), live(fake_kube, "DestinationRule")
    assert slot_targets(vs) == {
        "meshctl-slot-1": "fl-clients-0",
        "meshctl-slot-2": "fl-clients-1",
    }
    assert [s["name"] for s in dr["spec"]["subsets"]] == [
        "fl-clients-0",
        "fl-clients-1",
    ]
    assert dr["spec"]["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL"


def test_a_round_on_the_deployed_manifests_writes_subsets_before_routes(
    backend, fake_kube, deployed
) -> None:
    steps = arm(backend, {1: "fl-clients-2"}, "r1")

    backend.apply_plan(steps, no_wait)

    writes = [(m, p) for m, p, s in fake_kube.requests if m == "PATCH" and s == 200]
    assert writes == [("PATCH", DR_PATH), ("PATCH", VS_PATH)]
    vs, dr = live(fake_kube, "VirtualService"), live(fake_kube, "DestinationRule")
    assert slot_targets(vs) == {"meshctl-slot-1": "fl-clients-2"}
    assert dr["spec"]["subsets"] == [
        {"name": "fl-clients-2", "labels": {protocol.CLIENT_LABEL: "fl-clients-2"}}
    ]
    assert vs["metadata"]["annotations"][protocol.ROUTING_VERSION_ANNOTATION] == "r1"


def test_a_write_keeps_every_field_meshctl_does_not_own(
    backend, fake_kube, deployed
) -> None:
    dr = copy.deepcopy(deployed["DestinationRule"])
    dr["spec"]["trafficPolicy"]["connectionPool"] = {"http": {"http2MaxRequests": 7}}
    dr["metadata"]["labels"]["team"] = "fl-platform"
    fake_kube.put(dr, manager="kubectl-client-side-apply")

    backend.apply_plan(arm(backend, {1: "fl-clients-0"}, "r1"), no_wait)
    backend.apply_plan(arm(backend, {1: "fl-clients-1"}, "r2"), no_wait)

    after = live(fake_kube, "DestinationRule")
    assert after["spec"]["trafficPolicy"]["connectionPool"] == {
        "http": {"http2MaxRequests": 7}
    }
    assert after["metadata"]["labels"]["team"] == "fl-platform"
    assert [s["name"] for s in after["spec"]["subsets"]] == ["fl-clients-1"]
    owners = {e["manager"] for e in after["metadata"]["managedFields"]}
    assert {"meshctl", "kubectl-client-side-apply"} <= owners


def test_another_writer_between_read_and_write_gets_409_then_meshctl_keeps_its_change(
    backend, fake_kube, deployed
) -> None:
    steps = arm(backend, {1: "fl-clients-0"}, "r1")
    edited = live(fake_kube, "VirtualService")
    edited["spec"]["http"].insert(0, USER_ROUTE)
    fake_kube.put(edited, manager="kubectl-edit")

    backend.apply_plan(steps, no_wait)

    vs_writes = [s for m, p, s in fake_kube.requests if m == "PATCH" and p == VS_PATH]
    assert vs_writes == [409, 200]
    routes = [r["name"] for r in live(fake_kube, "VirtualService")["spec"]["http"]]
    assert routes == ["meshctl-slot-1", "canary-debug", protocol.FALLBACK_ROUTE_NAME]


def test_a_user_subset_added_meanwhile_survives_the_prune(
    backend, fake_kube, deployed
) -> None:
    backend.apply_plan(arm(backend, {1: "fl-clients-0"}, "r1"), no_wait)
    steps = arm(backend, {1: "fl-clients-1"}, "r2")
    edited = live(fake_kube, "DestinationRule")
    edited["spec"]["subsets"].insert(0, {"name": "debug", "labels": {"debug": "1"}})
    fake_kube.put(edited, manager="kubectl-edit")

    backend.apply_plan(steps, no_wait)

    subsets = [s["name"] for s in live(fake_kube, "DestinationRule")["spec"]["subsets"]]
    assert subsets == ["debug", "fl-clients-1"]


def test_conflicts_that_never_end_stop_after_the_bounded_attempts(
    backend, fake_kube, deployed, monkeypatch
) -> None:
    steps = arm(backend, {1: "fl-clients-0"}, "r1")
    real_read = backend.read

    def someone_writes() -> None:
        vs = live(fake_kube, "VirtualService")
        vs["metadata"]["labels"]["touched"] = vs["metadata"]["resourceVersion"]
        fake_kube.put(vs, manager="kubectl-edit")

    def read_then_someone_writes():
        result = real_read()
        someone_writes()
        return result

    monkeypatch.setattr(backend, "read", read_then_someone_writes)
    backend.max_attempts = 3
    vs_step = [s for s in steps if s.kind == "VirtualService"]
    someone_writes()

    with pytest.raises(cluster.ClusterBackendError) as caught:
        backend.apply_plan(vs_step, no_wait)

    assert isinstance(caught.value.kube_error, errors.Conflict)
    assert "after 3 attempts" in str(caught.value)
    assert slot_targets(live(fake_kube, "VirtualService")) == {}


def test_the_manifests_role_is_enough_for_a_round(backend, fake_kube, deployed) -> None:
    fake_kube.allow_only(controller_role_rules())

    backend.apply_plan(
        arm(backend, {1: "fl-clients-0", 2: "fl-clients-3"}, "r1"), no_wait
    )

    assert len(slot_targets(live(fake_kube, "VirtualService"))) == 2


def test_a_role_without_patch_on_destinationrules_is_a_clear_error(
    backend, fake_kube, deployed
) -> None:
    rules = copy.deepcopy(controller_role_rules())
    rules[0]["resources"] = ["virtualservices"]
    rules.append(
        {
            "apiGroups": ["networking.istio.io"],
            "resources": ["destinationrules"],
            "verbs": ["get", "list", "watch"],
        }
    )
    fake_kube.allow_only(rules)
    before = live(fake_kube, "VirtualService")

    with pytest.raises(cluster.ClusterBackendError) as caught:
        backend.apply_plan(arm(backend, {1: "fl-clients-0"}, "r1"), no_wait)

    message = str(caught.value)
    assert isinstance(caught.value.kube_error, errors.Forbidden)
    assert (
        "cannot patch destinationrules.networking.istio.io in namespace fl" in message
    )
    assert "step 1/" in message and "keeps the state after step 0" in message
    assert live(fake_kube, "VirtualService") == before


def test_an_invalid_object_is_refused_before_any_request(
    backend, fake_kube, deployed
) -> None:
    vs = live(fake_kube, "VirtualService")
    vs["spec"]["http"][0]["directResponse"]["status"] = "teapot"
    fake_kube.requests.clear()

    with pytest.raises(cluster.RoutingError, match="directResponse.status"):
        backend.write(vs)

    assert [r for r in fake_kube.requests if r[0] != "GET"] == []


def test_ready_clients_are_the_pods_whose_ready_condition_is_true(
    backend, fake_kube
) -> None:
    for name, ready in (("fl-clients-0", "True"), ("fl-clients-1", "False")):
        fake_kube.put(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": name,
                    "namespace": "fl",
                    "labels": {"app": "fl-client"},
                },
                "spec": {"containers": [{"name": "client", "image": "meshctl"}]},
                "status": {"conditions": [{"type": "Ready", "status": ready}]},
            }
        )

    assert backend.ready_clients() == {"fl-clients-0"}
