"""``meshctl select`` runs one selection cycle on a (fake) cluster with telemetry
from a real Prometheus, and maps every failure to its exit code."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshctl import cli
from meshctl.exitcodes import ExitCode
from tests import cluster_support as cs
from tests.fakekube import FakeKube

_namespaces = itertools.count()
PODS = ("fl-clients-0", "fl-clients-1", "fl-clients-2", "fl-clients-3")


@pytest.fixture
def namespace() -> str:
    """A namespace of its own: the session's Prometheus holds other tests' series."""
    return f"select-{next(_namespaces)}-{id(object()) % 10000}"


@pytest.fixture
def cluster(crd_path: Path, namespace: str) -> Iterator[FakeKube]:
    """Four client pods (the last not ready) and the manifests' routing objects."""
    with FakeKube(crd_path, namespaces=("default", namespace)) as server:
        for pod in PODS:
            cs.put_pod(server, namespace, pod, ready=pod != "fl-clients-3")
        cs.deploy_routing(server, namespace)
        yield server


@pytest.fixture
def config(cluster: FakeKube, tmp_path: Path) -> Path:
    return cluster.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def telemetry(prometheus: str, namespace: str) -> str:
    """Two healthy clients, one answering only 500s, one not ready."""
    cs.push_traffic(
        prometheus,
        namespace,
        {
            "fl-clients-0": {"200": 2.0},
            "fl-clients-1": {"200": 2.0},
            "fl-clients-2": {"500": 2.0},
            "fl-clients-3": {"200": 2.0},
        },
    )
    return prometheus


def select(config: Path, namespace: str, url: str, *args: str):
    return CliRunner().invoke(
        cli.app,
        [
            "select",
            "--prometheus-url",
            url,
            "--kubeconfig",
            str(config),
            "-n",
            namespace,
            "--settle",
            "0",
            "-k",
            "2",
            *args,
        ],
    )


def test_a_cycle_routes_the_healthy_ready_clients_subsets_before_routes(
    cluster, config, namespace, telemetry
) -> None:
    result = select(config, namespace, telemetry, "-o", "json")

    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert set(answer["slots"].values()) == {"fl-clients-0", "fl-clients-1"}
    assert answer["applied"] is True
    states = {c["client"]: c["state"] for c in answer["clients"]}
    assert states["fl-clients-2"] != states["fl-clients-0"]
    vs = cs.live(cluster, namespace, "VirtualService")
    assert set(cs.slot_targets(vs).values()) == {"fl-clients-0", "fl-clients-1"}
    assert (
        vs["metadata"]["annotations"]["meshctl.io/routing-version"]
        == (answer["routing_version"])
    )
    writes = [p.rsplit("/", 2)[-2] for m, p, s in cluster.requests if m == "PATCH"]
    assert writes[:2] == ["destinationrules", "virtualservices"]


def test_dry_run_prints_a_unified_diff_and_writes_nothing(
    cluster, config, namespace, telemetry
) -> None:
    before = cs.live(cluster, namespace, "VirtualService")

    result = select(config, namespace, telemetry, "--dry-run")

    assert result.exit_code == 0, result.output
    assert f"--- live/VirtualService {namespace}/fl-clients" in result.stdout
    assert f"+++ desired/VirtualService {namespace}/fl-clients" in result.stdout
    assert "+    name: meshctl-slot-1" in result.stdout
    assert "would apply (dry run)" in result.stdout
    assert [r for r in cluster.requests if r[0] != "GET"] == []
    after = cs.live(cluster, namespace, "VirtualService")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


@pytest.mark.parametrize("output", ["table", "yaml"])
def test_every_output_names_the_routing_version(
    cluster, config, namespace, telemetry, output
) -> None:
    result = select(config, namespace, telemetry, "-o", output, "--dry-run")

    assert result.exit_code == 0, result.output
    assert "routing" in result.stdout and "r1-" in result.stdout


def test_an_unreachable_cluster_exits_7_before_asking_prometheus(
    tmp_path: Path,
) -> None:
    dead = tmp_path / "kubeconfig"
    dead.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        "clusters: [{name: x, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: x, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: x, user: x}}]\n"
    )

    result = select(dead, "fl", "http://127.0.0.1:9")

    assert result.exit_code == ExitCode.CLUSTER_UNREACHABLE, result.output


def test_an_unreachable_prometheus_exits_6(cluster, config, namespace) -> None:
    result = select(config, namespace, "http://127.0.0.1:9")

    assert result.exit_code == ExitCode.TELEMETRY_FAILED, result.output
    assert "127.0.0.1:9" in result.output
    assert [r for r in cluster.requests if r[0] != "GET"] == []


def test_a_role_without_patch_on_destinationrules_exits_8_naming_it(
    cluster, config, namespace, telemetry
) -> None:
    cluster.allow_only(
        [
            {
                "apiGroups": ["networking.istio.io"],
                "resources": ["virtualservices", "destinationrules"],
                "verbs": ["get", "list", "watch"],
            },
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
        ]
    )

    result = select(config, namespace, telemetry)

    assert result.exit_code == ExitCode.PERMISSION_DENIED, result.output
    message = " ".join(result.output.split())
    assert "'patch' on 'destinationrules.networking.istio.io'" in message
    assert namespace in message


def test_a_conflict_that_never_resolves_maps_to_exit_9() -> None:
    from meshctl.backends.cluster import ClusterBackendError
    from meshctl.controller import select as selecting
    from meshctl.controller.cycle import ArmError
    from meshctl.kube import errors

    conflict = errors.Conflict("patch virtualservices fl/fl-clients: 409", status=409)
    try:
        try:
            raise ClusterBackendError("step 2/3 failed", conflict)
        except ClusterBackendError as exc:
            raise ArmError("routing version r1-x was not applied") from exc
    except ArmError as exc:
        found = selecting._kube_error(exc)

    assert found is conflict
    assert cli._kube_exit_code(found) == ExitCode.CONFLICT


@pytest.mark.parametrize("k", ["0", "-3"])
def test_a_per_round_below_one_is_a_usage_error_before_any_connection(
    tmp_path: Path, k: str
) -> None:
    result = CliRunner().invoke(
        cli.app,
        [
            "select",
            "--prometheus-url",
            "http://127.0.0.1:9",
            "--kubeconfig",
            str(tmp_path / "no-such-kubeconfig"),
            "-k",
            k,
        ],
    )

    assert result.exit_code == int(ExitCode.USAGE)
    assert "--per-round" in " ".join(result.output.split())
