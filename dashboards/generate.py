"""Generate meshctl's Grafana dashboards and the ConfigMaps that ship them.

Three dashboards, built with ``grafana-foundation-sdk`` for Grafana 11.6:

- ``meshctl-training``: the global model's metrics over rounds and over time,
  the round's duration and its stragglers (the series the FL server reports
  through the controller's ``/metrics``);
- ``meshctl-clients``: per client, the request rate, error ratio, p50/p95
  latency and mesh failures (the controller's own PromQL), the training loss,
  the selection and route weights over time, and Envoy's outlier ejections;
- ``meshctl-controller``: cycle duration, routing changes, failures by stage,
  clients by telemetry state.

Run ``python dashboards/generate.py`` after changing this file: it rewrites
``dashboards/*.json`` and ``manifests/grafana/``.  A test checks that what is
committed is what this file generates, so never edit the JSON by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import (
    dashboard,
    prometheus,
    stat,
    statetimeline,
    timeseries,
    trend,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

from meshctl.telemetry import prometheus as promql  # noqa: E402

DASHBOARDS_DIR = ROOT / "dashboards"
GRAFANA_MANIFESTS_DIR = ROOT / "manifests" / "grafana"
SIDECAR_LABEL = {"grafana_dashboard": "1"}
FOLDER_ANNOTATION = {"grafana_folder": "meshctl"}
TAGS = ["meshctl", "federated-learning", "istio"]

DATASOURCE = model.DataSourceRef(type_val="prometheus", uid="${datasource}")
NS = 'namespace="$namespace"'
RATE = "$__rate_interval"
# A routed client's cluster is outbound|<port>|<subset>|<host>, the subset
# named after the client.  Character classes match the pipes without escapes.
CLUSTER_CLIENT = "outbound[|][0-9]+[|]([^|]+)[|].*"
# The clusters of the FL clients' service: Istio's sidecars name the host in
# full (fl-clients.fl.svc.cluster.local), the local mesh by its short name.
SERVICE_CLUSTER = "outbound[|].*[|]$service([.].*)?"
QUERIES = promql.QuerySet(service="$service", namespace="$namespace")


# ------------------------------------------------------------------ helpers


def query(expr: str, legend: str = "__auto", ref: str = "A") -> prometheus.Dataquery:
    """A Prometheus range query on the dashboard's datasource."""
    return (
        prometheus.Dataquery()
        .expr(expr)
        .legend_format(legend)
        .ref_id(ref)
        .range()
        .datasource(DATASOURCE)
    )


def series(
    title: str,
    unit: str,
    targets: list[prometheus.Dataquery],
    *,
    description: str,
    span: int = 12,
    stacked: bool = False,
) -> timeseries.Panel:
    """A time series panel."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(DATASOURCE)
        .span(span)
        .height(8)
        .targets(targets)
    )
    if stacked:
        panel = panel.stacking(
            common_builders.StackingConfig().mode(common.StackingMode.NORMAL)
        )
    return panel


def variables(*, service: bool) -> list:
    """The datasource and namespace variables, and the service where it counts."""
    found = [
        dashboard.DatasourceVariable("datasource")
        .label("Prometheus")
        .type("prometheus"),
        dashboard.QueryVariable("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query("label_values(meshctl_controller_round, namespace)")
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .current(model.VariableOption(selected=True, text="fl", value="fl")),
    ]
    if service:
        found.append(
            dashboard.QueryVariable("service")
            .label("Service")
            .datasource(DATASOURCE)
            .query(
                'label_values(istio_requests_total{reporter="destination", '
                'destination_service_namespace="$namespace"}, '
                "destination_service_name)"
            )
            .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .current(
                model.VariableOption(
                    selected=True, text="fl-clients", value="fl-clients"
                )
            )
        )
    return found


def board(uid: str, title: str, description: str, service: bool = False):
    """A dashboard with meshctl's common settings."""
    return (
        dashboard.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(TAGS)
        .refresh("10s")
        .time("now-1h", "now")
        .timezone("browser")
        .variables(variables(service=service))
    )


# --------------------------------------------------------------- dashboards


