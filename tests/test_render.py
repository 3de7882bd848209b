"""The renderer: valid objects, owned parts replaced, everything else kept."""

from __future__ import annotations

import copy

import pytest

import meshctl.routing
from meshctl import protocol
from meshctl.routing import render, validate
from meshctl.routing.errors import RoutingError


def _assignment(k: int) -> dict[int, str]:
    return {slot: protocol.client_id(slot * 7 % 30) for slot in range(1, k + 1)}


def _user_vs() -> dict:
    """A live VS as a user might have edited it around meshctl's routes."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {
            "name": "fl-clients",
            "namespace": "fl",
            "labels": {"team": "ml", protocol.MANAGED_BY_LABEL: "meshctl"},
            "annotations": {"note": "keep me"},
            "resourceVersion": "42",
        },
        "spec": {
            "hosts": ["fl-clients"],
            "gateways": ["mesh"],
            "http": [
                {
                    "name": "meshctl-slot-1",
                    "match": [{"headers": {"x-fl-slot": {"exact": "1"}}}],
                    "route": [
                        {"destination": {"host": "fl-clients", "subset": "c-01"}}
                    ],
                },
                {
                    "name": "canary",
                    "match": [{"uri": {"prefix": "/canary"}}],
                    "route": [
                        {"destination": {"host": "fl-clients", "subset": "canary"}}
                    ],
                    "retries": {"attempts": 3, "perTryTimeout": "2s"},
                    "timeout": "10s",
                    "fault": {
                        "delay": {"fixedDelay": "1s", "percentage": {"value": 5}}
                    },
                    "x-unknown": {"nested": [1, 2, {"deep": True}]},
                },
                {
                    "name": "health",
                    "match": [{"uri": {"exact": "/healthz"}}],
                    "directResponse": {"status": 200},
                },
                {
                    "name": "meshctl-no-slot",
                    "directResponse": {"status": 421},
                },
            ],
        },
        "status": {"observedGeneration": 3},
    }


def _user_dr() -> dict:
    """A live DR with a user subset, a user traffic policy and an owned subset."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {
            "name": "fl-clients",
            "namespace": "fl",
            "annotations": {render.OWNED_SUBSETS_ANNOTATION: "c-01"},
        },
        "spec": {
            "host": "fl-clients",
            "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 7}}},
            "subsets": [
                {"name": "canary", "labels": {"track": "canary"}, "x-extra": "yes"},
                {"name": "c-01", "labels": {protocol.CLIENT_LABEL: "c-01"}},
            ],
        },
    }


# --- exact mode --------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 8, 30], ids=lambda k: f"k={k}")
def test_exact_mode_objects_pass_meshctl_rules_and_the_crd_schema(
    k: int, istio_schemas: dict
) -> None:
    vs, dr = render.render_exact(_assignment(k), routing_version="r1-abc")

    problems = validate.validate_objects([vs, dr], schemas=istio_schemas)

    assert problems == []
    assert len(vs["spec"]["http"]) == k + 1
    assert len(dr["spec"]["subsets"]) == k


def test_exact_mode_matches_the_documented_shape() -> None:
    vs, dr = render.render_exact({1: "c-03", 2: "c-07"}, routing_version="r3-1a2b")

    assert (
        vs["metadata"]["annotations"][protocol.ROUTING_VERSION_ANNOTATION] == "r3-1a2b"
    )
    assert vs["metadata"]["labels"] == {protocol.MANAGED_BY_LABEL: "meshctl"}
    assert vs["spec"]["hosts"] == ["fl-clients"]
    assert vs["spec"]["http"][0] == {
        "name": "meshctl-slot-1",
        "match": [{"headers": {"x-fl-slot": {"exact": "1"}}}],
        "route": [{"destination": {"host": "fl-clients", "subset": "c-03"}}],
    }
    assert vs["spec"]["http"][-1]["directResponse"]["status"] == 421
    assert dr["spec"]["trafficPolicy"] == render.default_traffic_policy()
    assert dr["spec"]["subsets"] == [
        {"name": "c-03", "labels": {protocol.CLIENT_LABEL: "c-03"}},
        {"name": "c-07", "labels": {protocol.CLIENT_LABEL: "c-07"}},
    ]
    assert dr["metadata"]["annotations"][render.OWNED_SUBSETS_ANNOTATION] == "c-03,c-07"


def test_slot_routes_come_in_slot_order_whatever_the_mapping_order() -> None:
    vs, _ = render.render_exact({3: "c-01", 1: "c-02", 2: "c-00"}, routing_version="v")

    names = [r["name"] for r in vs["spec"]["http"]]

    assert names == [
        "meshctl-slot-1",
        "meshctl-slot-2",
        "meshctl-slot-3",
        "meshctl-no-slot",
    ]


