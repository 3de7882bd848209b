"""``meshctl apply`` puts the manifests on a (fake) cluster, or into a directory."""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from meshctl import cli
from meshctl.exitcodes import ExitCode
from meshctl.kube import apply as kube_apply
from tests.fakekube import FakeKube, ResourceType

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "manifests" / "overlays" / "dev"
POD_MONITOR = ResourceType(
    "monitoring.coreos.com", "v1", "podmonitors", "PodMonitor", builtin=False
)

pytestmark = pytest.mark.skipif(
    kube_apply.find_kubectl() is None, reason="kubectl not found (test extras)"
)


@pytest.fixture
def cluster(crd_path: Path) -> Iterator[FakeKube]:
    """A fake cluster with Istio's CRDs and the Prometheus Operator's PodMonitor,
    and no ``fl`` namespace yet."""
    with FakeKube(crd_path, extra_types=[POD_MONITOR]) as server:
        yield server


@pytest.fixture
def config(cluster: FakeKube, tmp_path: Path) -> Path:
    return cluster.write_kubeconfig(tmp_path / "kubeconfig")


def meshctl(*args: str):
    return CliRunner().invoke(cli.app, ["apply", *args])


def rendered(directory: Path) -> list[dict]:
    return kube_apply.render_kustomization(directory)


def test_the_dev_overlay_lands_on_the_cluster_under_field_manager_meshctl(
    cluster, config
) -> None:
    result = meshctl("-k", str(DEV), "--kubeconfig", str(config))

    assert result.exit_code == 0, result.output
    objects = rendered(DEV)
    assert len(result.stdout.splitlines()) == len(objects)
    for obj in objects:
        meta = obj["metadata"]
        stored = cluster.get(
            obj["apiVersion"], obj["kind"], meta["name"], meta.get("namespace")
        )
        assert stored is not None, f"{obj['kind']} {meta['name']}"
        managers = {
            (e["manager"], e["operation"]) for e in stored["metadata"]["managedFields"]
        }
        assert managers == {("meshctl", "Apply")}
    assert result.stdout.splitlines()[0] == "namespace/fl serverside-applied"


def test_applying_twice_changes_nothing_the_second_time(cluster, config) -> None:
    meshctl("-k", str(DEV), "--kubeconfig", str(config))
    revision = cluster.store.revision

    again = meshctl("-k", str(DEV), "--kubeconfig", str(config))

    assert again.exit_code == 0, again.output
    assert cluster.store.revision == revision


def test_server_dry_run_checks_on_the_server_and_stores_nothing(
    cluster, config
) -> None:
    result = meshctl(
        "-f",
        str(ROOT / "manifests/base/namespace.yaml"),
        "--kubeconfig",
        str(config),
        "--dry-run=server",
    )

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "namespace/fl serverside-applied (server dry run)"
    assert cluster.get("v1", "Namespace", "fl") is None


def test_client_dry_run_needs_no_cluster(tmp_path: Path) -> None:
    nowhere = tmp_path / "absent-kubeconfig"

    result = meshctl("-k", str(DEV), "--kubeconfig", str(nowhere), "--dry-run=client")

    assert result.exit_code == 0, result.output
    assert "virtualservice.networking.istio.io/fl-clients configured (dry run)" in (
        result.stdout
    )


def test_to_dir_writes_a_kustomization_that_renders_the_same_objects(
    tmp_path: Path,
) -> None:
    out = tmp_path / "gitops"

    result = meshctl("-k", str(DEV), "--to-dir", str(out))

    assert result.exit_code == 0, result.output
    assert (out / "kustomization.yaml").exists()
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(rendered(out), key=key) == sorted(rendered(DEV), key=key)


def test_a_file_without_namespaces_goes_to_the_namespace_given(
    cluster, config, tmp_path: Path
) -> None:
    cluster.put({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"}})
    manifest = tmp_path / "cm.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "settings"},
                "data": {"a": "1"},
            }
        )
    )

    result = meshctl("-f", str(manifest), "-n", "team", "--kubeconfig", str(config))

    assert result.exit_code == 0, result.output
    assert cluster.get("v1", "ConfigMap", "settings", "team")["data"] == {"a": "1"}


def test_the_context_flag_picks_the_cluster(cluster, tmp_path: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "fake", "cluster": {"server": cluster.url}},
            {"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}},
        ],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "u"}},
            {"name": "gone", "context": {"cluster": "gone", "user": "u"}},
        ],
        "current-context": "gone",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    namespace = str(ROOT / "manifests/base/namespace.yaml")

    result = meshctl("-f", namespace, "--kubeconfig", str(path), "--context", "fake")

    assert result.exit_code == 0, result.output
    assert cluster.get("v1", "Namespace", "fl") is not None


def test_an_unreachable_cluster_has_its_own_exit_code(tmp_path: Path) -> None:
    config = tmp_path / "kubeconfig"
    with FakeKube() as gone:
        gone.write_kubeconfig(config)
    namespace = str(ROOT / "manifests/base/namespace.yaml")

    result = meshctl("-f", namespace, "--kubeconfig", str(config))

    assert result.exit_code == ExitCode.CLUSTER_UNREACHABLE, result.output
    assert "unreachable" in result.output


def test_a_forbidden_verb_is_named_with_its_resource_and_namespace(
    cluster, config
) -> None:
    cluster.allow_only([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["get"]}])
    namespace = str(ROOT / "manifests/base/namespace.yaml")

    result = meshctl("-f", namespace, "--kubeconfig", str(config))

    assert result.exit_code == ExitCode.PERMISSION_DENIED, result.output
    assert "cannot patch namespaces" in " ".join(result.output.split())


