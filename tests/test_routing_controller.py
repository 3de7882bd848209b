"""Routing cases from reported failures, through the controller and the backend."""

from __future__ import annotations

import logging
import math
import random

import pytest
import yaml

from meshctl import protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import ArmError, Controller
from meshctl.policies import Selection, SelectionInput
from meshctl.routing import render
from meshctl.routing.errors import RoutingError

CLIENTS = [protocol.client_id(i) for i in range(8)]


class ScriptedPolicy:
    """Chooses what the test scripted for each round, with the scripted scores."""

    name = "scripted"

    def __init__(self, script: dict[int, tuple[tuple[str, ...], dict]]) -> None:
        self.script = script

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        clients, scores = self.script[given.server_round]
        return Selection(clients=clients, scores=scores)


class NoTelemetry:
    def read(self, window_s: float) -> dict:
        return {}


def _controller(routing_dir, script, **options) -> Controller:
    return Controller(
        clients=CLIENTS,
        policy=ScriptedPolicy(script),
        telemetry=NoTelemetry(),
        backend=DirectoryBackend(routing_dir),
        wait=lambda step: 0.0,
        ready=lambda: CLIENTS,
        **options,
    )


def _files(routing_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(routing_dir.glob("*.yaml"))}


def _vs(routing_dir) -> dict:
    return yaml.safe_load((routing_dir / "virtualservice.yaml").read_text())


@pytest.fixture
def routing_dir(tmp_path):
    return tmp_path / "routing"


# --- weighted mode, end to end -----------------------------------------------


def test_weighted_mode_routes_by_the_policy_scores(routing_dir) -> None:
    script = {1: (("c-00", "c-01", "c-02"), {"c-00": 3.0, "c-01": 1.0, "c-02": 0.0})}
    controller = _controller(routing_dir, script, mode="weighted")

    armed = controller.arm(1, 3)

    (route, *_) = _vs(routing_dir)["spec"]["http"]
    assert route["name"] == render.WEIGHTED_ROUTE_NAME
    weights = {d["destination"]["subset"]: d["weight"] for d in route["route"]}
    assert weights == {"c-00": 75, "c-01": 25}
    assert controller.records[-1].weights == {"c-00": 75, "c-01": 25, "c-02": 0}
    assert armed.slots == (1, 2, 3)


def test_an_unobserved_client_gets_the_mean_weight_not_zero(routing_dir) -> None:
    scores = {"c-00": 3.0, "c-01": 1.0, "c-02": math.nan}
    controller = _controller(
        routing_dir, {1: (("c-00", "c-01", "c-02"), scores)}, mode="weighted"
    )

    controller.arm(1, 3)

    (route, *_) = _vs(routing_dir)["spec"]["http"]
    weights = {d["destination"]["subset"]: d["weight"] for d in route["route"]}
    assert weights == {"c-00": 50, "c-01": 17, "c-02": 33}


@pytest.mark.parametrize(
    "scores",
    [
        {"c-03": 0.0, "c-04": 0.0},
        {"c-03": math.nan, "c-04": math.nan},
        {"c-03": 0.0, "c-04": math.nan},
    ],
    ids=["all-zero", "all-nan", "zero-and-nan"],
)
def test_all_zero_or_nan_scores_keep_the_last_good_routes_and_say_why(
    routing_dir, caplog, scores: dict
) -> None:
    script = {
        1: (("c-00", "c-01"), {"c-00": 1.0, "c-01": 2.0}),
        2: (("c-03", "c-04"), scores),
    }
    controller = _controller(routing_dir, script, mode="weighted")
    first = controller.arm(1, 2)
    before = _files(routing_dir)

    with caplog.at_level(logging.ERROR, logger="meshctl.controller"):
        second = controller.arm(2, 2)

    assert _files(routing_dir) == before
    assert second.routing_version == first.routing_version
    assert controller.records[-1].selected == ("c-00", "c-01")
    assert (
        "no client has a positive, finite score" in controller.records[-1].routing_note
    )
    assert "no client has a positive, finite score" in caplog.text


def test_the_backend_refuses_a_route_whose_weights_sum_to_zero(routing_dir) -> None:
    backend = DirectoryBackend(routing_dir)
    vs, dr = render.render_weighted({"c-00": 60, "c-01": 40}, routing_version="w1")
    backend.write(dr)
    backend.write(vs)
    before = _files(routing_dir)
    for destination in vs["spec"]["http"][0]["route"]:
        destination["weight"] = 0

    with pytest.raises(RoutingError, match=r"spec\.http\[0\]\.route: weights sum to 0"):
        backend.write(vs)

    assert _files(routing_dir) == before


# --- a live VirtualService with several destinations and no weights ---------


def _unweighted_user_route() -> dict:
    return {
        "name": "user-split",
        "match": [{"uri": {"prefix": "/eval"}}],
        "route": [
            {"destination": {"host": "fl-clients", "subset": "c-00"}},
            {"destination": {"host": "fl-clients", "subset": "c-01"}},
        ],
    }


def _edit_vs(routing_dir, edit) -> None:
    path = routing_dir / "virtualservice.yaml"
    vs = yaml.safe_load(path.read_text())
    edit(vs)
    path.write_text(yaml.safe_dump(vs, sort_keys=False))


