"""The controller's cycle and its round API, over a real routing directory."""

from __future__ import annotations

import httpx
import pytest
import yaml

from meshctl import policies, protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import ArmError, Controller
from meshctl.controller.roundapi import RoundAPIClient, RoundAPIError, RoundAPIServer
from meshctl.types import ClientState, ClientTelemetry, SlotOutcome

CLIENTS = [protocol.client_id(i) for i in range(6)]


class StaticTelemetry:
    """Telemetry that says what the test tells it to."""

    def __init__(self) -> None:
        self.clients: dict[str, ClientTelemetry] = {}
        self.fail = False

    def read(self, window_s: float) -> dict[str, ClientTelemetry]:
        if self.fail:
            raise ConnectionError("stats endpoint down")
        return dict(self.clients)


@pytest.fixture
def routing_dir(tmp_path):
    return tmp_path / "routing"


def _controller(
    routing_dir, *, policy="random", ready=CLIENTS, waits=None, telemetry=None
):
    waits = [] if waits is None else waits
    return Controller(
        clients=CLIENTS,
        policy=policies.create(policy),
        telemetry=telemetry or StaticTelemetry(),
        backend=DirectoryBackend(routing_dir),
        wait=lambda step: waits.append(step.kind) or 0.0,
        ready=lambda: list(ready),
        seed=1,
    )


def _slot_routes(routing_dir) -> dict[str, str]:
    vs = yaml.safe_load((routing_dir / "virtualservice.yaml").read_text())
    return {
        r["name"]: r["route"][0]["destination"]["subset"]
        for r in vs["spec"]["http"]
        if "route" in r
    }


def test_arming_routes_one_slot_to_each_chosen_client(routing_dir) -> None:
    controller = _controller(routing_dir)

    armed = controller.arm(1, 3)

    assert armed.slots == (1, 2, 3)
    routes = _slot_routes(routing_dir)
    assert routes == {
        protocol.slot_route_name(s): c for s, c in controller.assignment(1).items()
    }
    assert list(routes.values()) == list(controller.records[0].selected)


def test_subsets_are_served_before_routes_reference_them(routing_dir) -> None:
    waits: list[str] = []
    controller = _controller(routing_dir, waits=waits)

    controller.arm(1, 2)
    controller.arm(2, 2)

    # First round: the DestinationRule, then the VirtualService.  Later rounds add
    # subsets first and prune them last (unless the selection did not change).
    assert waits[:2] == ["DestinationRule", "VirtualService"]
    assert waits[2] == "DestinationRule"


def test_a_client_without_a_ready_endpoint_is_never_routed(routing_dir) -> None:
    controller = _controller(routing_dir, ready=CLIENTS[:2])

    for server_round in range(1, 6):
        controller.arm(server_round, 2)

    assert all(set(r.selected) <= set(CLIENTS[:2]) for r in controller.records)


def test_no_ready_client_is_an_arm_error(routing_dir) -> None:
    with pytest.raises(ArmError, match="no client has a ready endpoint"):
        _controller(routing_dir, ready=[]).arm(1, 2)


def test_an_unchanged_selection_keeps_the_live_version(routing_dir) -> None:
    controller = _controller(routing_dir, ready=CLIENTS[:2])

    first = controller.arm(1, 2)
    again = controller.arm(2, 2)

    if set(controller.assignment(1).items()) == set(controller.assignment(2).items()):
        assert again.routing_version == first.routing_version
    vs = yaml.safe_load((routing_dir / "virtualservice.yaml").read_text())
    assert (
        vs["metadata"]["annotations"][protocol.ROUTING_VERSION_ANNOTATION]
        == again.routing_version
    )


def test_a_failed_apply_keeps_the_last_good_routes(routing_dir) -> None:
    controller = _controller(routing_dir)
    first = controller.arm(1, 2)
    before = (routing_dir / "virtualservice.yaml").read_text()
    controller._wait = _raise  # the data plane stops answering

    second = controller.arm(2, 2)

    assert second.routing_version == first.routing_version
    assert controller.assignment(2) == controller.assignment(1)
    assert (routing_dir / "virtualservice.yaml").read_text() == before


def _raise(step):
    raise TimeoutError("Envoy did not serve the new version")


def test_telemetry_failure_still_arms_the_round(routing_dir, caplog) -> None:
    telemetry = StaticTelemetry()
    telemetry.fail = True
    controller = _controller(routing_dir, telemetry=telemetry)

    assert controller.arm(1, 2).slots == (1, 2)
    assert "telemetry unavailable" in caplog.text