def test_an_invalid_istio_object_is_refused_before_anything_is_written(
    cluster, config, tmp_path: Path
) -> None:
    docs = list(yaml.safe_load_all((ROOT / "manifests/base/routing.yaml").read_text()))
    docs[0]["spec"]["http"][0]["name"] = "Not A Label!"
    docs[0]["spec"]["http"].append(dict(docs[0]["spec"]["http"][0]))
    manifest = tmp_path / "routing.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))

    result = meshctl("-f", str(manifest), "-n", "default", "--kubeconfig", str(config))

    assert result.exit_code == ExitCode.INVALID, result.output
    assert "repeats spec.http[0]" in " ".join(result.output.split())
    assert [r for r in cluster.requests if r[0] == "PATCH"] == []


def test_fields_another_manager_owns_conflict_unless_forced(cluster, config) -> None:
    cluster.put(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "fl", "labels": {"istio-injection": "disabled"}},
        }
    )
    namespace = str(ROOT / "manifests/base/namespace.yaml")

    refused = meshctl("-f", namespace, "--kubeconfig", str(config))
    forced = meshctl("-f", namespace, "--kubeconfig", str(config), "--force-conflicts")

    assert refused.exit_code == ExitCode.CONFLICT, refused.output
    assert ".metadata.labels.istio-injection" in refused.output
    assert forced.exit_code == 0, forced.output
    labels = cluster.get("v1", "Namespace", "fl")["metadata"]["labels"]
    assert labels["istio-injection"] == "enabled"


def test_one_of_k_or_f_is_required() -> None:
    assert meshctl().exit_code == ExitCode.USAGE
    assert meshctl("-k", "a", "-f", "b").exit_code == ExitCode.USAGE


def test_kubectl_renders_what_to_dir_wrote_offline(tmp_path: Path) -> None:
    out = tmp_path / "gitops"
    kube_apply.write_to_dir(rendered(DEV), out)

    result = subprocess.run(
        [kube_apply.find_kubectl(), "kustomize", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr


def test_security_policies_are_applied_before_any_workload() -> None:
    result = meshctl("-k", str(DEV), "--dry-run=client")

    kinds = [line.split("/")[0] for line in result.stdout.splitlines()]
    first_workload = min(
        i
        for i, kind in enumerate(kinds)
        if kind in ("deployment.apps", "statefulset.apps")
    )
    policies = [
        i
        for i, kind in enumerate(kinds)
        if kind.split(".")[0] in ("peerauthentication", "authorizationpolicy")
    ]
    assert len(policies) == 3
    assert max(policies) < first_workload


def test_to_dir_writes_files_everyone_may_read(tmp_path: Path) -> None:
    written = kube_apply.write_to_dir(rendered(DEV), tmp_path / "gitops")

    assert {path.stat().st_mode & 0o777 for path in written} == {0o644}


def test_to_dir_removes_the_files_it_wrote_before_and_keeps_the_users(
    tmp_path: Path,
) -> None:
    out = tmp_path / "gitops"
    objects = rendered(DEV)
    kube_apply.write_to_dir(objects, out)
    (out / "notes.yaml").write_text("# the user's own file\n")
    fewer = [o for o in objects if o["kind"] != "PodMonitor"]

    written = kube_apply.write_to_dir(fewer, out)

    assert sorted(out.glob("*.yaml")) == sorted([*written, out / "notes.yaml"])
    assert not list(out.glob("podmonitor-*"))
    assert len(rendered(out)) == len(fewer)


def test_to_dir_refuses_a_kustomization_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "gitops"
    out.mkdir()
    (out / "kustomization.yaml").write_text("resources: [mine.yaml]\n")

    result = meshctl("-k", str(DEV), "--to-dir", str(out))

    assert result.exit_code == ExitCode.INVALID, result.output
    assert "not written by meshctl" in " ".join(result.output.split())
    assert [p.name for p in out.iterdir()] == ["kustomization.yaml"]


@pytest.fixture
def hanging_up_server(tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    """An "API server" that accepts each connection and closes it at once: a
    kubeconfig naming it, and the number of connections so far."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = [0]

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            accepted[0] += 1
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    config = tmp_path / "kubeconfig"
    config.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: x\n"
        f"clusters: [{{name: x, cluster: {{server: 'http://127.0.0.1:"
        f"{listener.getsockname()[1]}'}}}}]\n"
        "users: [{name: x, user: {token: t}}]\n"
        "contexts: [{name: x, context: {cluster: x, user: x}}]\n"
    )
    yield config, accepted
    listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
    listener.close()
    thread.join(timeout=5)


@pytest.mark.parametrize(
    "command",
    [
        ["apply", "-f", str(ROOT / "manifests/base/namespace.yaml")],
        ["select", "--prometheus-url", "http://127.0.0.1:9", "-k", "1"],
        ["status"],
    ],
    ids=["apply", "select", "status"],
)
def test_every_cluster_command_fails_on_the_first_broken_connection(
    hanging_up_server: tuple[Path, list[int]], command: list[str]
) -> None:
    config, accepted = hanging_up_server

    result = CliRunner().invoke(cli.app, [*command, "--kubeconfig", str(config)])

    assert result.exit_code == ExitCode.CLUSTER_UNREACHABLE, result.output
    assert accepted[0] == 1
    assert "Retrying" not in result.output
