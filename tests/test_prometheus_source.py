"""The Prometheus telemetry source against a real Prometheus fed known series.

Each test pushes Istio-shaped series under its own namespace through the
remote-write receiver and reads them back at one fixed evaluation instant, so
every figure is known exactly.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time

import pytest

from meshctl.telemetry import prometheus as promsource
from meshctl.telemetry.prometheus import PrometheusSource, PrometheusTelemetry
from meshctl.types import ClientState
from tests import prometheus_support as ps

_namespaces = itertools.count()


@pytest.fixture
def namespace() -> str:
    """A namespace no other test writes series under."""
    return f"ns-{next(_namespaces)}-{time.monotonic_ns() % 100000}"


@pytest.fixture
def end_s() -> float:
    """The instant every pushed series ends and every query is evaluated."""
    return float(round(time.time()))


def istio_series(
    namespace: str, end_s: float, *, reporter: str, per_s: float, **labels: str
) -> ps.Series:
    """An ``istio_requests_total`` counter rising by ``per_s`` until ``end_s``."""
    return ps.counter(
        {
            "__name__": "istio_requests_total",
            "reporter": reporter,
            "destination_service_name": "fl-clients",
            "destination_service_namespace": namespace,
            "response_flags": "-",
            **labels,
        },
        end_s=end_s,
        per_s=per_s,
    )


def latency_series(
    namespace: str, end_s: float, pod: str, per_s_by_le: dict[str, float]
) -> list[ps.Series]:
    """Histogram buckets of ``istio_request_duration_milliseconds`` for one pod."""
    return [
        ps.counter(
            {
                "__name__": "istio_request_duration_milliseconds_bucket",
                "reporter": "destination",
                "destination_service_name": "fl-clients",
                "destination_service_namespace": namespace,
                "pod": pod,
                "le": le,
            },
            end_s=end_s,
            per_s=per_s,
        )
        for le, per_s in per_s_by_le.items()
    ]


def fl_gauge(namespace: str, end_s: float, name: str, pod: str, value: float):
    """A client service's FL gauge, constant over the last minute."""
    return ps.Series(
        {"__name__": name, "namespace": namespace, "pod": pod},
        [(end_s - 60 + i, value) for i in range(61)],
    )


def source(url: str, namespace: str, end_s: float, **options) -> PrometheusSource:
    return PrometheusSource(url, namespace=namespace, clock=lambda: end_s, **options)


@pytest.fixture
def mesh_series(prometheus, namespace, end_s) -> None:
    """Six clients, each one case of what the mesh can say of a pod."""
    dest = {"reporter": "destination"}
    series = [
        # c-00: 2/s answered 200 and 0.5/s answered 503 by the pod itself.
        istio_series(
            namespace, end_s, per_s=2.0, pod="c-00", response_code="200", **dest
        ),
        istio_series(
            namespace, end_s, per_s=0.5, pod="c-00", response_code="503", **dest
        ),
        *latency_series(
            namespace, end_s, "c-00", {"10": 1.0, "50": 2.0, "100": 2.5, "+Inf": 2.5}
        ),
        # c-01: traffic and no 5xx series at all.
        istio_series(
            namespace, end_s, per_s=1.0, pod="c-01", response_code="200", **dest
        ),
        # c-02: series exist, but no request in the window (the counter is flat).
        istio_series(
            namespace, end_s, per_s=0.0, pod="c-02", response_code="200", **dest
        ),
        # c-03: every request answered 500.
        istio_series(
            namespace, end_s, per_s=1.0, pod="c-03", response_code="500", **dest
        ),
        # c-04: the mesh fails every request: no healthy upstream, at the source.
        istio_series(
            namespace,
            end_s,
            reporter="source",
            per_s=0.5,
            destination_pod="c-04",
            response_code="503",
            response_flags="UH",
        ),
        # A 503 the pod answered itself, seen at the source: not a mesh failure.
        istio_series(
            namespace,
            end_s,
            reporter="source",
            per_s=0.5,
            destination_pod="c-00",
            response_code="503",
        ),
        # c-05: no traffic, but its FL metrics.
        fl_gauge(namespace, end_s, prometheus_fl("loss"), "c-05", 0.25),
        fl_gauge(namespace, end_s, prometheus_fl("examples"), "c-05", 640),
        fl_gauge(namespace, end_s, prometheus_fl("seconds"), "c-05", 1.5),
    ]
    ps.remote_write(prometheus, series)


