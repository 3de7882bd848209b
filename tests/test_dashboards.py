"""The Grafana dashboards: generated, committed as generated, every query live.

Every panel's query, its template variables substituted, must parse
(``/api/v1/format_query``) and return data from a real Prometheus fed with the
series meshctl exports: the controller's and the training's from a real
:class:`ControllerMetrics`, the clients' FL metrics from a real client service
registry, and Istio-shaped mesh series.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meshctl import protocol
from meshctl.controller.metrics import ControllerMetrics
from meshctl.flower.clientservice import FLMetrics
from meshctl.types import ClientState, ClientTelemetry
from tests import prometheus_support as ps

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "dashboards"
SERVICE = "fl-clients"
SPAN_S, STEP_S = 300.0, 15.0
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$namespace": NAMESPACE,
    "$service": SERVICE,
}


def _generator():
    spec = importlib.util.spec_from_file_location(
        "dashboards_generate", ROOT / "dashboards" / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = _generator()
DASHBOARDS = generate.build_all()


def _panel_queries() -> Iterator[tuple[str, str]]:
    for uid, board in DASHBOARDS.items():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                yield f"{uid}: {panel['title']} {target['refId']}", target["expr"]


QUERIES = dict(_panel_queries())


def substitute(expr: str) -> str:
    """``expr`` with the dashboards' template variables filled in."""
    for name, value in SUBSTITUTIONS.items():
        expr = expr.replace(name, value)
    assert "$" not in re.sub(r'"\$1"', "", expr), expr
    return expr


# ------------------------------------------------------------------ the data


def _exported(registry_text: str, extra: dict[str, str]) -> list[ps.Series]:
    """Series over the last five minutes from one exposition: counters rise."""
    end_s = float(round(time.time()))
    steps = int(SPAN_S / STEP_S)
    found = []
    for family in text_string_to_metric_families(registry_text):
        for sample in family.samples:
            rising = family.type in ("counter", "histogram")
            values = [
                (
                    end_s - SPAN_S + i * STEP_S,
                    sample.value * (i + 1) if rising else sample.value,
                )
                for i in range(steps + 1)
            ]
            labels = {"__name__": sample.name, **sample.labels, **extra}
            found.append(ps.Series(labels, values))
    return found


def _controller_series() -> list[ps.Series]:
    metrics = ControllerMetrics()

    class Record:
        server_round = 3
        selected = ("c-00", "c-01")
        routing_version = "r3-abc"
        apply_s = 0.2
        scores = {"c-00": 1.0, "c-01": 0.5}
        weights: dict = {}
        telemetry = {
            "c-00": ClientTelemetry(client="c-00", state=ClientState.OBSERVED),
            "c-02": ClientTelemetry(client="c-02", state=ClientState.FAILING),
        }

    metrics.round_armed(Record(), ["c-00", "c-01", "c-02"])
    metrics.failed("telemetry")
    metrics.round_evaluated(
        3,
        {"auroc": 0.95, "f1": 0.9, "accuracy": 0.93},
        round_s=4.5,
        slot_statuses=["ok", "timeout"],
    )
    text = metrics.exposition().decode()
    return _exported(text, {"namespace": NAMESPACE, "job": "meshctl-controller"})


def _client_series() -> list[ps.Series]:
    found = []
    for pod, loss in (("c-00", 0.4), ("c-01", 0.7)):
        fl = FLMetrics()
        fl.train_replied(
            {protocol.TRAIN_LOSS_METRIC: loss, protocol.NUM_EXAMPLES_METRIC: 640}, 1.5
        )
        found += _exported(
            fl.exposition().decode(), {"namespace": NAMESPACE, "pod": pod}
        )
    return found


def _mesh_series() -> list[ps.Series]:
    end_s = float(round(time.time()))
    istio = {
        "__name__": "istio_requests_total",
        "destination_service_name": SERVICE,
        "destination_service_namespace": NAMESPACE,
        "namespace": NAMESPACE,
        "response_flags": "-",
    }
    found = [
        ps.counter(
            {**istio, "reporter": "destination", "pod": pod, "response_code": code},
            end_s=end_s,
            per_s=per_s,
            step_s=STEP_S,
        )
        for pod, code, per_s in (("c-00", "200", 2.0), ("c-00", "500", 0.5))
        + (("c-01", "200", 1.0),)
    ]
    found.append(
        ps.counter(
            {
                **istio,
                "reporter": "source",
                "response_code": "503",
                "response_flags": "UH",
                "destination_pod": "c-02",
            },
            end_s=end_s,
            per_s=0.2,
            step_s=STEP_S,
        )
    )
    for pod in ("c-00", "c-01"):
        for le, per_s in (("10", 0.5), ("50", 1.5), ("+Inf", 2.0)):
            found.append(
                ps.counter(
                    {
                        **istio,
                        "__name__": "istio_request_duration_milliseconds_bucket",
                        "reporter": "destination",
                        "pod": pod,
                        "le": le,
                    },
                    end_s=end_s,
                    per_s=per_s,
                    step_s=STEP_S,
                )
            )
    found.append(
        ps.Series(
            {
                "__name__": "envoy_cluster_outlier_detection_ejections_active",
                "namespace": NAMESPACE,
                "cluster_name": f"outbound|80|c-02|{SERVICE}.{NAMESPACE}.svc."
                "cluster.local",
            },
            [(end_s - SPAN_S + i * STEP_S, 1.0) for i in range(21)],
        )
    )
    return found