def test_feedback_is_kept_under_the_client_behind_the_slot(routing_dir) -> None:
    controller = _controller(routing_dir)
    controller.arm(1, 2)
    assignment = controller.assignment(1)

    feedback = controller.record_feedback(
        1,
        [
            SlotOutcome(server_round=1, slot=2, status="ok", duration_s=1.0),
            SlotOutcome(server_round=1, slot=9, status="ok", duration_s=1.0),
        ],
    )

    assert [f.client for f in feedback] == [assignment[2]]


def test_the_mesh_policy_stops_routing_a_failing_client(routing_dir) -> None:
    telemetry = StaticTelemetry()
    controller = _controller(routing_dir, policy="mesh", telemetry=telemetry)
    for client in CLIENTS:
        telemetry.clients[client] = ClientTelemetry(
            client=client,
            state=ClientState.OBSERVED,
            requests=4,
            error_ratio=0.0,
            latency_p95_ms=900.0,
        )
    telemetry.clients["c-02"] = ClientTelemetry(
        client="c-02",
        state=ClientState.FAILING,
        requests=4,
        error_ratio=1.0,
        latency_p95_ms=900.0,
    )

    for server_round in range(1, 5):
        controller.arm(server_round, 4)

    assert all("c-02" not in r.selected for r in controller.records)


# -- the round API over HTTP ----------------------------------------------------


@pytest.fixture
def api(routing_dir):
    controller = _controller(routing_dir)
    server = RoundAPIServer(controller).start()
    yield server, controller
    server.stop()


def test_the_round_api_arms_and_takes_feedback(api) -> None:
    server, controller = api
    client = RoundAPIClient(server.url, per_round=2)

    armed = client.arm(1)
    client.report(1, [SlotOutcome(server_round=1, slot=1, status="ok", duration_s=0.5)])

    assert armed.slots == (1, 2)
    assert armed.routing_version == controller.records[0].routing_version
    assert controller._history[controller.assignment(1)[1]][0].outcome.duration_s == 0.5
    client.close()


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        pytest.param("/v1/rounds/arm", b"{not json", "not JSON", id="not-json"),
        pytest.param("/v1/rounds/arm", b"[1]", "JSON object", id="not-an-object"),
        pytest.param(
            "/v1/rounds/arm",
            b'{"server_round": 0, "per_round": 2}',
            "server_round",
            id="round-zero",
        ),
        pytest.param(
            "/v1/rounds/arm",
            b'{"server_round": 1, "per_round": true}',
            "per_round",
            id="bool-count",
        ),
        pytest.param(
            "/v1/rounds/feedback",
            b'{"server_round": 1, "outcomes": [{"slot": 1, "extra": 1}]}',
            "unknown outcome fields",
            id="unknown-field",
        ),
    ],
)
def test_the_round_api_rejects_malformed_calls(api, path, body, message) -> None:
    server, _ = api
    response = httpx.post(server.url + path, content=body)

    assert response.status_code == 400
    assert message in response.json()["error"]


def test_a_round_api_failure_names_the_endpoint(api) -> None:
    server, _ = api
    client = RoundAPIClient(server.url + "/nowhere", per_round=2)

    with pytest.raises(RoundAPIError, match="answered 404"):
        client.arm(1)
    client.close()


def test_a_plan_that_fails_after_the_routes_switched_runs_on_the_live_routes(
    routing_dir,
) -> None:
    controller = _controller(routing_dir)
    controller.arm(1, 2)
    kinds_waited: list[str] = []

    def wait_then_time_out_on_the_prune(step):
        kinds_waited.append(step.kind)
        if step.kind == "DestinationRule" and "VirtualService" in kinds_waited:
            raise TimeoutError("Envoy did not serve the pruned clusters in time")
        return 0.0

    controller._wait = wait_then_time_out_on_the_prune
    for server_round in range(2, 8):  # until a round's plan has a prune step
        kinds_waited.clear()
        armed = controller.arm(server_round, 2)
        if kinds_waited[-1:] == ["DestinationRule"] and len(kinds_waited) == 3:
            break

    # The VirtualService was written before the failure: the round runs on it.
    assert controller.assignment(server_round) == {
        int(name.rsplit("-", 1)[1]): client
        for name, client in _slot_routes(routing_dir).items()
        if name.startswith("meshctl-slot-")
    }
    vs = yaml.safe_load((routing_dir / "virtualservice.yaml").read_text())
    assert (
        armed.routing_version
        == vs["metadata"]["annotations"][protocol.ROUTING_VERSION_ANNOTATION]
    )
