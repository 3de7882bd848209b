"""``meshctl score`` against the real test Prometheus."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from typer.testing import CliRunner

from meshctl import cli
from meshctl.exitcodes import ExitCode
from tests import prometheus_support as ps

NAMESPACE = "score-cli"


@pytest.fixture(scope="module")
def scored(prometheus) -> str:
    """Two clients' series, ending now: c-00 serves 2/s, c-01 has none in 5 m."""
    end_s = float(round(time.time()))
    base = {
        "__name__": "istio_requests_total",
        "reporter": "destination",
        "destination_service_name": "fl-clients",
        "destination_service_namespace": NAMESPACE,
        "response_code": "200",
    }
    ps.remote_write(
        prometheus,
        [
            ps.counter({**base, "pod": "c-00"}, end_s=end_s, per_s=2.0, span_s=600),
            ps.counter({**base, "pod": "c-01"}, end_s=end_s, per_s=0.0, span_s=600),
        ],
    )
    return prometheus


def _score(url: str, *args: str):
    return CliRunner().invoke(
        cli.app, ["score", "--prometheus-url", url, "-n", NAMESPACE, *args]
    )


def test_json_output_holds_only_the_clients_document(scored) -> None:
    result = _score(scored, "-o", "json", "--window", "2m")

    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) == {"clients", "window_s"}
    assert document["window_s"] == 120.0
    c00, c01 = document["clients"]
    assert c00["client"] == "c-00"
    assert c00["state"] == "observed"
    assert c00["requests_per_s"] == pytest.approx(2.0, rel=1e-3)
    assert c00["error_ratio"] == 0.0
    assert c00["latency_p95_ms"] is None  # no histogram: no data, not zero
    assert c01 == {
        "client": "c-01",
        "state": "unobserved",
        "requests_per_s": None,
        "error_ratio": None,
        "latency_p50_ms": None,
        "latency_p95_ms": None,
        "mesh_failures_per_s": None,
        "train_loss": None,
        "train_examples": None,
        "local_train_s": None,
    }


def test_yaml_and_table_outputs_show_the_same_clients(scored) -> None:
    as_yaml = yaml.safe_load(_score(scored, "-o", "yaml").stdout)
    table = _score(scored).stdout.splitlines()

    assert [c["state"] for c in as_yaml["clients"]] == ["observed", "unobserved"]
    assert table[0].split()[:3] == ["CLIENT", "STATE", "REQ/S"]
    assert table[1].split()[:2] == ["c-00", "observed"]
    assert table[2].split()[:3] == ["c-01", "unobserved", "-"]


def test_a_short_window_is_widened_with_a_warning_on_stderr(scored) -> None:
    result = _score(scored, "-o", "json", "--window", "10s")

    assert result.exit_code == 0
    assert json.loads(result.stdout)["window_s"] == 20.0
    assert "shorter than 4 scrape intervals" in result.stderr


def test_a_refused_short_window_is_a_usage_error(scored) -> None:
    result = _score(scored, "--window", "10s", "--short-window", "refuse")

    assert result.exit_code == int(ExitCode.USAGE)
    assert "at least 20s" in " ".join(result.stderr.split())


def test_an_unreachable_prometheus_is_a_telemetry_failure() -> None:
    from meshctl.localmesh.workloads import free_port

    result = _score(f"http://127.0.0.1:{free_port()}", "--timeout", "1")

    assert result.exit_code == int(ExitCode.TELEMETRY_FAILED)
    assert "unreachable" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "says"),
    [
        pytest.param(
            ["-o", "xml"], "-o is table, json or yaml, not 'xml'", id="output"
        ),
        pytest.param(
            ["--timeout", "nan"],
            "the timeout (nan s) must be a positive number",
            id="timeout",
        ),
        pytest.param(
            ["--short-window", "shrink"],
            "--short-window is widen or refuse, not 'shrink'",
            id="short-window",
        ),
    ],
)
def test_a_bad_option_is_a_usage_error_naming_it(args, says) -> None:
    result = _score("http://127.0.0.1:9", *args)

    assert result.exit_code == int(ExitCode.USAGE)
    assert says in " ".join(result.stderr.split())


def test_a_malformed_prometheus_url_is_a_usage_error_naming_it() -> None:
    result = _score("http://[::1")

    assert result.exit_code == int(ExitCode.USAGE)
    assert "Prometheus URL 'http://[::1' is not a URL" in result.stderr


@pytest.mark.parametrize("url", ["not-a-url", "ftp://prometheus", "http://"])
def test_a_prometheus_url_that_is_no_http_url_is_a_usage_error(url) -> None:
    result = _score(url)

    assert result.exit_code == int(ExitCode.USAGE)
    assert f"Prometheus URL {url!r} is not an http(s) URL" in " ".join(
        result.stderr.split()
    )