def training() -> dashboard.Dashboard:
    """The model's metrics over rounds and time, round durations, stragglers."""
    metric = f"meshctl_training_metric{{{NS}}}"
    by_round = (
        trend.Panel()
        .title("Model metrics by round")
        .description("The global model's test metrics after each evaluated round.")
        .datasource(DATASOURCE)
        .span(12)
        .height(8)
        .x_field("round")
        .targets(
            [
                query(f"max(meshctl_training_round{{{NS}}})", "round", "A"),
                query(f"max by (metric) ({metric})", "{{metric}}", "B"),
            ]
        )
        .with_transformation(
            model.DataTransformerConfig(
                id_val="joinByField", options={"byField": "Time", "mode": "outer"}
            )
        )
    )
    return (
        board(
            "meshctl-training",
            "meshctl / training",
            "Federated training as the FL server reports it: the global model's "
            "metrics, how long rounds take and how many slots straggle.",
        )
        .with_panel(
            stat.Panel()
            .title("Round")
            .description("The last round the FL server evaluated.")
            .datasource(DATASOURCE)
            .span(6)
            .height(4)
            .with_target(query(f"max(meshctl_training_round{{{NS}}})", "round"))
        )
        .with_panel(
            stat.Panel()
            .title("AUROC")
            .description("The global model's AUROC after the last round.")
            .datasource(DATASOURCE)
            .span(6)
            .height(4)
            .decimals(4)
            .with_target(
                query(f'max(meshctl_training_metric{{{NS}, metric="auroc"}})', "auroc")
            )
        )
        .with_panel(by_round)
        .with_panel(
            series(
                "Model metrics over time",
                "none",
                [query(f"max by (metric) ({metric})", "{{metric}}")],
                description="AUROC, F1 and accuracy on the held-out test set.",
            )
        )
        .with_panel(
            series(
                "Round duration",
                "s",
                [query(f"max(meshctl_training_round_seconds{{{NS}}})", "round")],
                description="Wall seconds from arming a round to its evaluation.",
            )
        )
        .with_panel(
            series(
                "Stragglers and failed slots",
                "none",
                [
                    query(
                        "max by (status) "
                        f'(meshctl_training_round_slots{{{NS}, status!="ok"}})',
                        "{{status}}",
                    )
                ],
                description="Slots of the last round that timed out (stragglers) "
                "or failed.",
                stacked=True,
            )
        )
    )


def clients() -> dashboard.Dashboard:
    """Per client: the mesh's view, the training loss, selection and ejections."""
    window = RATE
    ejections = (
        "sum by (client) (label_replace("
        f'{promql_outlier()}{{{NS}, cluster_name=~"{SERVICE_CLUSTER}"}}, '
        f'"client", "$1", "cluster_name", "{CLUSTER_CLIENT}"))'
    )
    return (
        board(
            "meshctl-clients",
            "meshctl / clients",
            "Every FL client as the controller sees it: Istio's standard metrics "
            "(the controller's own queries), training loss, selection, route "
            "weights and outlier ejections.",
            service=True,
        )
        .with_panel(
            series(
                "Request rate",
                "reqps",
                [query(QUERIES.requests_per_s(window), "{{pod}}")],
                description='reporter="destination": requests each client served.',
                span=8,
            )
        )
        .with_panel(
            series(
                "Error ratio",
                "percentunit",
                [query(QUERIES.error_ratio(window), "{{pod}}")],
                description="5xx and code 0 over all requests; no traffic is no "
                "data, not 0.",
                span=8,
            )
        )
        .with_panel(
            series(
                "Mesh failures",
                "reqps",
                [query(QUERIES.mesh_failures_per_s(window), "{{destination_pod}}")],
                description='reporter="source": requests the mesh failed before '
                "a pod answered (code 0, or 503/504 with UH, NR, UF, UO...).",
                span=8,
            )
        )
        .with_panel(
            series(
                "Latency p50 and p95",
                "ms",
                [
                    query(QUERIES.latency_ms(0.5, window), "{{pod}} p50", "A"),
                    query(QUERIES.latency_ms(0.95, window), "{{pod}} p95", "B"),
                ],
                description="From istio_request_duration_milliseconds buckets.",
            )
        )
        .with_panel(
            series(
                "Training loss",
                "none",
                [query(QUERIES.fl_last(promql.FL_TRAIN_LOSS, window), "{{pod}}")],
                description="The loss in each client's last train reply.",
                span=12,
            )
        )
        .with_panel(
            statetimeline.Panel()
            .title("Selected clients")
            .description("1 while the live routes send a slot to the client.")
            .datasource(DATASOURCE)
            .span(12)
            .height(8)
            .show_value(common.VisibilityMode.NEVER)
            .with_target(
                query(
                    f"max by (client) (meshctl_controller_client_selected{{{NS}}})",
                    "{{client}}",
                )
            )
        )
        .with_panel(
            series(
                "Route weights",
                "none",
                [
                    query(
                        f"max by (client) (meshctl_controller_client_weight{{{NS}}})",
                        "{{client}}",
                    )
                ],
                description="Each client's weight in the routes (100 per slot in "
                "exact mode).",
                stacked=True,
            )
        )
        .with_panel(
            series(
                "Outlier ejections",
                "none",
                [query(ejections, "{{client}}")],
                description="Hosts Envoy's outlier detection holds ejected, per "
                "client subset.",
            )
        )
    )


