"""A Prometheus config that makes the local mesh look like Istio to PromQL.

The local Envoy keeps one cluster per client subset, ``outbound|80|<client>|
fl-clients``.  Scraping its ``/stats/prometheus`` with the relabelling below
turns those cluster stats into Istio's standard series:

- ``envoy_cluster_upstream_rq{envoy_response_code}`` becomes
  ``istio_requests_total{response_code}``;
- ``envoy_cluster_upstream_rq_time_{bucket,sum,count}`` becomes
  ``istio_request_duration_milliseconds_{bucket,sum,count}``;
- the client from the cluster name becomes ``pod``, the service host
  ``destination_service_name``; ``reporter="destination"``,
  ``destination_service_namespace`` and ``response_flags="-"`` are set.

So :class:`meshctl.telemetry.prometheus.PrometheusSource` runs its production
queries unchanged.  Requests the local mesh fails itself (no healthy upstream)
carry no subset in Envoy's stats the way Istio's source reporter would show
them; they are not mapped, and mesh failures stay empty locally.

The client services' ``/metrics`` (their FL metrics) are scraped with ``pod``
and ``namespace`` labels naming each client, as a PodMonitor would add them.
Envoy's ``envoy_cluster_outlier_detection_ejections_active`` keeps its name and
gets Istio's ``cluster_name`` label, as an Istio sidecar reports it.

The demo's ports are only known at run time, so its jobs read their targets
from files (``file_sd_configs``) that :func:`write_targets` rewrites by rename;
Prometheus re-reads them on change.  :func:`file_sd_config` is the whole config
of a Prometheus that meshctl starts; :func:`file_sd_scrape_configs` are the jobs
to add to a Prometheus of one's own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from meshctl import protocol
from meshctl.types import Workload

ENVOY_JOB = "envoy"
CLIENTS_JOB = "fl-clients"
CONTROLLER_JOB = "meshctl-controller"
JOBS = (ENVOY_JOB, CLIENTS_JOB, CONTROLLER_JOB)
OUTLIER_EJECTIONS = "envoy_cluster_outlier_detection_ejections_active"
_RENAMES = (
    ("envoy_cluster_upstream_rq", "istio_requests_total"),
    (
        "envoy_cluster_upstream_rq_time_(bucket|sum|count)",
        "istio_request_duration_milliseconds_${1}",
    ),
)


def envoy_relabelling(namespace: str, host: str = protocol.SERVICE_HOST) -> list[dict]:
    """``metric_relabel_configs`` from Envoy's cluster stats to Istio's series."""
    cluster = rf"outbound\|{protocol.SERVICE_PORT}\|([^|]+)\|({host})"
    names = "|".join([*(old for old, _ in _RENAMES), OUTLIER_EJECTIONS])
    rules: list[dict] = [
        {
            "action": "keep",
            "source_labels": ["__name__", "envoy_cluster_name"],
            "separator": ";",
            "regex": f"({names});{cluster}",
        },
        {
            # Istio's sidecars name a cluster's stats by ``cluster_name``.
            "source_labels": ["__name__", "envoy_cluster_name"],
            "separator": ";",
            "regex": f"{OUTLIER_EJECTIONS};(.+)",
            "target_label": "cluster_name",
            "replacement": "${1}",
        },
        {
            "source_labels": ["envoy_cluster_name"],
            "regex": cluster,
            "target_label": "pod",
            "replacement": "${1}",
        },
        {
            "source_labels": ["envoy_cluster_name"],
            "regex": cluster,
            "target_label": "destination_service_name",
            "replacement": "${2}",
        },
        {
            "source_labels": ["envoy_response_code"],
            "regex": "(.+)",
            "target_label": "response_code",
            "replacement": "${1}",
        },
        {"target_label": "reporter", "replacement": "destination"},
        {"target_label": "destination_service_namespace", "replacement": namespace},
        {"target_label": "response_flags", "replacement": "-"},
    ]
    rules += [
        {
            "source_labels": ["__name__"],
            "regex": old,
            "target_label": "__name__",
            "replacement": new,
        }
        for old, new in _RENAMES
    ]
    rules.append(
        {"action": "labeldrop", "regex": "envoy_cluster_name|envoy_response_code"}
    )
    return rules


def scrape_config(
    envoy_admin: str,
    workloads: Sequence[Workload],
    *,
    namespace: str = "fl",
    scrape_interval: str = "1s",
) -> dict:
    """A whole Prometheus config for the local mesh and its client services.

    ``envoy_admin`` is Envoy's admin ``host:port``.  The interval is short so a
    demo's windows hold enough scrapes; windows must still span four of them.
    """
    clients = [
        {
            "targets": [f"{w.address}:{w.port}"],
            "labels": {"pod": w.name, "namespace": namespace},
        }
        for w in workloads
    ]
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": [
            {
                "job_name": ENVOY_JOB,
                "metrics_path": "/stats/prometheus",
                "params": {"usedonly": [""]},
                "static_configs": [{"targets": [envoy_admin]}],
                "metric_relabel_configs": envoy_relabelling(namespace),
            },
            {
                "job_name": CLIENTS_JOB,
                "metrics_path": "/metrics",
                "static_configs": clients,
            },
        ],
    }


# ------------------------------------------------------- targets from files


def targets_path(targets_dir: Path, job: str) -> Path:
    """The file that holds ``job``'s targets."""
    return Path(targets_dir) / f"{job}.json"


