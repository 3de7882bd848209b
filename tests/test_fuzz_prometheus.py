"""Fuzzing Prometheus answers: any JSON, any sample value, any figure.

Whatever Prometheus sends, the source gives per-client telemetry with only
finite numbers, or a :class:`PrometheusError` naming the server and the query;
never another exception.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from meshctl.telemetry import prometheus as promsource
from meshctl.types import ClientState
from tests.fuzz_support import JUNK, fuzz

CONFIG = {"status": "success", "data": {"yaml": "global:\n  scrape_interval: 5s\n"}}
VALUES = st.one_of(
    st.sampled_from(["NaN", "+Inf", "-Inf", "Inf", "1e309", "-1e309", "0", "-0"]),
    st.sampled_from(["1", "0.5", "-3", "1e308", "nan", "inf", "", " 1", "1_0"]),
    st.floats().map(repr),
    st.text(max_size=8),
    JUNK,
)
SAMPLES = st.fixed_dictionaries(
    {
        "metric": st.one_of(
            st.fixed_dictionaries(
                {"pod": st.sampled_from(["c-01", "c-02", ""]) | JUNK},
                optional={"destination_pod": st.sampled_from(["c-01", "c-03"])},
            ),
            JUNK,
        ),
        "value": st.one_of(st.tuples(st.floats(), VALUES).map(list), JUNK),
    }
)
BODIES = st.one_of(
    st.fixed_dictionaries(
        {
            "status": st.just("success") | JUNK,
            "data": st.fixed_dictionaries(
                {
                    "resultType": st.just("vector") | JUNK,
                    "result": st.lists(SAMPLES | JUNK, max_size=4) | JUNK,
                }
            )
            | JUNK,
        }
    ),
    JUNK,
)
FIGURES = st.dictionaries(
    st.sampled_from(promsource.FIGURES),
    st.floats(allow_nan=True, allow_infinity=True),
)


class FakePrometheus:
    """Answers every query with the body a test sets; the config is fixed."""

    def __init__(self) -> None:
        self.body: bytes = b"{}"
        self.status = 200
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                config = self.path.startswith("/api/v1/status/config")
                body = json.dumps(CONFIG).encode() if config else fake.body
                self.send_response(200 if config else fake.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def source() -> Iterator[tuple[FakePrometheus, promsource.PrometheusSource]]:
    """A fake Prometheus over loopback and a source reading it."""
    fake = FakePrometheus()
    reader = promsource.PrometheusSource(fake.url, timeout_s=5.0, clock=lambda: 1e9)
    yield fake, reader
    reader.close()
    fake.stop()


def _assert_finite(telemetry: promsource.PrometheusTelemetry) -> None:
    for name, value in vars(telemetry).items():
        if isinstance(value, float):
            assert math.isfinite(value), f"{telemetry.client}: {name} is {value}"


@fuzz(100)
@given(body=BODIES, status=st.sampled_from([200, 200, 200, 400, 422, 503, 500]))
@example(body={"status": "success", "data": {"result": [None]}}, status=200)
@example(body=None, status=400)  # an error status with a body that is no object
@example(  # a pod label that is a list
    body={"data": {"result": [{"metric": {"pod": [1]}, "value": [1, "1"]}]}},
    status=200,
)
@example(  # an empty sample value: the error names the server and the query
    body={"data": {"result": [{"metric": {"pod": "c-01"}, "value": [1, ""]}]}},
    status=200,
)
@example(
    body={"data": {"result": [{"metric": {"pod": "c-01"}, "value": [1, "1e309"]}]}},
    status=200,
)
def test_any_answer_gives_finite_telemetry_or_a_prometheus_error(
    source, body, status
) -> None:
    fake, reader = source
    fake.body, fake.status = json.dumps(body).encode(), status
    try:
        found = reader.read(30.0)
    except promsource.PrometheusError as exc:
        assert reader.url in str(exc)
        return
    for client, telemetry in found.items():
        assert client == telemetry.client and client
        _assert_finite(telemetry)


@fuzz(50)
@given(body=st.binary(max_size=64))
def test_any_bytes_give_a_prometheus_error_naming_the_server(source, body) -> None:
    fake, reader = source
    fake.body, fake.status = body, 200
    try:
        reader.read(30.0)
    except promsource.PrometheusError as exc:
        assert reader.url in str(exc)


@fuzz(300)
@given(text=VALUES)
def test_a_sample_value_is_a_float_or_a_bad_response(text) -> None:
    try:
        value = promsource.parse_value(text)
    except promsource.PrometheusError as exc:
        assert exc.kind == "bad_response" and "sample value" in str(exc)
    else:
        assert isinstance(value, float)


@fuzz(300)
@given(figures=FIGURES, window_s=st.floats(min_value=1, max_value=1e6))
@example(figures={"requests_per_s": 1e308, "error_ratio": 0.0}, window_s=300.0)
@example(
    figures={"requests_per_s": 1.0, "error_ratio": 0.0, "mesh_failures_per_s": -1.0},
    window_s=30.0,
)
@example(
    figures={"requests_per_s": 1e308, "error_ratio": 1.0, "mesh_failures_per_s": 1e308},
    window_s=30.0,
)
def test_any_figures_give_a_state_and_only_finite_numbers(figures, window_s) -> None:
    telemetry = promsource.client_telemetry("c-01", figures, window_s)
    assert isinstance(telemetry.state, ClientState)
    _assert_finite(telemetry)


@fuzz(300)
@given(body=BODIES, compact=st.booleans())
@example(
    body={"data": {"result": [{"metric": {"pod": "c-01"}, "value": [1, "+Inf"]}]}},
    compact=True,
)
@example(
    body={"data": {"result": [{"metric": {"pod": "+Inf"}, "value": [1, "-0"]}]}},
    compact=True,
)
@example(  # a value of three elements is no sample
    body={"data": {"result": [{"metric": {"pod": "c-01"}, "value": [None, 0, None]}]}},
    compact=False,
)
def test_the_fast_reading_of_an_answer_is_the_general_one_or_none(
    body, compact
) -> None:
    text = json.dumps(body, separators=(",", ":") if compact else None)
    reader = promsource.PrometheusSource("http://127.0.0.1:9")  # no request is made

    typed = promsource._decode_vector(text.encode(), "pod")

    if typed is None:
        return
    try:
        general = reader._read_vector(text.encode(), "pod", "fuzz")
    except promsource.PrometheusError as exc:
        raise AssertionError(
            f"the fast reading took what the other refused: {exc}"
        ) from exc
    clients, values = typed
    fast = dict(zip(clients, values.tolist(), strict=True))  # the last one wins
    assert fast.keys() == general.keys()
    for client, value in fast.items():
        assert value == general[client] or (
            math.isnan(value) and math.isnan(general[client])
        )
