"""``meshctl run``: the controller loop on a (fake) cluster keeps its routes.

The loop serves the round API, health and readiness, and watches its
VirtualService and DestinationRule: an outside edit of meshctl's routes is
undone on the edit's own watch event; an edit that keeps coming back makes it
back off and post a Warning event.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from meshctl import policies
from meshctl.backends.cluster import ClusterBackend
from meshctl.controller import loop
from meshctl.controller.roundapi import RoundAPIClient
from meshctl.kube import client as kube
from meshctl.kube import errors
from tests import cluster_support as cs
from tests.fakekube import store

VS_PATH = "/apis/networking.istio.io/v1/namespaces/fl/virtualservices/fl-clients"
PODS = ("fl-clients-0", "fl-clients-1", "fl-clients-2")
SETTINGS = loop.LoopSettings(
    listen=("127.0.0.1", 0),
    metrics_listen=("127.0.0.1", 0),
    settle_s=0.0,
    watch_timeout_s=30.0,
    reassert_limit=2,
    reassert_window_s=600.0,
    backoff_s=(600.0, 600.0),  # longer than any test: a back-off never ends here
)


class NoTelemetry:
    """A telemetry source with nothing to say: the policy chooses without it."""

    def read(self, window_s: float) -> dict:
        return {}


def eventually(check: Callable[[], object], timeout_s: float = 10.0) -> object:
    """Poll ``check`` until it returns something true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            assert value, f"{check} still false after {timeout_s} s"
            return value
        time.sleep(0.02)


@pytest.fixture
def cluster(fake_kube):
    for pod in PODS:
        cs.put_pod(fake_kube, "fl", pod)
    cs.deploy_routing(fake_kube, "fl")
    return fake_kube


@pytest.fixture
def controller(cluster, kubeconfig: Path) -> Iterator[loop.ControllerLoop]:
    backend = ClusterBackend(kube.Api(kube.connect(kubeconfig)), namespace="fl")
    policy, _ = policies.resolve("random")
    running = loop.ControllerLoop(backend, NoTelemetry(), policy, SETTINGS).start()
    eventually(running.ready.is_set)
    yield running
    running.stop()


def arm(controller: loop.ControllerLoop, cluster) -> dict[str, str]:
    """Arm round 1 through the round API, as the FL server does; the slot routes."""
    api = RoundAPIClient(controller.url, per_round=2)
    try:
        api.arm(1)
    finally:
        api.close()
    return cs.slot_targets(cs.live(cluster, "fl", "VirtualService"))


def revert_from_git(kubeconfig: Path) -> None:
    """What `kubectl apply` of the manifests does: a merge patch of spec.http and
    the routing version, by another field manager."""
    api = kube.Api(kube.connect(kubeconfig))
    manifest = cs.manifest_virtual_service()
    api.request(
        "PATCH",
        VS_PATH,
        errors.Target("patch", "virtualservices.networking.istio.io", "fl"),
        query=[("fieldManager", "kubectl-client-side-apply")],
        body={
            "metadata": {"annotations": manifest["metadata"]["annotations"]},
            "spec": {"http": manifest["spec"]["http"]},
        },
        content_type=kube.MERGE_PATCH,
    )


def warning_events(cluster) -> list[dict]:
    rtype = cluster.resource_type("v1", "Event")
    items = cluster.store.list(rtype, "fl", store.Selectors.parse("", ""))["items"]
    return [e for e in items if e.get("type") == "Warning"]


def test_the_loop_serves_health_readiness_metrics_and_arms_rounds(
    cluster, controller
) -> None:

    assert httpx.get(controller.url + "/healthz").status_code == 200
    assert httpx.get(controller.url + "/readyz").status_code == 200
    routes = arm(controller, cluster)

    assert len(routes) == 2 and set(routes.values()) <= set(PODS)
    assert controller.metrics_url != controller.url
    assert "meshctl_" in httpx.get(controller.metrics_url + "/metrics").text


def test_the_loop_takes_round_calls_only_with_its_token(cluster, kubeconfig) -> None:
    backend = ClusterBackend(kube.Api(kube.connect(kubeconfig)), namespace="fl")
    policy, _ = policies.resolve("random")
    settings = dataclasses.replace(SETTINGS, round_api_token="s3cret-token")
    running = loop.ControllerLoop(backend, NoTelemetry(), policy, settings).start()
    api = RoundAPIClient(running.url, per_round=2, token="s3cret-token")
    try:
        eventually(running.ready.is_set)
        refused = httpx.post(
            running.url + "/v1/rounds/arm", json={"server_round": 1, "per_round": 2}
        )
        assert refused.status_code == 401
        api.arm(1)
        assert len(cs.slot_targets(cs.live(cluster, "fl", "VirtualService"))) == 2
    finally:
        api.close()
        running.stop()


def test_readyz_fails_until_the_api_server_answers(tmp_path: Path) -> None:
    dead = kube.Api(kube.connect(cs.dead_kubeconfig(tmp_path)), timeout_s=1.0)
    policy, _ = policies.resolve("random")
    running = loop.ControllerLoop(
        ClusterBackend(dead, namespace="fl"), NoTelemetry(), policy, SETTINGS
    ).start()
    try:
        assert httpx.get(running.url + "/healthz").status_code == 200
        assert httpx.get(running.url + "/readyz").status_code == 503
    finally:
        running.stop()