def file_sd_scrape_configs(targets_dir: Path, namespace: str = "fl") -> list[dict]:
    """The jobs of the local mesh, each reading its targets from ``targets_dir``.

    ``envoy`` scrapes Envoy's stats with the relabelling to Istio's series;
    ``fl-clients`` the client services' FL metrics; ``meshctl-controller`` the
    round API's ``/metrics`` (the controller's and the training's series).
    """

    def files(job: str) -> list[dict]:
        return [{"files": [str(targets_path(targets_dir, job))]}]

    return [
        {
            "job_name": ENVOY_JOB,
            "metrics_path": "/stats/prometheus",
            "params": {"usedonly": [""]},
            "file_sd_configs": files(ENVOY_JOB),
            "metric_relabel_configs": envoy_relabelling(namespace),
        },
        {
            "job_name": CLIENTS_JOB,
            "metrics_path": "/metrics",
            "file_sd_configs": files(CLIENTS_JOB),
        },
        {
            "job_name": CONTROLLER_JOB,
            "metrics_path": "/metrics",
            "file_sd_configs": files(CONTROLLER_JOB),
        },
    ]


def file_sd_config(
    targets_dir: Path, *, namespace: str = "fl", scrape_interval: str = "1s"
) -> dict:
    """The whole config of a Prometheus that scrapes the demo from target files."""
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": file_sd_scrape_configs(targets_dir, namespace),
    }


def write_targets(
    targets_dir: Path,
    *,
    envoy_admin: str | None = None,
    workloads: Sequence[Workload] | None = None,
    controller: str | None = None,
    namespace: str = "fl",
) -> list[Path]:
    """Write the target files of the jobs given (``host:port`` each); their paths.

    Each file is replaced whole by rename, so Prometheus never reads half of
    one; a job left as None keeps its file as it is.
    """
    groups: dict[str, list[dict]] = {}
    if envoy_admin is not None:
        groups[ENVOY_JOB] = [
            {"targets": [envoy_admin], "labels": {"namespace": namespace}}
        ]
    if workloads is not None:
        groups[CLIENTS_JOB] = [
            {
                "targets": [f"{w.address}:{w.port}"],
                "labels": {"pod": w.name, "namespace": namespace},
            }
            for w in workloads
        ]
    if controller is not None:
        groups[CONTROLLER_JOB] = [
            {"targets": [controller], "labels": {"namespace": namespace}}
        ]
    Path(targets_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for job, items in groups.items():
        path = targets_path(targets_dir, job)
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(items, indent=2))
        os.replace(partial, path)
        written.append(path)
    return written