def promql_outlier() -> str:
    """Envoy's gauge of ejected hosts per cluster, as Istio's sidecars name it."""
    return "envoy_cluster_outlier_detection_ejections_active"


def controller() -> dashboard.Dashboard:
    """The controller's health: cycle time, routing changes, failures, states."""
    cycle = f"meshctl_controller_cycle_seconds_bucket{{{NS}}}"
    return (
        board(
            "meshctl-controller",
            "meshctl / controller",
            "The controller's own metrics: how long arming a round takes, how "
            "often routes change, what fails, and the clients' telemetry states.",
        )
        .with_panel(
            series(
                "Cycle duration",
                "s",
                [
                    query(
                        f"histogram_quantile(0.5, sum by (le) (rate({cycle}[{RATE}])))",
                        "p50",
                        "A",
                    ),
                    query(
                        "histogram_quantile(0.95, sum by (le) "
                        f"(rate({cycle}[{RATE}])))",
                        "p95",
                        "B",
                    ),
                ],
                description="Telemetry, policy, routing applied and served.",
            )
        )
        .with_panel(
            series(
                "Routing changes",
                "none",
                [
                    query(
                        "sum(increase(meshctl_controller_routing_changes_total"
                        f"{{{NS}}}[{RATE}]))",
                        "changes",
                    )
                ],
                description="Rounds whose routing version changed.",
                span=12,
            )
        )
        .with_panel(
            series(
                "Failures by stage",
                "none",
                [
                    query(
                        "sum by (stage) (increase(meshctl_controller_failures_total"
                        f"{{{NS}}}[{RATE}]))",
                        "{{stage}}",
                    )
                ],
                description="Telemetry or routing failures; the last good routes "
                "stayed in place.",
                span=12,
            )
        )
        .with_panel(
            series(
                "Clients by state",
                "none",
                [
                    query(
                        f"sum by (state) (meshctl_controller_clients{{{NS}}})",
                        "{{state}}",
                    )
                ],
                description="observed, unobserved (no data) and failing clients "
                "at the last armed round.",
                stacked=True,
            )
        )
    )


DASHBOARDS = {
    "meshctl-training": training,
    "meshctl-clients": clients,
    "meshctl-controller": controller,
}


# ------------------------------------------------------------------- output


def build_all() -> dict[str, dict]:
    """Every dashboard as the JSON object Grafana imports, by uid."""
    return {
        uid: json.loads(json.dumps(make().build(), cls=JSONEncoder))
        for uid, make in DASHBOARDS.items()
    }


def dashboard_text(model_json: dict) -> str:
    """A dashboard's committed JSON text."""
    return json.dumps(model_json, indent=2, sort_keys=True) + "\n"


class _Literal(str):
    """A string dumped as a YAML literal block."""


def _literal(dumper: yaml.SafeDumper, text: _Literal) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|")


yaml.SafeDumper.add_representer(_Literal, _literal)


def config_map_text(uid: str, model_json: dict) -> str:
    """A ConfigMap that Grafana's dashboard sidecar loads."""
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{uid}-dashboard",
            "labels": dict(SIDECAR_LABEL),
            "annotations": dict(FOLDER_ANNOTATION),
        },
        "data": {f"{uid}.json": _Literal(dashboard_text(model_json))},
    }
    header = "# Generated by dashboards/generate.py; do not edit.\n"
    return header + yaml.safe_dump(config_map, sort_keys=False, width=1000)


def kustomization_text() -> str:
    """The kustomization that ships the dashboards' ConfigMaps."""
    body = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"{uid}.yaml" for uid in DASHBOARDS],
    }
    header = (
        "# meshctl's Grafana dashboards as ConfigMaps for Grafana's sidecar\n"
        '# (label grafana_dashboard: "1").  Generated by dashboards/generate.py;\n'
        "# apply into the namespace the sidecar watches:\n"
        "#   kubectl apply -k manifests/grafana -n monitoring\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False)


def files() -> dict[Path, str]:
    """Every generated file and its text."""
    out: dict[Path, str] = {}
    for uid, model_json in build_all().items():
        out[DASHBOARDS_DIR / f"{uid}.json"] = dashboard_text(model_json)
        out[GRAFANA_MANIFESTS_DIR / f"{uid}.yaml"] = config_map_text(uid, model_json)
    out[GRAFANA_MANIFESTS_DIR / "kustomization.yaml"] = kustomization_text()
    return out


def main() -> None:
    """Write every generated file."""
    for path, text in files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path.relative_to(ROOT))


if __name__ == "__main__":
    main()