def test_a_user_route_without_weights_is_reported_not_read_as_even(
    routing_dir, caplog
) -> None:
    script = {
        1: (("c-00", "c-01"), {}),
        2: (("c-02", "c-03"), {}),
    }
    controller = _controller(routing_dir, script)
    first = controller.arm(1, 2)
    _edit_vs(
        routing_dir, lambda vs: vs["spec"]["http"].insert(2, _unweighted_user_route())
    )
    before = _files(routing_dir)

    second = controller.arm(2, 2)

    assert _files(routing_dir) == before
    assert second.routing_version == first.routing_version
    note = controller.records[-1].routing_note
    assert "spec.http[2].route: 2 destinations and no weights" in note
    assert "already in the live object" in note
    assert "invalid live routing object" in caplog.text


def test_a_first_round_over_an_invalid_live_route_is_an_arm_error(routing_dir) -> None:
    vs, dr = render.render_exact({1: "c-00"}, routing_version="v0")
    vs["spec"]["http"].insert(1, _unweighted_user_route())
    routing_dir.mkdir()
    (routing_dir / "virtualservice.yaml").write_text(yaml.safe_dump(vs))
    (routing_dir / "destinationrule.yaml").write_text(yaml.safe_dump(dr))
    before = _files(routing_dir)

    with pytest.raises(ArmError, match=r"2 destinations and no weights"):
        _controller(routing_dir, {1: (("c-02",), {})}).arm(1, 1)

    assert _files(routing_dir) == before


def test_meshctl_replaces_its_own_route_left_without_weights(
    routing_dir, caplog
) -> None:
    script = {
        1: (("c-00", "c-01"), {"c-00": 1.0, "c-01": 1.0}),
        2: (("c-00", "c-01"), {"c-00": 3.0, "c-01": 1.0}),
    }
    controller = _controller(routing_dir, script, mode="weighted")
    controller.arm(1, 2)

    def drop_weights(vs: dict) -> None:
        for destination in vs["spec"]["http"][0]["route"]:
            del destination["weight"]

    _edit_vs(routing_dir, drop_weights)

    controller.arm(2, 2)

    (route, *_) = _vs(routing_dir)["spec"]["http"]
    assert [d["weight"] for d in route["route"]] == [75, 25]
    assert "spec.http[0].route: 2 destinations and no weights" in caplog.text


# --- user fields survive selection changes byte for byte ---------------------


def test_retries_timeout_and_fault_survive_two_selection_changes_byte_for_byte(
    routing_dir,
) -> None:
    user_route = {
        "name": "user-train",
        "match": [{"uri": {"prefix": "/train"}}],
        "route": [{"destination": {"host": "fl-clients", "subset": "c-07"}}],
        "retries": {"attempts": 3, "perTryTimeout": "10s"},
        "timeout": "30s",
        "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 0.5}}},
    }
    script = {
        1: (("c-00", "c-01"), {}),
        2: (("c-02", "c-03"), {}),
        3: (("c-04", "c-05"), {}),
    }
    controller = _controller(routing_dir, script)
    controller.arm(1, 2)
    _edit_vs(routing_dir, lambda vs: vs["spec"]["http"].insert(2, user_route))
    _add_user_subset(routing_dir, "c-07")
    before = _route_text(routing_dir, "user-train")

    controller.arm(2, 2)
    controller.arm(3, 2)

    assert [r.selected for r in controller.records] == [
        ("c-00", "c-01"),
        ("c-02", "c-03"),
        ("c-04", "c-05"),
    ]
    assert _route_text(routing_dir, "user-train") == before
    assert "retries:\n      attempts: 3\n      perTryTimeout: 10s\n" in before
    assert "timeout: 30s" in before and "fault:" in before


def _add_user_subset(routing_dir, name: str) -> None:
    path = routing_dir / "destinationrule.yaml"
    dr = yaml.safe_load(path.read_text())
    dr["spec"]["subsets"].insert(
        0, {"name": name, "labels": {protocol.CLIENT_LABEL: name}}
    )
    path.write_text(yaml.safe_dump(dr, sort_keys=False))


def _route_text(routing_dir, name: str) -> str:
    """The YAML lines of one http route, exactly as the file holds them."""
    lines = (routing_dir / "virtualservice.yaml").read_text().splitlines()
    start = lines.index(f"  - name: {name}")
    end = next(
        (i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")),
        len(lines),
    )
    return "\n".join(lines[start:end]) + "\n"


# --- the size budget ---------------------------------------------------------


def test_a_selection_over_the_size_budget_is_refused_and_the_routes_stay(
    routing_dir,
) -> None:
    script = {1: (tuple(CLIENTS[:2]), {}), 2: (tuple(CLIENTS), {})}
    controller = _controller(routing_dir, script, budget_bytes=1200)
    first = controller.arm(1, 2)
    before = _files(routing_dir)

    second = controller.arm(2, 8)

    assert _files(routing_dir) == before
    assert second.routing_version == first.routing_version
    note = controller.records[-1].routing_note
    assert "over the budget of 1200 bytes" in note
