"""Make-before-break plans: the order of writes keeps every route routable."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshctl import protocol
from meshctl.routing import plan, render, validate
from meshctl.routing.errors import RoutingError

CLIENTS = [protocol.client_id(i) for i in range(30)]
VERSION = protocol.ROUTING_VERSION_ANNOTATION


def _exact(clients: list[str], version: str, live=(None, None)) -> tuple[dict, dict]:
    assignment = dict(enumerate(clients, start=1))
    return render.render_exact(
        assignment, routing_version=version, live_vs=live[0], live_dr=live[1]
    )


def _subset_names(dr: dict | None) -> set[str]:
    return {s["name"] for s in (dr or {}).get("spec", {}).get("subsets") or []}


def _assert_routable(vs: dict | None, dr: dict | None) -> None:
    """Invariants 1 and 2 for one live state of the data plane."""
    if vs is None:
        return
    assert validate.referenced_subsets(vs) <= _subset_names(dr)
    for route in vs["spec"]["http"]:
        assert validate.route_destinations(route) or route.get("directResponse")


def _assert_reached(live: tuple, desired: tuple, steps: list[plan.Step]) -> None:
    """The final state is the desired one; an object not written differed only in
    its routing version."""
    written = {step.kind for step in steps[-2:]}
    for obj, want in zip(live, desired, strict=True):
        if obj["kind"] in written:
            assert obj == want
        else:
            assert plan._without_version(obj) == plan._without_version(want)


def _apply(steps: list[plan.Step], live: tuple) -> tuple:
    """Apply steps one by one, checking the invariants after each."""
    vs, dr = live
    for step in steps:
        if step.kind == "VirtualService":
            vs = step.obj
        else:
            dr = step.obj
        _assert_routable(vs, dr)
    return vs, dr


# --- properties --------------------------------------------------------------

selections = st.lists(
    st.lists(st.sampled_from(CLIENTS), min_size=1, max_size=8, unique=True),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(selections=selections)
def test_every_intermediate_state_routes_only_to_existing_subsets(
    selections: list[list[str]],
) -> None:
    live: tuple = (None, None)
    for number, clients in enumerate(selections):
        desired = _exact(clients, f"r{number}", live)

        steps = plan.plan_transition(*live, *desired, ready_subsets=CLIENTS)
        live = _apply(steps, live)

        _assert_reached(live, desired, steps)


@settings(max_examples=100, deadline=None)
@given(
    selections=selections,
    weighted=st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_exact_and_weighted_modes_switch_safely_around_user_routes(
    selections: list[list[str]], weighted: list[bool]
) -> None:
    live: tuple = (_user_vs(), _user_dr())
    for number, clients in enumerate(selections):
        if weighted[number]:
            weights = {c: i + 1 for i, c in enumerate(clients)}
            desired = render.render_weighted(
                weights, routing_version=f"w{number}", live_vs=live[0], live_dr=live[1]
            )
        else:
            desired = _exact(clients, f"r{number}", live)

        steps = plan.plan_transition(*live, *desired)
        live = _apply(steps, live)

        _assert_reached(live, desired, steps)
        assert live[1]["spec"]["subsets"][0]["name"] == "canary"


@settings(max_examples=100, deadline=None)
@given(before=selections.map(lambda s: s[0]), after=selections.map(lambda s: s[0]))
def test_a_plan_has_at_most_one_write_per_phase_in_order(
    before: list[str], after: list[str]
) -> None:
    live = _exact(before, "r1")
    desired = _exact(after, "r2", live)

    steps = plan.plan_transition(*live, *desired)

    kinds = [s.kind for s in steps]
    assert kinds in (
        [],
        ["VirtualService"],
        ["DestinationRule", "VirtualService"],
        ["VirtualService", "DestinationRule"],
        ["DestinationRule", "VirtualService", "DestinationRule"],
    )
    added = set(after) - set(before)
    removed = set(before) - set(after)
    assert (kinds[:1] == ["DestinationRule"]) == bool(added)
    if removed:
        assert kinds[-2:] == ["VirtualService", "DestinationRule"]
    if not added and not removed:
        assert kinds in ([], ["VirtualService"])


# --- examples ----------------------------------------------------------------


def test_the_first_plan_creates_the_destination_rule_then_the_routes() -> None:
    desired = _exact(["c-01", "c-02"], "r1")

    steps = plan.plan_transition(None, None, *desired)

    assert [s.kind for s in steps] == ["DestinationRule", "VirtualService"]
    assert [s.obj for s in steps] == [desired[1], desired[0]]


def test_a_swap_adds_then_routes_then_prunes() -> None:
    live = _exact(["c-01", "c-02"], "r1")
    desired = _exact(["c-01", "c-03"], "r2", live)

    union, routes, prune = plan.plan_transition(*live, *desired)

    assert _subset_names(union.obj) == {"c-01", "c-02", "c-03"}
    assert union.obj["metadata"]["annotations"][VERSION] == "r2-mbb"
    assert union.obj["metadata"]["annotations"][render.OWNED_SUBSETS_ANNOTATION] == (
        "c-01,c-02,c-03"
    )
    assert "add subsets c-03" in union.reason
    assert routes.obj is desired[0]
    assert "meshctl-slot-2 -> c-03" in routes.reason
    assert prune.obj is desired[1]
    assert "prune subsets c-02" in prune.reason


def test_a_grown_selection_needs_no_prune_and_writes_the_desired_rule_at_once() -> None:
    live = _exact(["c-01"], "r1")
    desired = _exact(["c-01", "c-02"], "r2", live)

    steps = plan.plan_transition(*live, *desired)

    assert [s.obj for s in steps] == [desired[1], desired[0]]


def test_a_shrunk_selection_routes_first_then_prunes() -> None:
    live = _exact(["c-01", "c-02"], "r1")
    desired = _exact(["c-01"], "r2", live)

    steps = plan.plan_transition(*live, *desired)

    assert [s.kind for s in steps] == ["VirtualService", "DestinationRule"]


def test_the_same_selection_under_a_new_version_is_a_no_op() -> None:
    live = _exact(["c-01", "c-02"], "r1")
    desired = _exact(["c-01", "c-02"], "r2", live)

    assert plan.plan_transition(*live, *desired) == []


def test_a_changed_traffic_policy_alone_is_one_destination_rule_write() -> None:
    live = _exact(["c-01"], "r1")
    desired = copy.deepcopy(live)
    desired[1]["spec"]["trafficPolicy"]["tls"]["mode"] = "DISABLE"

    (step,) = plan.plan_transition(*live, *desired)

    assert step.kind == "DestinationRule"
    assert step.reason == "update fields other than subsets"


def test_a_subset_without_a_ready_endpoint_is_refused() -> None:
    desired = _exact(["c-01", "c-02"], "r1")

    with pytest.raises(RoutingError, match="no ready endpoint for client.* c-02"):
        plan.plan_transition(None, None, *desired, ready_subsets={"c-01"})


def test_a_desired_route_to_a_missing_subset_is_refused() -> None:
    vs, dr = _exact(["c-01", "c-02"], "r1")
    dr["spec"]["subsets"].pop()

    with pytest.raises(RoutingError, match="subset 'c-02' is not defined"):
        plan.plan_transition(None, None, vs, dr)


def test_steps_are_frozen() -> None:
    step = plan.Step("VirtualService", {}, "why")

    with pytest.raises(AttributeError):
        step.reason = "other"  # type: ignore[misc]


# --- helpers -----------------------------------------------------------------


def _user_vs() -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "fl-clients", "namespace": "fl"},
        "spec": {
            "hosts": ["fl-clients"],
            "http": [
                {
                    "name": "canary",
                    "match": [{"uri": {"prefix": "/canary"}}],
                    "route": [
                        {"destination": {"host": "fl-clients", "subset": "canary"}}
                    ],
                }
            ],
        },
    }


def _user_dr() -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "fl-clients", "namespace": "fl"},
        "spec": {
            "host": "fl-clients",
            "subsets": [{"name": "canary", "labels": {"track": "canary"}}],
        },
    }
