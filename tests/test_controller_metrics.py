"""The controller's own metrics, read the way Prometheus reads them: GET /metrics."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshctl import policies, protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller
from meshctl.controller.roundapi import RoundAPIServer
from meshctl.types import ClientState, ClientTelemetry

CLIENTS = [protocol.client_id(i) for i in range(5)]


class ScriptedTelemetry:
    """Telemetry that says what the test tells it, or fails."""

    def __init__(self) -> None:
        self.clients: dict[str, ClientTelemetry] = {}
        self.fail = False

    def read(self, window_s: float) -> dict[str, ClientTelemetry]:
        if self.fail:
            raise ConnectionError("Prometheus down")
        return dict(self.clients)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def served(tmp_path):
    telemetry = ScriptedTelemetry()
    controller = Controller(
        clients=CLIENTS,
        policy=policies.create("random"),
        telemetry=telemetry,
        backend=DirectoryBackend(tmp_path / "routing"),
        wait=lambda step: 0.0,
        ready=lambda: CLIENTS,
        seed=2,
        telemetry_retry_s=(0.0, 0.0),
    )
    server = RoundAPIServer(controller).start()
    yield controller, telemetry, server.url
    server.stop()


def test_metrics_show_the_selection_states_changes_and_failures(served) -> None:
    controller, telemetry, url = served
    telemetry.clients = {
        "c-00": ClientTelemetry("c-00", ClientState.OBSERVED, 10, 1.0, 0.0),
        "c-01": ClientTelemetry("c-01", ClientState.FAILING, 10, 1.0, 0.9),
    }
    controller.arm(1, 2)
    controller.arm(2, 3)
    telemetry.fail = True
    controller.arm(3, 3)  # no telemetry: the routes of round 2 stay

    response = httpx.get(f"{url}/metrics")
    samples = _samples(response.text)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    selected = {c for c in CLIENTS if samples[_client("selected", c)] == 1}
    assert selected == set(controller.records[-1].selected)
    assert len(selected) == 3
    assert all(samples[_client("weight", c)] == 100 for c in selected)
    assert samples[("meshctl_controller_routing_changes_total", ())] == 1
    assert (
        samples[("meshctl_controller_failures_total", (("stage", "telemetry"),))] == 1
    )
    assert samples[("meshctl_controller_failures_total", (("stage", "routing"),))] == 0
    assert samples[("meshctl_controller_cycle_seconds_count", ())] == 3
    assert samples[("meshctl_controller_round", ())] == 3
    # Round 3 had no telemetry: every client counts as unobserved.
    assert samples[("meshctl_controller_clients", (("state", "unobserved"),))] == 5


def test_clients_by_state_follow_the_last_telemetry(served) -> None:
    controller, telemetry, url = served
    telemetry.clients = {
        "c-00": ClientTelemetry("c-00", ClientState.OBSERVED, 10, 1.0, 0.0),
        "c-01": ClientTelemetry("c-01", ClientState.FAILING, 10, 1.0, 0.9),
    }
    controller.arm(1, 2)

    samples = _samples(httpx.get(f"{url}/metrics").text)

    by_state = {
        state: samples[("meshctl_controller_clients", (("state", state),))]
        for state in ("observed", "unobserved", "failing")
    }
    assert by_state == {"observed": 1, "unobserved": 3, "failing": 1}


def _client(metric: str, client: str) -> tuple[str, tuple]:
    return (f"meshctl_controller_client_{metric}", (("client", client),))


def test_client_scores_are_those_of_the_last_armed_round(served) -> None:
    controller, telemetry, url = served
    controller.arm(1, 2)
    controller.policy = policies.create("mesh")
    telemetry.clients = {
        c: ClientTelemetry(c, ClientState.OBSERVED, 10, 1.0, 0.0, 50.0, 90.0)
        for c in CLIENTS
    }
    controller.arm(2, 2)

    samples = _samples(httpx.get(f"{url}/metrics").text)

    scores = {c: samples.get(_client("score", c)) for c in CLIENTS}
    assert scores == pytest.approx(dict(controller.records[-1].scores))


def test_older_records_keep_their_decision_but_not_every_clients_detail(
    served,
) -> None:
    controller, telemetry, url = served
    telemetry.clients = {
        "c-00": ClientTelemetry("c-00", ClientState.OBSERVED, 10, 1.0, 0.0),
    }
    for server_round in range(1, 5):
        controller.arm(server_round, 2)

    first, *_, before_last, last = controller.records
    assert first.selected and first.routing_version
    assert first.telemetry == {} and first.scores == {} and first.reasons == {}
    assert "c-00" in before_last.telemetry and "c-00" in last.telemetry
