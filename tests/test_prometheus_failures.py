"""Prometheus down, slow or erroring: what the source says, what the controller does.

A stand-in Prometheus over real HTTP answers what each test tells it (a status,
a delay); the 400 comes from the real Prometheus.  The controller runs on a
real routing directory with a fake clock, so its back-off is checked without
waiting.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from meshctl import policies, protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller
from meshctl.telemetry.prometheus import PrometheusError, PrometheusSource

CONFIG = {"status": "success", "data": {"yaml": "global:\n  scrape_interval: 5s\n"}}
EMPTY = {"status": "success", "data": {"resultType": "vector", "result": []}}


class FakePrometheus:
    """Answers ``/api/v1/status/config`` and ``/api/v1/query`` as told."""

    def __init__(self) -> None:
        self.status = 200
        self.body: dict = EMPTY
        self.delay_s = 0.0
        self.queries = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                if self.path.startswith("/api/v1/status/config"):
                    self._send(200, CONFIG)
                    return
                fake.queries += 1
                time.sleep(fake.delay_s)
                self._send(fake.status, fake.body)

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, status: int, error_type: str = "", error: str = "") -> None:
        self.status = status
        self.body = (
            EMPTY
            if status == 200
            else {"status": "error", "errorType": error_type, "error": error}
        )


@pytest.fixture
def fake_prometheus() -> Iterator[FakePrometheus]:
    fake = FakePrometheus()
    thread = threading.Thread(target=fake.server.serve_forever, args=(0.05,))
    thread.start()
    yield fake
    fake.server.shutdown()
    fake.server.server_close()
    thread.join()


@pytest.mark.parametrize(
    ("status", "error_type", "kind"),
    [
        pytest.param(503, "unavailable", "unavailable", id="503"),
        pytest.param(422, "execution", "unprocessable", id="422"),
        pytest.param(500, "internal", "http", id="500"),
    ],
)
def test_an_error_answer_names_the_status_and_the_reason(
    fake_prometheus, status, error_type, kind
) -> None:
    fake_prometheus.answer(status, error_type, "query processing would load too much")
    source = PrometheusSource(fake_prometheus.url, timeout_s=2.0)

    with pytest.raises(PrometheusError) as caught:
        source.read(60)

    assert caught.value.kind == kind
    assert caught.value.status == status
    assert f"answered {status} ({error_type}: query processing" in str(caught.value)
    assert fake_prometheus.queries == 1  # tried once: the controller owns retries


def test_a_slow_prometheus_is_a_timeout_after_the_configured_seconds(
    fake_prometheus,
) -> None:
    fake_prometheus.delay_s = 1.0
    source = PrometheusSource(fake_prometheus.url, timeout_s=0.2)

    with pytest.raises(PrometheusError, match="did not answer in time") as caught:
        source.read(60)

    assert caught.value.kind == "timeout"
    assert caught.value.temporary


def test_a_prometheus_that_is_down_is_unreachable() -> None:
    from meshctl.localmesh.workloads import free_port

    source = PrometheusSource(f"http://127.0.0.1:{free_port()}", timeout_s=1.0)

    with pytest.raises(PrometheusError, match="is unreachable") as caught:
        source.read(60)

    assert caught.value.kind == "unreachable"


def test_a_query_prometheus_cannot_parse_is_a_400_from_the_real_server(
    prometheus,
) -> None:
    source = PrometheusSource(prometheus, pod_label="pod-name")  # not a label name

    with pytest.raises(PrometheusError, match="answered 400 \\(bad_data") as caught:
        source.read(60)

    assert caught.value.kind == "bad_query"
    assert not caught.value.temporary


def test_an_answer_that_is_not_a_vector_is_an_error(fake_prometheus) -> None:
    fake_prometheus.body = {
        "status": "success",
        "data": {"resultType": "scalar", "result": [1.0, "NaN"]},
    }

    with pytest.raises(PrometheusError, match="instant vector") as caught:
        PrometheusSource(fake_prometheus.url).read(60)

    assert caught.value.kind == "bad_response"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_controller_keeps_the_routes_backs_off_and_recovers(
    fake_prometheus, tmp_path, caplog
) -> None:
    clock = FakeClock()
    clients = [protocol.client_id(i) for i in range(6)]
    controller = Controller(
        clients=clients,
        policy=policies.create("random"),
        telemetry=PrometheusSource(fake_prometheus.url, timeout_s=1.0),
        backend=DirectoryBackend(tmp_path / "routing"),
        wait=lambda step: 0.0,
        ready=lambda: clients,
        seed=3,
        telemetry_retry_s=(5.0, 300.0),
        clock=clock,
    )
    first = controller.arm(1, 2)
    fake_prometheus.answer(503, "unavailable", "too many queries")
    caplog.set_level(logging.INFO, logger="meshctl.controller")

    # Prometheus answers 503: the routes stay, and the log says when it retries.
    assert controller.arm(2, 2).routing_version == first.routing_version
    assert "answered 503 (unavailable: too many queries)" in caplog.text
    assert "keeping the last good routes; retrying in 5 s" in caplog.text
    asked = fake_prometheus.queries

    # Within the back-off nothing is asked, and the routes still stay.
    clock.now += 4.0
    assert controller.arm(3, 2).routing_version == first.routing_version
    assert fake_prometheus.queries == asked

    # Still failing after the first delay: the next delay doubles.
    clock.now += 1.0
    controller.arm(4, 2)
    assert "retrying in 10 s (2 failed in a row)" in caplog.text

    # Prometheus is back: telemetry is read again and the policy chooses anew.
    fake_prometheus.answer(200)
    clock.now += 10.0
    armed = controller.arm(5, 2)
    assert "telemetry recovered after 2 failures in a row" in caplog.text
    assert armed.routing_version.startswith("r5-") or armed.routing_version == (
        first.routing_version
    )
    assert controller.metrics.failures.labels("telemetry")._value.get() == 2
    assert [r.routing_note for r in controller.records[1:4]] == [
        "no telemetry: the last good routes stay in place"
    ] * 3