@pytest.fixture(scope="module")
def fed_prometheus(prometheus: str) -> str:
    """The session's Prometheus, holding every series the dashboards read."""
    ps.remote_write(
        prometheus, _controller_series() + _client_series() + _mesh_series()
    )
    return prometheus


# ------------------------------------------------------------------- tests


def test_the_committed_files_are_what_the_generator_writes() -> None:
    for path, text in generate.files().items():
        assert path.exists(), f"{path} missing: run python dashboards/generate.py"
        assert path.read_text() == text, (
            f"{path} differs from the generator: run python dashboards/generate.py"
        )


def test_each_dashboard_ships_in_a_config_map_for_grafanas_sidecar() -> None:
    kustomization = yaml.safe_load(
        (generate.GRAFANA_MANIFESTS_DIR / "kustomization.yaml").read_text()
    )
    assert kustomization["resources"] == [f"{uid}.yaml" for uid in DASHBOARDS]
    for uid, board in DASHBOARDS.items():
        path = generate.GRAFANA_MANIFESTS_DIR / f"{uid}.yaml"
        config_map = yaml.safe_load(path.read_text())
        assert config_map["kind"] == "ConfigMap"
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config_map["data"][f"{uid}.json"]) == board


def test_three_dashboards_round_trip_through_the_sdk_model() -> None:
    from grafana_foundation_sdk.models.dashboard import Dashboard

    assert sorted(DASHBOARDS) == [
        "meshctl-clients",
        "meshctl-controller",
        "meshctl-training",
    ]
    for uid, board in DASHBOARDS.items():
        model = Dashboard.from_json(board)
        assert model.uid == uid and model.panels


@pytest.mark.parametrize("expr", QUERIES.values(), ids=QUERIES.keys())
def test_every_panel_query_parses_and_returns_data(
    fed_prometheus: str, expr: str
) -> None:
    query = substitute(expr)

    formatted = httpx.get(
        f"{fed_prometheus}/api/v1/format_query", params={"query": query}
    )
    assert formatted.status_code == 200, formatted.text

    end_s = time.time()
    answer = httpx.get(
        f"{fed_prometheus}/api/v1/query_range",
        params={"query": query, "start": end_s - 240, "end": end_s, "step": 15},
    ).json()
    assert answer["status"] == "success", answer
    values = [v for item in answer["data"]["result"] for _, v in item["values"]]
    assert values, f"no data for {query}"
    assert any(v not in ("NaN", "+Inf", "-Inf") for v in values), query


def test_every_template_variable_finds_its_values(fed_prometheus: str) -> None:
    for board in DASHBOARDS.values():
        for variable in board["templating"]["list"]:
            if variable["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
            assert match, variable["query"]
            selector, label = substitute(match[1]), match[2]
            answer = httpx.get(
                f"{fed_prometheus}/api/v1/label/{label}/values",
                params={"match[]": selector},
            ).json()
            assert answer["data"], f"{variable['name']}: no values of {label}"


@pytest.mark.parametrize(
    ("cluster", "matches"),
    [
        (f"outbound|80|c-01|{SERVICE}.{NAMESPACE}.svc.cluster.local", True),
        (f"outbound|80|c-01|{SERVICE}", True),  # the local mesh's name
        (f"outbound|8080|c-01|{SERVICE}-headless.{NAMESPACE}.svc.cluster.local", False),
        (f"outbound|8080|c-01|{SERVICE}-headless", False),
    ],
    ids=["istio", "local", "other-service", "other-service-local"],
)
def test_the_ejections_panel_selects_the_clients_clusters_in_both_meshes(
    cluster: str, matches: bool
) -> None:
    pattern = substitute(generate.SERVICE_CLUSTER)

    assert bool(re.fullmatch(pattern, cluster)) is matches
    (ejections,) = [e for k, e in QUERIES.items() if "Outlier ejections" in k]
    assert generate.SERVICE_CLUSTER in ejections