def test_an_outside_edit_is_undone_on_its_own_watch_event(
    cluster, controller, kubeconfig: Path
) -> None:
    routes = arm(controller, cluster)
    events_before = controller.events_seen

    revert_from_git(kubeconfig)

    restored = eventually(
        lambda: cs.slot_targets(cs.live(cluster, "fl", "VirtualService"))
    )
    assert restored == routes
    assert controller.reasserts == 1
    # The edit's event and the re-assert's own: no round ran in between.
    eventually(lambda: controller.events_seen >= events_before + 2)
    managers = {
        e["manager"]
        for e in cs.live(cluster, "fl", "VirtualService")["metadata"]["managedFields"]
    }
    assert "meshctl" in managers
    assert warning_events(cluster) == []


def test_reverting_that_goes_on_makes_it_back_off_with_a_warning_event(
    cluster, controller, kubeconfig: Path
) -> None:
    routes = arm(controller, cluster)
    for _ in range(SETTINGS.reassert_limit):
        revert_from_git(kubeconfig)
        eventually(
            lambda: cs.slot_targets(cs.live(cluster, "fl", "VirtualService")) == routes
        )

    revert_from_git(kubeconfig)

    (event,) = eventually(lambda: warning_events(cluster))
    assert event["reason"] == loop.REVERTED_REASON
    assert event["involvedObject"]["name"] == "fl-clients"
    assert "backs off" in event["message"]
    assert controller.reasserts == SETTINGS.reassert_limit
    assert cs.slot_targets(cs.live(cluster, "fl", "VirtualService")) == {}


def test_the_manifests_role_allows_everything_the_loop_does(
    cluster, controller, kubeconfig: Path
) -> None:
    cluster.allow_only(cs.controller_role_rules())
    routes = arm(controller, cluster)
    for _ in range(SETTINGS.reassert_limit):
        revert_from_git(kubeconfig)  # the fake's test user; RBAC applies to it too
        eventually(
            lambda: cs.slot_targets(cs.live(cluster, "fl", "VirtualService")) == routes
        )

    revert_from_git(kubeconfig)

    eventually(lambda: warning_events(cluster))
    denied = [r for r in cluster.requests if r[2] == 403]
    assert denied == []


def test_deleted_routing_objects_are_created_again_under_the_manifests_role(
    cluster, controller
) -> None:
    cluster.allow_only(cs.controller_role_rules())
    routes = arm(controller, cluster)
    subsets = cs.live(cluster, "fl", "DestinationRule")["spec"]["subsets"]

    for kind in ("DestinationRule", "VirtualService"):
        rtype = cluster.resource_type(cs.ISTIO, kind)
        cluster.store.delete(rtype, "fl", "fl-clients", False)

    eventually(lambda: cs.live(cluster, "fl", "VirtualService"))
    eventually(lambda: cs.live(cluster, "fl", "DestinationRule"))
    assert cs.slot_targets(cs.live(cluster, "fl", "VirtualService")) == routes
    dr = cs.live(cluster, "fl", "DestinationRule")
    assert dr["spec"]["subsets"] == subsets
    assert dr["spec"]["trafficPolicy"]["tls"]["mode"] == "ISTIO_MUTUAL"
    assert [r for r in cluster.requests if r[2] == 403] == []


def test_sigterm_stops_meshctl_run_cleanly_logging_json_lines_as_the_env_says(
    cluster, kubeconfig: Path
) -> None:
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "MESHCTL_LOG_FORMAT": "json",
        "MESHCTL_LOG_LEVEL": "debug",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "meshctl",
            "run",
            "--prometheus-url",
            "http://127.0.0.1:9",
            "--listen",
            "127.0.0.1:0",
            "-n",
            "fl",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        eventually(
            lambda: any(p.endswith("/virtualservices") for _, p, _ in cluster.requests),
            timeout_s=30,
        )
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    entries = [json.loads(line) for line in stderr.splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert "DEBUG" in {e["level"] for e in entries}
    assert "controller stopped" in [e["message"] for e in entries]


def test_json_log_lines_stay_json_whatever_the_message_holds() -> None:
    from meshctl import cli

    message = 'VirtualService "fl/fl-clients": \\ reverted\n\ttwice'
    record = logging.LogRecord(
        "meshctl.loop", logging.WARNING, "", 0, message, (), None
    )

    line = cli.JsonLogFormatter().format(record)

    assert "\n" not in line
    assert json.loads(line)["message"] == message


def test_the_manifests_controller_arguments_are_all_known() -> None:
    import typer
    import yaml

    from meshctl import cli

    docs = yaml.safe_load_all((cs.ROOT / "manifests/base/controller.yaml").read_text())
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    role, *args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    command = typer.main.get_command(cli.app).commands["run"]

    assert role == "controller"  # deploy/entrypoint.sh runs `meshctl run`
    with command.make_context("run", list(args)) as context:
        assert context.params["prometheus_url"] == "$(PROMETHEUS_URL)"
        assert context.params["metrics_listen"] == "0.0.0.0:9090"