def prometheus_fl(kind: str) -> str:
    return {
        "loss": promsource.FL_TRAIN_LOSS,
        "examples": promsource.FL_TRAIN_EXAMPLES,
        "seconds": promsource.FL_LOCAL_TRAIN_SECONDS,
    }[kind]


def test_every_client_gets_the_exact_figures_and_state(
    prometheus, namespace, end_s, mesh_series
) -> None:
    telemetry = source(prometheus, namespace, end_s).read(60)

    assert telemetry == {
        "c-00": PrometheusTelemetry(
            client="c-00",
            state=ClientState.OBSERVED,
            requests=150,
            requests_per_s=2.5,
            error_ratio=0.2,
            latency_p50_ms=20.0,
            latency_p95_ms=87.5,
        ),
        "c-01": PrometheusTelemetry(
            client="c-01",
            state=ClientState.OBSERVED,
            requests=60,
            requests_per_s=1.0,
            error_ratio=0.0,
        ),
        "c-02": PrometheusTelemetry(client="c-02", state=ClientState.UNOBSERVED),
        "c-03": PrometheusTelemetry(
            client="c-03",
            state=ClientState.FAILING,
            requests=60,
            requests_per_s=1.0,
            error_ratio=1.0,
        ),
        "c-04": PrometheusTelemetry(
            client="c-04", state=ClientState.FAILING, mesh_failures_per_s=0.5
        ),
        "c-05": PrometheusTelemetry(
            client="c-05",
            state=ClientState.UNOBSERVED,
            train_loss=0.25,
            train_examples=640.0,
            local_train_s=1.5,
        ),
    }


def test_a_pod_with_traffic_and_no_5xx_series_has_an_error_ratio_of_zero(
    prometheus, namespace, end_s, mesh_series
) -> None:
    reader = source(prometheus, namespace, end_s)
    ratios = reader.query(reader.queries.error_ratio("1m"), "pod", end_s)

    assert ratios["c-01"] == 0.0


def test_the_error_ratio_of_a_pod_without_traffic_is_nan_and_never_a_number(
    prometheus, namespace, end_s, mesh_series
) -> None:
    reader = source(prometheus, namespace, end_s)
    ratios = reader.query(reader.queries.error_ratio("1m"), "pod", end_s)

    assert math.isnan(ratios["c-02"])
    c02 = reader.read(60)["c-02"]
    assert c02.state is ClientState.UNOBSERVED
    assert (c02.requests_per_s, c02.error_ratio, c02.latency_p95_ms) == (None,) * 3


def test_a_cycle_makes_the_same_number_of_queries_for_any_number_of_clients(
    prometheus, namespace, end_s
) -> None:
    def queries_for(clients: int, ns: str) -> int:
        ps.remote_write(
            prometheus,
            [
                istio_series(
                    ns,
                    end_s,
                    reporter="destination",
                    per_s=1.0,
                    pod=f"c-{i:02d}",
                    response_code="200",
                )
                for i in range(clients)
            ],
        )
        reader = source(prometheus, ns, end_s)
        calls = []
        reader._session.hooks["response"].append(
            lambda response, **_: calls.append(response.url)
        )
        assert len(reader.read(60)) == clients
        return sum("/api/v1/query?" in url for url in calls)

    assert queries_for(2, namespace + "-a") == queries_for(40, namespace + "-b") == 8


