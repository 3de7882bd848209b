"""A small FL namespace on the fake API server, and its telemetry in Prometheus."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from tests import prometheus_support as ps

ROOT = Path(__file__).resolve().parents[1]
ISTIO = "networking.istio.io/v1"


def put_pod(fake_kube, namespace: str, name: str, *, ready: bool = True) -> None:
    """An FL client pod of the StatefulSet, Ready or not."""
    fake_kube.put(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {
                    "app": "fl-client",
                    "statefulset.kubernetes.io/pod-name": name,
                },
            },
            "spec": {"containers": [{"name": "client", "image": "meshctl"}]},
            "status": {"conditions": [{"type": "Ready", "status": str(ready).title()}]},
        }
    )


def deploy_routing(fake_kube, namespace: str) -> None:
    """The base manifests' routing objects, as kubectl applies them."""
    text = (ROOT / "manifests/base/routing.yaml").read_text(encoding="utf-8")
    for doc in yaml.safe_load_all(text):
        doc["metadata"]["namespace"] = namespace
        fake_kube.put(doc, manager="kubectl-client-side-apply")


def live(fake_kube, namespace: str, kind: str) -> dict:
    return fake_kube.get(ISTIO, kind, "fl-clients", namespace)


def slot_targets(vs: dict) -> dict[str, str]:
    return {
        r["name"]: r["route"][0]["destination"]["subset"]
        for r in vs["spec"]["http"]
        if r["name"].startswith("meshctl-slot-")
    }


def push_traffic(url: str, namespace: str, codes_per_s: dict[str, dict[str, float]]):
    """``istio_requests_total`` at the destination: pod -> response code -> rate."""
    end_s = float(round(time.time()))
    series = [
        ps.counter(
            {
                "__name__": "istio_requests_total",
                "reporter": "destination",
                "destination_service_name": "fl-clients",
                "destination_service_namespace": namespace,
                "response_flags": "-",
                "pod": pod,
                "response_code": code,
            },
            end_s=end_s,
            per_s=per_s,
        )
        for pod, codes in codes_per_s.items()
        for code, per_s in codes.items()
    ]
    ps.remote_write(url, series)


def manifest_virtual_service() -> dict:
    """The VirtualService as the base manifests (and so Git) hold it."""
    text = (ROOT / "manifests/base/routing.yaml").read_text(encoding="utf-8")
    (vs,) = [d for d in yaml.safe_load_all(text) if d["kind"] == "VirtualService"]
    return vs


def controller_role_rules() -> list[dict]:
    """The rules of the controller's Role in the base manifests."""
    text = (ROOT / "manifests/base/controller.yaml").read_text(encoding="utf-8")
    (role,) = [d for d in yaml.safe_load_all(text) if d["kind"] == "Role"]
    return role["rules"]


def dead_kubeconfig(directory: Path) -> Path:
    """A kubeconfig naming an API server that is not there."""
    path = directory / "dead-kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        "clusters: [{name: x, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: x, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: x, user: x}}]\n",
        encoding="utf-8",
    )
    return path