def test_user_routes_and_unknown_fields_survive_rendering_unchanged() -> None:
    live_vs, live_dr = _user_vs(), _user_dr()
    before_vs, before_dr = copy.deepcopy(live_vs), copy.deepcopy(live_dr)

    vs, dr = render.render_exact(
        {1: "c-05", 2: "c-06"}, routing_version="r2", live_vs=live_vs, live_dr=live_dr
    )

    assert (live_vs, live_dr) == (before_vs, before_dr)
    assert vs["spec"]["http"][2:4] == before_vs["spec"]["http"][1:3]
    assert vs["status"] == before_vs["status"]
    assert vs["spec"]["gateways"] == ["mesh"]
    assert vs["metadata"]["labels"]["team"] == "ml"
    assert vs["metadata"]["annotations"]["note"] == "keep me"
    assert vs["metadata"]["resourceVersion"] == "42"
    assert dr["spec"]["trafficPolicy"] == before_dr["spec"]["trafficPolicy"]
    assert dr["spec"]["subsets"][0] == before_dr["spec"]["subsets"][0]


def test_owned_routes_are_replaced_user_routes_keep_their_order() -> None:
    vs, _ = render.render_exact(
        {1: "c-05"}, routing_version="r2", live_vs=_user_vs(), live_dr=_user_dr()
    )

    names = [r["name"] for r in vs["spec"]["http"]]

    assert names == ["meshctl-slot-1", "canary", "health", "meshctl-no-slot"]
    assert vs["spec"]["http"][0]["route"][0]["destination"]["subset"] == "c-05"


def test_owned_subsets_no_route_references_are_pruned() -> None:
    _, dr = render.render_exact({1: "c-05"}, routing_version="r2", live_dr=_user_dr())

    names = [s["name"] for s in dr["spec"]["subsets"]]

    assert names == ["canary", "c-05"]
    assert dr["metadata"]["annotations"][render.OWNED_SUBSETS_ANNOTATION] == "c-05"


def test_an_owned_subset_a_user_route_references_is_kept() -> None:
    live_vs = _user_vs()
    live_vs["spec"]["http"][1]["route"][0]["destination"]["subset"] = "c-01"

    _, dr = render.render_exact(
        {1: "c-05"}, routing_version="r2", live_vs=live_vs, live_dr=_user_dr()
    )

    assert [s["name"] for s in dr["spec"]["subsets"]] == ["canary", "c-01", "c-05"]


def test_a_user_subset_selecting_exactly_the_client_is_reused_not_taken_over() -> None:
    live_dr = _user_dr()
    live_dr["spec"]["subsets"].append(
        {"name": "c-09", "labels": {protocol.CLIENT_LABEL: "c-09"}}
    )

    _, dr = render.render_exact({1: "c-09"}, routing_version="r2", live_dr=live_dr)

    assert [s["name"] for s in dr["spec"]["subsets"]] == ["canary", "c-09"]
    assert dr["metadata"]["annotations"][render.OWNED_SUBSETS_ANNOTATION] == ""


def test_a_user_subset_with_a_client_name_but_other_labels_is_refused() -> None:
    live_dr = _user_dr()
    live_dr["spec"]["subsets"].append({"name": "c-09", "labels": {"app": "other"}})

    with pytest.raises(RoutingError, match=r"subset 'c-09' is the user's"):
        render.render_exact({1: "c-09"}, routing_version="r2", live_dr=live_dr)


def test_a_user_catch_all_route_replaces_the_fallback() -> None:
    live_vs = _user_vs()
    catch_all = {"name": "default", "route": [{"destination": {"host": "fl-clients"}}]}
    live_vs["spec"]["http"].append(catch_all)

    vs, _ = render.render_exact(
        {1: "c-05"}, routing_version="r2", live_vs=live_vs, live_dr=_user_dr()
    )

    assert vs["spec"]["http"][-1] == catch_all
    assert protocol.FALLBACK_ROUTE_NAME not in [r["name"] for r in vs["spec"]["http"]]


def test_extra_subsets_are_added_and_owned_without_a_route() -> None:
    vs, dr = render.render_exact(
        {1: "c-01"}, routing_version="v", extra_subsets=["c-02"]
    )

    assert [s["name"] for s in dr["spec"]["subsets"]] == ["c-01", "c-02"]
    assert validate.referenced_subsets(vs) == {"c-01"}


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ({1: "C-01"}, "not a DNS-1123 label"),
        ({1: "c_01"}, "not a DNS-1123 label"),
        ({1: "a" * 64}, "not a DNS-1123 label"),
        ({0: "c-01"}, "slot 0 is not an integer >= 1"),
        ({True: "c-01"}, "slot True"),
        ({1: "c-01", 2: "c-01"}, "assigned to slots 1 and 2"),
    ],
    ids=["upper-case", "underscore", "too-long", "slot-zero", "slot-bool", "twice"],
)
def test_exact_mode_refuses_bad_assignments(assignment: dict, message: str) -> None:
    with pytest.raises(RoutingError, match=message):
        render.render_exact(assignment, routing_version="v")


def test_a_live_dr_for_another_host_is_refused() -> None:
    live_dr = _user_dr()
    live_dr["spec"]["host"] = "other"

    with pytest.raises(RoutingError, match=r"spec.host is 'other'"):
        render.render_exact({1: "c-01"}, routing_version="v", live_dr=live_dr)


def test_an_empty_routing_version_is_refused() -> None:
    with pytest.raises(RoutingError, match="routing version"):
        render.render_exact({1: "c-01"}, routing_version=" ")


