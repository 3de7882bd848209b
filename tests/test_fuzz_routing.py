"""Fuzzing VirtualServices and DestinationRules as a cluster or a routing
directory may hold them: every field kept, dropped, changed or junk.

Validation lists problems, rendering and planning raise ``RoutingError``, the
local mesh's translation raises ``TranslationError``; each names the object and
the field, and nothing else escapes.
"""

from __future__ import annotations

import copy

from hypothesis import example, given
from hypothesis import strategies as st

from meshctl import protocol
from meshctl.localmesh import translate
from meshctl.routing import RoutingError, plan_transition, render_exact
from meshctl.routing import validate as routing_validate
from meshctl.types import Workload
from tests.fuzz_support import JUNK, fuzz, shaped

LIVE_VS, LIVE_DR = render_exact({1: "c-01", 2: "c-02"}, routing_version="v1")
LIVE_VS["spec"]["http"].insert(
    0,
    {
        "name": "user-route",
        "match": [
            {
                "uri": {"prefix": "/health"},
                "headers": {"x-user": {"regex": "a.*"}, "x-exact": {"exact": "1"}},
            }
        ],
        "route": [
            {"destination": {"host": "fl-clients", "subset": "c-01"}, "weight": 100}
        ],
        "timeout": "10s",
        "retries": {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"},
        "fault": {
            "delay": {"fixedDelay": "1s", "percentage": {"value": 10.0}},
            "abort": {"httpStatus": 503, "percent": 5},
        },
        "headers": {"request": {"set": {"x-a": "b"}, "remove": ["x-c"]}},
        "rewrite": {"uri": "/", "authority": "fl-clients"},
    },
)
LIVE_DR["spec"]["subsets"].append(
    {
        "name": "user-subset",
        "labels": {"app": "fl-client"},
        "trafficPolicy": {
            "connectionPool": {
                "tcp": {"maxConnections": 10, "connectTimeout": "1s"},
                "http": {"http1MaxPendingRequests": 5, "idleTimeout": "30s"},
            },
            "loadBalancer": {"simple": "ROUND_ROBIN"},
        },
    }
)
VIRTUAL_SERVICES = shaped(LIVE_VS)
DESTINATION_RULES = shaped(LIVE_DR)
OBJECTS = st.lists(st.one_of(VIRTUAL_SERVICES, DESTINATION_RULES, JUNK), max_size=3)
ASSIGNMENTS = st.dictionaries(
    st.integers(min_value=1, max_value=5),
    st.sampled_from(["c-01", "c-02", "c-03", "user-subset"]),
    min_size=1,
    max_size=3,
)
WORKLOADS = [
    Workload(
        name,
        "127.0.0.1",
        9000 + index,
        {protocol.CLIENT_LABEL: name, protocol.APP_LABEL: protocol.APP_VALUE},
    )
    for index, name in enumerate(["c-01", "c-02"])
]


def _check_problems(objs: list, schemas: dict | None) -> None:
    problems = routing_validate.validate_objects(objs, schemas=schemas)
    for problem in problems:
        assert problem.object and problem.message, problem
        assert str(problem).startswith("<memory>")


@fuzz(150)
@given(objs=OBJECTS)
@example(objs=[{"kind": "VirtualService", "spec": {"http": [{"route": [7]}]}}])
@example(objs=[{"kind": "VirtualService", "metadata": True, "spec": {"http": [{}]}}])
@example(objs=[{"kind": "DestinationRule", "metadata": [1], "spec": [1]}])
@example(objs=[{"kind": "DestinationRule", "metadata": {"namespace": [1]}}])
@example(objs=[{"kind": "DestinationRule", "spec": {"host": "h", "subsets": 5}}])
@example(objs=[{"kind": "VirtualService", "spec": {"hosts": ["h"], "http": 5}}])
@example(objs=[{"kind": "VirtualService", "spec": {"http": [{"match": 1}]}}])
@example(objs=[{"kind": "VirtualService", "spec": {"http": [{"name": []}]}}])
@example(
    objs=[
        {"kind": "VirtualService", "spec": {"http": [{"route": [{"destination": 1}]}]}}
    ]
)
@example(
    objs=[
        {
            "kind": "VirtualService",
            "spec": {"http": [{"route": [{"destination": {"subset": [1]}}]}]},
        },
        {"kind": "DestinationRule", "spec": {"host": "", "subsets": []}},
    ]
)
def test_validation_lists_problems_for_any_object(objs) -> None:
    _check_problems(objs, None)


@fuzz(80)
@given(objs=OBJECTS)
def test_schema_validation_lists_problems_for_any_object(objs, istio_schemas) -> None:
    _check_problems(objs, istio_schemas)


@fuzz(60)
@given(assignment=ASSIGNMENTS, live_vs=VIRTUAL_SERVICES, live_dr=DESTINATION_RULES)
@example(assignment={1: "c-01"}, live_vs={"metadata": None}, live_dr=None)
@example(assignment={1: "c-01"}, live_vs={"spec": {"hosts": 0}}, live_dr=None)
@example(assignment={1: "c-01"}, live_vs=None, live_dr={"spec": {"host": 1}})
@example(
    assignment={1: "c-01"},
    live_vs=None,
    live_dr={"metadata": {"annotations": {"meshctl.io/owned-subsets": None}}},
)
def test_rendering_over_any_live_objects_renders_or_names_the_problem(
    assignment, live_vs, live_dr
) -> None:
    live_vs = live_vs if isinstance(live_vs, dict) else None
    live_dr = live_dr if isinstance(live_dr, dict) else None
    before = copy.deepcopy((live_vs, live_dr))
    try:
        vs, dr = render_exact(
            assignment, routing_version="v2", live_vs=live_vs, live_dr=live_dr
        )
    except RoutingError as exc:
        assert str(exc)
    else:
        assert vs["kind"] == "VirtualService" and dr["kind"] == "DestinationRule"
    assert (live_vs, live_dr) == before, "the live objects must stay untouched"


@fuzz(60)
@given(live_vs=VIRTUAL_SERVICES, live_dr=DESTINATION_RULES, assignment=ASSIGNMENTS)
@example(live_vs=None, live_dr={"spec": {"subsets": [{}]}}, assignment={1: "c-01"})
@example(live_vs=None, live_dr={"spec": {"subsets": True}}, assignment={1: "c-01"})
@example(
    live_vs={"spec": {"http": [{"route": [{"destination": {"host": 1}}]}]}},
    live_dr=None,
    assignment={1: "c-01"},
)
def test_planning_from_any_live_objects_plans_or_names_the_problem(
    live_vs, live_dr, assignment
) -> None:
    try:
        desired_vs, desired_dr = render_exact(assignment, routing_version="v3")
    except RoutingError:
        return
    try:
        steps = plan_transition(
            live_vs if isinstance(live_vs, dict) else None,
            live_dr if isinstance(live_dr, dict) else None,
            desired_vs,
            desired_dr,
            ready_subsets={"c-01", "c-02", "user-subset"},
        )
    except RoutingError as exc:
        assert str(exc)
    else:
        assert steps and steps[-1].obj in (desired_vs, desired_dr) or not steps


@fuzz(200)
@given(vs=VIRTUAL_SERVICES)
@example(vs={"spec": {"hosts": ["h"], "http": [{"timeout": "99999999999999h"}]}})
@example(vs={"metadata": True, "spec": {"hosts": ["fl-clients"]}})
@example(vs={"metadata": {"annotations": [[]]}, "spec": {"hosts": ["fl-clients"]}})
def test_translating_any_virtual_service_gives_routes_or_names_the_field(vs) -> None:
    try:
        translate.translate_virtual_service(vs)
    except translate.TranslationError as exc:
        assert "VirtualService" in str(exc)


@fuzz(200)
@given(dr=DESTINATION_RULES)
def test_translating_any_destination_rule_gives_clusters_or_names_the_field(
    dr,
) -> None:
    try:
        translate.translate_destination_rule(dr, WORKLOADS)
    except translate.TranslationError as exc:
        assert "DestinationRule" in str(exc)