def test_the_scrape_interval_is_read_from_the_server(prometheus, namespace) -> None:
    assert PrometheusSource(prometheus, namespace=namespace).scrape_interval_s() == 5.0


def test_a_window_shorter_than_four_scrape_intervals_is_widened_with_a_warning(
    prometheus, namespace, caplog
) -> None:
    reader = PrometheusSource(prometheus, namespace=namespace)
    with caplog.at_level(logging.WARNING):
        assert reader.window_s(10) == 20.0
    assert "window 10s is shorter than 4 scrape intervals of 5s" in caplog.text


def test_a_window_shorter_than_four_scrape_intervals_can_be_refused(
    prometheus, namespace
) -> None:
    reader = PrometheusSource(prometheus, namespace=namespace, on_short_window="refuse")
    with pytest.raises(promsource.WindowTooShort, match="at least 20s"):
        reader.read(10)


@pytest.mark.parametrize(
    ("config", "jobs", "interval_s"),
    [
        pytest.param("global: {scrape_interval: 60s}", (), 60.0, id="global-60s"),
        pytest.param("{}", (), 60.0, id="prometheus-default"),
        pytest.param(
            "global: {scrape_interval: 15s}\nscrape_configs:\n"
            "- {job_name: envoy, scrape_interval: 30s}\n- {job_name: fl}",
            (),
            30.0,
            id="longest-job",
        ),
        pytest.param(
            "global: {scrape_interval: 15s}\nscrape_configs:\n"
            "- {job_name: envoy, scrape_interval: 1m30s}\n- {job_name: fl}",
            ("fl",),
            15.0,
            id="named-job",
        ),
    ],
)
def test_the_scrape_interval_comes_from_the_config(config, jobs, interval_s) -> None:
    assert promsource.scrape_interval_s(config, jobs) == interval_s


def test_a_one_minute_window_on_a_60s_scrape_is_widened_or_refused() -> None:
    assert promsource.effective_window_s(60, 60.0, "widen") == 240.0
    with pytest.raises(promsource.WindowTooShort, match="shorter than 4 scrape"):
        promsource.effective_window_s(60, 60.0, "refuse")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("0.25", 0.25, id="decimal"),
        pytest.param("1e-3", 0.001, id="exponent"),
        pytest.param("+Inf", math.inf, id="plus-inf"),
        pytest.param("-Inf", -math.inf, id="minus-inf"),
        pytest.param(3, 3.0, id="bare-json-number"),
    ],
)
def test_sample_values_are_parsed_deliberately(text, expected) -> None:
    assert promsource.parse_value(text) == expected


def test_nan_is_parsed_and_then_never_a_number() -> None:
    assert math.isnan(promsource.parse_value("NaN"))
    assert promsource.finite(promsource.parse_value("NaN")) is None
    assert promsource.finite(promsource.parse_value("+Inf")) is None


@pytest.mark.parametrize("text", ["", "fast", None, True, [1]], ids=repr)
def test_a_value_that_is_not_a_prometheus_number_is_an_error(text) -> None:
    with pytest.raises(promsource.PrometheusError, match="sample value"):
        promsource.parse_value(text)


@pytest.mark.parametrize(
    ("values", "state"),
    [
        pytest.param(
            {"requests_per_s": 1.0, "error_ratio": math.nan},
            "unobserved",
            id="nan-ratio",
        ),
        pytest.param({"requests_per_s": math.nan}, "unobserved", id="nan-rate"),
        pytest.param({"error_ratio": 0.0}, "unobserved", id="no-rate"),
        pytest.param(
            {"requests_per_s": 1.0, "error_ratio": 0.5}, "failing", id="half-failing"
        ),
        pytest.param(
            {"requests_per_s": 3.0, "error_ratio": 0.0, "mesh_failures_per_s": 3.0},
            "failing",
            id="mesh-failures-count",
        ),
        pytest.param(
            {"requests_per_s": 1.0, "error_ratio": 0.1, "latency_p95_ms": math.inf},
            "observed",
            id="inf-latency",
        ),
    ],
)
def test_the_state_never_rests_on_a_value_that_is_not_a_number(values, state) -> None:
    telemetry = promsource.client_telemetry("c-00", values, 60)

    assert telemetry.state == state
    numbers = [
        telemetry.requests_per_s,
        telemetry.error_ratio,
        telemetry.latency_p95_ms,
        telemetry.mesh_failures_per_s,
    ]
    assert all(v is None or math.isfinite(v) for v in numbers)


