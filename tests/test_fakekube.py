"""The fake API server behaves like kube-apiserver where meshctl relies on it,
spoken to by the official client, unchanged, through a kubeconfig."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from kubernetes import client, config, dynamic, watch

GROUP, VERSION, NS, PLURAL = "networking.istio.io", "v1", "fl", "virtualservices"
APPLY = "application/apply-patch+yaml"


def virtual_service(name: str = "fl-clients", route: str = "user-a") -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "VirtualService",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "hosts": ["fl-clients"],
            "http": [
                {"name": route, "route": [{"destination": {"host": "fl-clients"}}]}
            ],
        },
    }


@pytest.fixture
def api(kubeconfig: Path) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture
def custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def create_vs(custom: client.CustomObjectsApi, **kwargs) -> dict:
    return custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, virtual_service(**kwargs)
    )


def apply_vs(custom, body: dict, manager: str, **kwargs) -> dict:
    return custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        body["metadata"]["name"],
        body,
        field_manager=manager,
        _content_type=APPLY,
        **kwargs,
    )


def status_of(exc: client.ApiException) -> dict:
    return json.loads(exc.body)


def test_create_answers_201_with_uid_and_resource_version(api) -> None:
    core = client.CoreV1Api(api)

    created = core.create_namespaced_config_map(
        NS, {"metadata": {"name": "settings"}, "data": {"k": "v"}}
    )

    assert created is not None  # the client returns nothing unless it gets 201/200
    assert created.metadata.uid and int(created.metadata.resource_version) > 0
    assert created.metadata.namespace == NS


def test_creating_an_existing_name_is_409_already_exists(custom) -> None:
    create_vs(custom)

    with pytest.raises(client.ApiException) as caught:
        create_vs(custom)

    assert caught.value.status == 409
    assert status_of(caught.value)["reason"] == "AlreadyExists"


def test_every_write_bumps_the_resource_version_and_a_no_op_does_not(custom) -> None:
    first = create_vs(custom)
    patch = {"metadata": {"labels": {"team": "fl"}}}

    second = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "fl-clients", patch
    )
    same = custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "fl-clients", patch
    )

    assert int(second["metadata"]["resourceVersion"]) > int(
        first["metadata"]["resourceVersion"]
    )
    assert same["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]
    assert second["metadata"]["uid"] == first["metadata"]["uid"]


@pytest.mark.parametrize("method", ["put", "merge-patch"])
def test_a_write_with_a_stale_resource_version_is_409_conflict(custom, method) -> None:
    stale = create_vs(custom)
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "fl-clients", {"metadata": {"labels": {"x": "1"}}}
    )
    stale["spec"]["http"][0]["name"] = "overwritten"

    with pytest.raises(client.ApiException) as caught:
        if method == "put":
            custom.replace_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, "fl-clients", stale
            )
        else:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, "fl-clients", stale
            )

    assert caught.value.status == 409
    assert "the object has been modified" in status_of(caught.value)["message"]
    live = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "fl-clients")
    assert live["spec"]["http"][0]["name"] == "user-a"


def test_json_patch_applies_and_a_failed_test_is_422(custom) -> None:
    create_vs(custom)
    ops = [{"op": "replace", "path": "/spec/http/0/name", "value": "renamed"}]

    patched = custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        "fl-clients",
        ops,
        _content_type="application/json-patch+json",
    )
    with pytest.raises(client.ApiException) as caught:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            PLURAL,
            "fl-clients",
            [{"op": "test", "path": "/spec/http/0/name", "value": "user-a"}],
            _content_type="application/json-patch+json",
        )

    assert patched["spec"]["http"][0]["name"] == "renamed"
    assert caught.value.status == 422


def test_strategic_merge_patch_on_a_custom_resource_is_415(custom) -> None:
    create_vs(custom)

    with pytest.raises(client.ApiException) as caught:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            PLURAL,
            "fl-clients",
            {"spec": {}},
            _content_type="application/strategic-merge-patch+json",
        )

    assert caught.value.status == 415


def test_server_side_apply_creates_and_records_the_field_manager(custom) -> None:
    created = apply_vs(custom, virtual_service(), "meshctl")
    applied = custom.get_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "fl-clients"
    )

    assert created is None  # 201, which the client maps to nothing for a patch
    (entry,) = applied["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"]) == ("meshctl", "Apply")
    assert entry["fieldsV1"] == {"f:spec": {"f:hosts": {}, "f:http": {}}}


def test_apply_conflicts_with_another_manager_unless_forced(custom) -> None:
    create_vs(custom)  # the client's own manager owns every field
    mine = virtual_service(route="meshctl-slot-1")

    with pytest.raises(client.ApiException) as caught:
        apply_vs(custom, mine, "meshctl")
    forced = apply_vs(custom, mine, "meshctl", force=True)

    status = status_of(caught.value)
    assert caught.value.status == 409 and status["reason"] == "Conflict"
    assert [c["field"] for c in status["details"]["causes"]] == [".spec.http"]
    owners = {e["manager"]: e["fieldsV1"] for e in forced["metadata"]["managedFields"]}
    assert owners["meshctl"] == {"f:spec": {"f:hosts": {}, "f:http": {}}}
    assert "f:http" not in owners["OpenAPI-Generator"].get("f:spec", {})


def test_apply_with_equal_values_shares_ownership_without_conflict(custom) -> None:
    create_vs(custom)

    shared = apply_vs(custom, virtual_service(), "meshctl")

    managers = {e["manager"] for e in shared["metadata"]["managedFields"]}
    assert managers == {"OpenAPI-Generator", "meshctl"}


def test_a_field_the_applier_stops_applying_is_removed_unless_shared(custom) -> None:
    body = virtual_service()
    body["metadata"]["annotations"] = {"a": "1", "b": "2"}
    apply_vs(custom, body, "meshctl")
    body["metadata"]["annotations"] = {"a": "1"}

    after = apply_vs(custom, body, "meshctl")

    assert after["metadata"]["annotations"] == {"a": "1"}


def test_apply_with_a_stale_resource_version_is_409(custom) -> None:
    stale = create_vs(custom)["metadata"]["resourceVersion"]
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "fl-clients", {"metadata": {"labels": {"x": "1"}}}
    )
    body = virtual_service()
    body["metadata"]["resourceVersion"] = stale

    with pytest.raises(client.ApiException) as caught:
        apply_vs(custom, body, "meshctl", force=True)

    assert caught.value.status == 409


def test_custom_resources_are_checked_against_their_crd_schema(custom) -> None:
    body = virtual_service()
    body["spec"]["http"][0]["route"][0]["weight"] = "heavy"

    with pytest.raises(client.ApiException) as caught:
        custom.create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, body)

    status = status_of(caught.value)
    assert caught.value.status == 422 and status["reason"] == "Invalid"
    assert status["details"]["causes"][0]["field"] == "spec.http.0.route.0.weight"


def test_a_missing_object_is_a_404_status_like_the_real_server(custom) -> None:
    with pytest.raises(client.ApiException) as caught:
        custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "nothing")

    status = status_of(caught.value)
    assert caught.value.status == 404
    assert status["kind"] == "Status" and status["reason"] == "NotFound"
    assert (
        status["message"] == 'virtualservices.networking.istio.io "nothing" not found'
    )


def test_writing_into_a_missing_namespace_is_404(api) -> None:
    with pytest.raises(client.ApiException) as caught:
        client.CoreV1Api(api).create_namespaced_config_map(
            "absent", {"metadata": {"name": "x"}}
        )

    assert caught.value.status == 404
    assert 'namespaces "absent" not found' in status_of(caught.value)["message"]


def test_role_rules_forbid_a_verb_with_a_403_naming_it(fake_kube, custom) -> None:
    create_vs(custom)
    fake_kube.allow_only(
        [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": ["get"]}]
    )

    custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "fl-clients")
    with pytest.raises(client.ApiException) as caught:
        apply_vs(custom, virtual_service(), "meshctl")

    status = status_of(caught.value)
    assert caught.value.status == 403 and status["reason"] == "Forbidden"
    assert 'cannot patch resource "virtualservices"' in status["message"]
    assert (
        'in API group "networking.istio.io" in the namespace "fl"' in status["message"]
    )


def test_dry_run_answers_the_result_and_stores_nothing(custom) -> None:
    answer = custom.create_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, virtual_service(), dry_run="All"
    )

    assert answer["metadata"]["name"] == "fl-clients"
    assert (
        custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)["items"] == []
    )


def test_discovery_serves_the_istio_crds_to_the_dynamic_client(
    api, tmp_path: Path
) -> None:
    found = dynamic.DynamicClient(api, cache_file=str(tmp_path / "discovery.json"))

    vs = found.resources.get(api_version=f"{GROUP}/{VERSION}", kind="VirtualService")
    dr = found.resources.get(api_version=f"{GROUP}/v1beta1", kind="DestinationRule")

    assert (vs.name, vs.namespaced) == (PLURAL, True)
    assert dr.name == "destinationrules"


def test_watch_streams_changes_from_a_resource_version(custom) -> None:
    start = create_vs(custom)["metadata"]["resourceVersion"]
    stream = watch.Watch()
    events: list[tuple[str, str]] = []

    def writer() -> None:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            PLURAL,
            "fl-clients",
            {"metadata": {"labels": {"x": "1"}}},
        )
        custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "fl-clients")

    thread = threading.Thread(target=writer)
    thread.start()
    for event in stream.stream(
        custom.list_namespaced_custom_object,
        GROUP,
        VERSION,
        NS,
        PLURAL,
        resource_version=start,
        timeout_seconds=5,
    ):
        events.append((event["type"], event["object"]["metadata"]["name"]))
        if event["type"] == "DELETED":
            stream.stop()
    thread.join()

    assert events == [("MODIFIED", "fl-clients"), ("DELETED", "fl-clients")]


def test_watch_without_a_version_starts_with_the_current_objects(custom) -> None:
    create_vs(custom, name="a")
    create_vs(custom, name="b")

    events = [
        (e["type"], e["object"]["metadata"]["name"])
        for e in watch.Watch().stream(
            custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURAL,
            timeout_seconds=1,
        )
    ]

    assert events == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_from_a_compacted_version_is_410_gone(fake_kube, custom) -> None:
    start = create_vs(custom)["metadata"]["resourceVersion"]
    custom.patch_namespaced_custom_object(
        GROUP, VERSION, NS, PLURAL, "fl-clients", {"metadata": {"labels": {"x": "1"}}}
    )
    fake_kube.store.compact()

    with pytest.raises(client.ApiException) as caught:
        for _ in watch.Watch().stream(
            custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURAL,
            resource_version=str(int(start) - 1),
            timeout_seconds=2,
        ):
            pass

    assert caught.value.status == 410
