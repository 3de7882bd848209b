"""``meshctl status`` shows the client pods, their states, the selection, the
weights and the routing version of a (fake) cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from meshctl import cli
from meshctl.backends.cluster import ClusterBackend
from meshctl.exitcodes import ExitCode
from meshctl.kube import client as kube
from meshctl.routing import plan, render
from tests import cluster_support as cs


@pytest.fixture
def cluster(fake_kube):
    """Three pods (one not ready) and round 4 routed to two of them."""
    for pod, ready in (("fl-clients-0", True), ("fl-clients-1", True)):
        cs.put_pod(fake_kube, "fl", pod, ready=ready)
    cs.put_pod(fake_kube, "fl", "fl-clients-2", ready=False)
    cs.deploy_routing(fake_kube, "fl")
    return fake_kube


def route(kubeconfig: Path, *, weights: dict[str, int] | None = None) -> None:
    backend = ClusterBackend(kube.Api(kube.connect(kubeconfig)), namespace="fl")
    live_vs, live_dr = backend.read()
    options = {"routing_version": "r4-cafe", "live_vs": live_vs, "live_dr": live_dr}
    if weights:
        desired = render.render_weighted(weights, **options)
    else:
        desired = render.render_exact({1: "fl-clients-1", 2: "fl-clients-0"}, **options)
    backend.apply_plan(plan.plan_transition(live_vs, live_dr, *desired), lambda s: 0)


def status(kubeconfig: Path, *args: str):
    return CliRunner().invoke(
        cli.app, ["status", "--kubeconfig", str(kubeconfig), "-n", "fl", *args]
    )


def test_status_shows_pods_readiness_selection_and_routing_version(
    cluster, kubeconfig: Path
) -> None:
    route(kubeconfig)

    result = status(kubeconfig, "-o", "json")

    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["routing_version"] == "r4-cafe"
    assert answer["mode"] == "exact"
    assert answer["slots"] == {"1": "fl-clients-1", "2": "fl-clients-0"}
    by_client = {c["client"]: c for c in answer["clients"]}
    assert by_client["fl-clients-2"]["ready"] is False
    assert by_client["fl-clients-2"]["selected"] is False
    assert by_client["fl-clients-1"]["slot"] == 1
    assert by_client["fl-clients-0"]["state"] is None  # no Prometheus given


def test_weighted_routes_show_their_weights_in_yaml(cluster, kubeconfig) -> None:
    route(kubeconfig, weights={"fl-clients-0": 70, "fl-clients-1": 30})

    result = status(kubeconfig, "-o", "yaml")

    assert result.exit_code == 0, result.output
    answer = yaml.safe_load(result.stdout)
    assert answer["weights"] == {"fl-clients-0": 70, "fl-clients-1": 30}
    assert answer["mode"] == "weighted"


def test_the_table_has_a_row_per_client_and_the_version(cluster, kubeconfig) -> None:
    route(kubeconfig)

    result = status(kubeconfig)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "CLIENT",
        "READY",
        "STATE",
        "SELECTED",
        "SLOT",
        "WEIGHT",
    ]
    assert lines[3].split() == ["fl-clients-2", "false", "-", "false", "-", "-"]
    assert "routing version r4-cafe (exact)" in lines[-1]


def test_states_come_from_prometheus_when_a_url_is_given(
    fake_kube, kubeconfig, prometheus
) -> None:
    # A namespace of its own: the session's Prometheus holds other tests' series.
    namespace = f"status-{id(fake_kube) % 100000}"
    fake_kube.put(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}
    )
    cs.put_pod(fake_kube, namespace, "fl-clients-0")
    cs.push_traffic(prometheus, namespace, {"fl-clients-0": {"500": 3.0}})

    result = CliRunner().invoke(
        cli.app,
        ["status", "--kubeconfig", str(kubeconfig), "-n", namespace, "-o", "json"]
        + ["--prometheus-url", prometheus],
    )

    assert result.exit_code == 0, result.output
    by_client = {c["client"]: c for c in json.loads(result.stdout)["clients"]}
    assert by_client["fl-clients-0"]["state"] == "failing"
    assert json.loads(result.stdout)["routing_version"] is None


def test_an_unreachable_cluster_exits_7(tmp_path: Path) -> None:
    result = status(cs.dead_kubeconfig(tmp_path))

    assert result.exit_code == ExitCode.CLUSTER_UNREACHABLE, result.output