# --- weighted mode -----------------------------------------------------------


def test_weighted_mode_has_one_route_with_integer_weights(istio_schemas: dict) -> None:
    vs, dr = render.render_weighted(
        {"c-02": 30, "c-01": 70, "c-03": 0}, routing_version="w1"
    )

    route = vs["spec"]["http"][0]
    assert route["name"] == render.WEIGHTED_ROUTE_NAME
    assert [(e["destination"]["subset"], e["weight"]) for e in route["route"]] == [
        ("c-01", 70),
        ("c-02", 30),
    ]
    assert [s["name"] for s in dr["spec"]["subsets"]] == ["c-01", "c-02"]
    assert validate.validate_objects([vs, dr], schemas=istio_schemas) == []


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"c-01": 0, "c-02": 0}, "at least one client of positive weight"),
        ({}, "at least one client of positive weight"),
        ({"c-01": -1}, "weight -1"),
        ({"c-01": 1.5}, "weight 1.5"),
        ({"c-01": True}, "weight True"),
        ({"C1": 5}, "not a DNS-1123 label"),
    ],
    ids=["all-zero", "empty", "negative", "float", "bool", "bad-name"],
)
def test_weighted_mode_refuses_bad_weights(weights: dict, message: str) -> None:
    with pytest.raises(RoutingError, match=message):
        render.render_weighted(weights, routing_version="v")


@pytest.mark.parametrize(
    ("scores", "total", "expected"),
    [
        # shares 33.3 / 33.3 / 33.3: one unit left, the tie goes to the first id
        ({"a": 1, "b": 1, "c": 1}, 100, {"a": 34, "b": 33, "c": 33}),
        # shares 14.2857 / 28.5714 / 57.1428: floors 14+28+57=99, largest rest is b
        ({"a": 1, "b": 2, "c": 4}, 100, {"a": 14, "b": 29, "c": 57}),
        # shares 4.5 / 4.5 / 1.0 of 10: floors 4+4+1=9, tie of .5 goes to a
        ({"a": 0.45, "b": 0.45, "c": 0.1}, 10, {"a": 5, "b": 4, "c": 1}),
        # exact shares need no rounding; a zero score gets weight 0
        ({"a": 3, "b": 1, "z": 0}, 4, {"a": 3, "b": 1, "z": 0}),
        # shares 0.5 / 0.25 / 0.25 of 1: one unit, to the largest remainder
        ({"a": 2, "b": 1, "c": 1}, 1, {"a": 1, "b": 0, "c": 0}),
    ],
    ids=["thirds", "sevenths", "half-ties", "exact", "one-unit"],
)
def test_weights_from_scores_rounds_by_largest_remainder(
    scores: dict, total: int, expected: dict
) -> None:
    weights = render.weights_from_scores(scores, total=total)

    assert weights == expected
    assert sum(weights.values()) == total


@pytest.mark.parametrize(
    "bad",
    [float("nan"), float("inf"), -0.5, "1"],
    ids=["nan", "inf", "negative", "string"],
)
def test_weights_from_scores_refuses_a_bad_score_naming_the_client(bad: object) -> None:
    with pytest.raises(RoutingError, match="client c-07"):
        render.weights_from_scores({"c-01": 1.0, "c-07": bad})


def test_weights_from_scores_refuses_an_all_zero_score() -> None:
    with pytest.raises(RoutingError, match="no client has a positive score"):
        render.weights_from_scores({"c-01": 0.0, "c-02": 0})


# --- size budget -------------------------------------------------------------


def test_check_size_returns_the_json_size_within_budget() -> None:
    assert render.check_size({"kind": "X", "spec": {}}) == len('{"kind":"X","spec":{}}')


def test_check_size_names_size_budget_and_counts_over_budget() -> None:
    vs, _ = render.render_exact(_assignment(5), routing_version="v")

    with pytest.raises(
        RoutingError, match=r"bytes is over the budget of 100 bytes \(6 routes"
    ):
        render.check_size(vs, budget_bytes=100)


def test_the_renderer_refuses_objects_over_the_budget() -> None:
    with pytest.raises(RoutingError, match="over the budget of 200 bytes"):
        render.render_exact(_assignment(8), routing_version="v", budget_bytes=200)


def test_the_default_budget_holds_hundreds_of_slots() -> None:
    vs, dr = render.render_exact(
        {slot: f"c-{slot:03d}" for slot in range(1, 501)}, routing_version="v"
    )

    assert render.check_size(vs) < render.DEFAULT_SIZE_BUDGET_BYTES


def test_the_routing_package_exports_exactly_its_public_api() -> None:
    assert sorted(meshctl.routing.__all__) == [
        "Hysteresis",
        "Problem",
        "RoutingError",
        "Step",
        "check_size",
        "load_crd_schemas",
        "load_yaml_documents",
        "plan_transition",
        "render_exact",
        "render_weighted",
        "validate_objects",
        "weights_for_clients",
        "weights_from_scores",
    ]
    for name in meshctl.routing.__all__:
        assert getattr(meshctl.routing, name).__doc__
