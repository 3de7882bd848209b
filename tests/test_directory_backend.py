"""The directory backend: validated, atomic, verified writes of routing YAML."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from meshctl import files
from meshctl.backends import directory
from meshctl.routing import plan, render
from meshctl.routing.errors import RoutingError


@pytest.fixture
def changes() -> list[tuple[str, dict]]:
    return []


@pytest.fixture
def backend(tmp_path: Path, changes: list) -> directory.DirectoryBackend:
    return directory.DirectoryBackend(
        tmp_path, on_change=lambda kind, obj: changes.append((kind, obj))
    )


def _exact(clients: list[str], version: str, live=(None, None)) -> tuple[dict, dict]:
    return render.render_exact(
        dict(enumerate(clients, start=1)),
        routing_version=version,
        live_vs=live[0],
        live_dr=live[1],
    )


def _apply_all(backend: directory.DirectoryBackend, clients: list[str], version: str):
    live = backend.read()
    desired = _exact(clients, version, live)
    steps = plan.plan_transition(*live, *desired)
    backend.apply_plan(steps, wait=lambda step: 0.0)
    return desired


def test_an_empty_directory_reads_as_no_objects(backend) -> None:
    assert backend.read() == (None, None)


def test_written_objects_read_back_equal(backend, changes) -> None:
    vs, dr = _exact(["c-01", "c-02"], "r1")

    backend.write(dr)
    backend.write(vs)

    assert backend.read() == (vs, dr)
    assert [kind for kind, _ in changes] == ["DestinationRule", "VirtualService"]
    assert changes[1][1] == vs


def test_each_file_is_one_object_kubectl_would_accept(backend, tmp_path) -> None:
    vs, dr = _exact(["c-01"], "r1")
    backend.write(dr)
    backend.write(vs)

    for name, kind in [
        ("virtualservice.yaml", "VirtualService"),
        ("destinationrule.yaml", "DestinationRule"),
    ]:
        (doc,) = list(yaml.safe_load_all((tmp_path / name).read_text()))
        assert list(doc) == ["apiVersion", "kind", "metadata", "spec"]
        assert doc["kind"] == kind
    text = (tmp_path / "virtualservice.yaml").read_text()
    assert "exact: '1'" in text


def test_a_write_replaces_the_file_by_rename_and_leaves_no_temporary_file(
    backend, tmp_path, monkeypatch
) -> None:
    vs, dr = _exact(["c-01"], "r1")
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(
        files.os,
        "replace",
        lambda a, b: (replaced.append((a, b)), real_replace(a, b)),
    )

    backend.write(dr)

    ((tmp, final),) = replaced
    assert Path(tmp).parent == tmp_path
    assert Path(final) == tmp_path / "destinationrule.yaml"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["destinationrule.yaml"]


def test_an_invalid_write_is_refused_and_leaves_the_previous_file(
    backend, tmp_path, changes
) -> None:
    vs, dr = _exact(["c-01", "c-02"], "r1")
    backend.write(dr)
    backend.write(vs)
    before = (tmp_path / "virtualservice.yaml").read_bytes()
    bad = _exact(["c-01", "c-02"], "r2")[0]
    for entry in bad["spec"]["http"][0]["route"]:
        entry["weight"] = -5

    with pytest.raises(RoutingError, match=r"refused, nothing written:\n.*weight"):
        backend.write(bad)

    assert (tmp_path / "virtualservice.yaml").read_bytes() == before
    assert len(changes) == 2


def test_a_route_to_a_subset_the_live_rule_lacks_is_refused(backend) -> None:
    backend.write(_exact(["c-01"], "r1")[1])
    vs, _ = _exact(["c-01", "c-02"], "r2")

    with pytest.raises(RoutingError, match="subset 'c-02' is not defined"):
        backend.write(vs)

    assert backend.read()[0] is None


def test_pruning_a_subset_the_live_routes_use_is_refused(backend) -> None:
    vs, dr = _exact(["c-01", "c-02"], "r1")
    backend.write(dr)
    backend.write(vs)
    _, smaller = _exact(["c-01"], "r2")

    with pytest.raises(RoutingError, match="subset 'c-02' is not defined"):
        backend.write(smaller)

    assert backend.read()[1] == dr


def test_a_failing_on_change_restores_the_previous_file(tmp_path) -> None:
    def refuse(kind: str, obj: dict) -> None:
        raise RuntimeError("envoy rejected the config")

    vs, dr = _exact(["c-01"], "r1")
    directory.DirectoryBackend(tmp_path).write(dr)
    backend = directory.DirectoryBackend(tmp_path, on_change=refuse)
    _, grown = _exact(["c-01", "c-02"], "r2")

    with pytest.raises(RoutingError, match="envoy rejected.*previous file is restored"):
        backend.write(grown)

    assert backend.read() == (None, dr)


def test_an_object_over_the_budget_is_refused(tmp_path) -> None:
    backend = directory.DirectoryBackend(tmp_path, budget_bytes=100)

    with pytest.raises(RoutingError, match="over the budget of 100 bytes"):
        backend.write(_exact(["c-01"], "r1")[1])

    assert backend.read() == (None, None)


def test_the_crd_schema_check_runs_when_schemas_are_given(
    tmp_path, istio_schemas
) -> None:
    backend = directory.DirectoryBackend(tmp_path, schemas=istio_schemas)
    _, dr = _exact(["c-01"], "r1")
    dr["spec"]["trafficPolicy"]["tls"]["mode"] = "SOMETIMES"

    with pytest.raises(RoutingError, match=r"spec.trafficPolicy.tls.mode: schema"):
        backend.write(dr)


def test_apply_plan_runs_steps_in_order_and_returns_the_waits(backend, changes) -> None:
    _apply_all(backend, ["c-01", "c-02"], "r1")
    changes.clear()
    live = backend.read()
    desired = _exact(["c-01", "c-03"], "r2", live)
    steps = plan.plan_transition(*live, *desired)
    waited = []

    result = backend.apply_plan(steps, wait=lambda s: waited.append(s) or 0.25)

    assert result == [0.25, 0.25, 0.25]
    assert waited == steps
    assert [obj for _, obj in changes] == [s.obj for s in steps]
    assert backend.read() == desired


def test_a_failed_step_keeps_the_last_good_state_and_names_the_step(tmp_path) -> None:
    good = directory.DirectoryBackend(tmp_path)
    _apply_all(good, ["c-01", "c-02"], "r1")
    live = good.read()
    steps = plan.plan_transition(*live, *_exact(["c-01", "c-03"], "r2", live))

    def fail_on_routes(kind: str, obj: dict) -> None:
        if kind == "VirtualService":
            raise RuntimeError("push timed out")

    backend = directory.DirectoryBackend(tmp_path, on_change=fail_on_routes)
    with pytest.raises(RoutingError, match=r"step 2/3 \(VirtualService.*after step 1"):
        backend.apply_plan(steps, wait=lambda s: 0.0)

    assert backend.read() == (live[0], steps[0].obj)


def test_a_failed_wait_names_its_step_and_keeps_what_was_written(backend) -> None:
    steps = plan.plan_transition(None, None, *_exact(["c-01"], "r1"))

    def wait(step: plan.Step) -> float:
        raise TimeoutError("data plane did not confirm")

    with pytest.raises(RoutingError, match=r"step 1/2 .* after step 1"):
        backend.apply_plan(steps, wait=wait)

    assert backend.read() == (None, steps[0].obj)


def test_a_file_holding_another_kind_is_refused_on_read(backend, tmp_path) -> None:
    (tmp_path / "virtualservice.yaml").write_text("kind: DestinationRule\n")

    with pytest.raises(RoutingError, match="expected one VirtualService"):
        backend.read()


def test_only_routing_kinds_can_be_written(backend) -> None:
    with pytest.raises(RoutingError, match="writes only"):
        backend.write(
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}
        )