# ------------------------------------------------- many clients in one pass


def test_rows_for_many_clients_are_what_each_client_gets_alone() -> None:
    odd = [math.nan, math.inf, -math.inf, -1.0, 0.0, 2.5, 1e308]
    figures = {
        name: {
            f"c-{i:02d}": odd[(i + shift) % len(odd)]
            for i in range(40)
            if (i + shift) % 5  # some clients miss some figures
        }
        for shift, name in enumerate(promsource.FIGURES)
    }

    rows = promsource.client_rows(figures, 60.0)

    alone = {
        client: promsource.client_telemetry(
            client,
            {n: v[client] for n, v in figures.items() if client in v},
            60.0,
        )
        for client in sorted({c for v in figures.values() for c in v})
    }
    assert sorted(rows) == list(alone)
    assert rows == alone
    for row in rows.values():
        assert row == PrometheusTelemetry(**vars(row))
        assert type(row) is PrometheusTelemetry


@pytest.mark.parametrize(
    "result",
    [
        pytest.param([{"metric": {"pod": "c-00"}, "value": [1e9, "0.5"]}], id="plain"),
        pytest.param(
            [
                {"metric": {"pod": "c-00", "le": "+Inf"}, "value": [1e9, "NaN"]},
                {"metric": {"pod": "c-01"}, "value": [1e9, "+Inf"]},
                {"metric": {"pod": "c-02"}, "value": [1e9, "-Inf"]},
            ],
            id="nan-inf-and-other-labels",
        ),
        pytest.param(
            [
                {"metric": {"job": "fl"}, "value": [1e9, "1"]},
                {"metric": {"pod": ""}, "value": [1e9, "1"]},
                {"metric": {"pod": "c-03"}, "value": [1e9, "2"]},
            ],
            id="series-naming-no-client",
        ),
        pytest.param(
            [{"metric": {"pod": "c-04"}, "value": [1e9, " 1_0"]}],
            id="what-float-reads",
        ),
    ],
)
def test_the_typed_and_the_general_reading_of_an_answer_agree(result) -> None:
    body = json.dumps({"status": "success", "data": {"result": result}}).encode()
    reader = PrometheusSource("http://127.0.0.1:9")  # no request is made

    general = reader._read_vector(body, "pod", "test")
    typed = promsource._decode_vector(body, "pod")

    if typed is not None:
        clients, values = typed
        assert clients == list(general)
        assert _same(dict(zip(clients, values.tolist(), strict=True)), general)
    assert all(c.startswith("c-") for c in general)  # the others name no client


def _same(a: dict[str, float], b: dict[str, float]) -> bool:
    return all(
        a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a
    ) and set(a) == set(b)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"<html>proxy error</html>", "cannot read", id="not-json"),
        pytest.param(b'{"data": {"result": {}}}', "instant vector", id="not-list"),
        pytest.param(
            b'{"data": {"result": [{"metric": {"pod": "c-00"}, "value": [1, true]}]}}',
            "sample value True is not a number for pod 'c-00' in the test query",
            id="boolean-value",
        ),
    ],
)
def test_an_answer_the_typed_decoder_refuses_is_named_by_the_general_reading(
    body, message
) -> None:
    reader = PrometheusSource("http://127.0.0.1:9")

    assert promsource._decode_vector(body, "pod") is None
    with pytest.raises(promsource.PrometheusError, match=message) as caught:
        reader._read_vector(body, "pod", "test")
    assert caught.value.kind == "bad_response"
