"""The recording rules: valid for promtool, the same in both forms, and exact."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests import prometheus_support as ps

RULES_DIR = Path(__file__).resolve().parents[1] / "manifests" / "prometheus"
RULES_FILE = RULES_DIR / "recording-rules.yaml"
PROMETHEUS_RULE = RULES_DIR / "prometheusrule.yaml"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(ps.skip_message())
    return path


def _run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_the_rules_file_passes_promtool(promtool) -> None:
    result = _run(promtool, "check", "rules", str(RULES_FILE), cwd=RULES_DIR)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_the_prometheus_rule_object_holds_the_same_valid_groups(
    promtool, tmp_path
) -> None:
    rule = yaml.safe_load(PROMETHEUS_RULE.read_text())
    plain = yaml.safe_load(RULES_FILE.read_text())
    extracted = tmp_path / "from-prometheusrule.yaml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))

    result = _run(promtool, "check", "rules", str(extracted), cwd=tmp_path)

    assert (rule["apiVersion"], rule["kind"]) == (
        "monitoring.coreos.com/v1",
        "PrometheusRule",
    )
    assert _normalised(rule["spec"]["groups"]) == _normalised(plain["groups"])
    assert result.returncode == 0, result.stdout + result.stderr


def _normalised(groups: list[dict]) -> list[dict]:
    """Groups with every expression's whitespace collapsed."""
    return [
        {
            **group,
            "rules": [
                {**rule, "expr": " ".join(rule["expr"].split())}
                for rule in group["rules"]
            ],
        }
        for group in groups
    ]


# Series every 15 s: c-00 serves 2/s with 0.5/s of 503, c-01 1/s and no 5xx
# series at all, c-02 has a series but no traffic.
UNIT_TEST = """
rule_files: [{rules}]
evaluation_interval: 30s
tests:
  - interval: 15s
    input_series:
      - series: 'istio_requests_total{{reporter="destination", pod="c-00",
          destination_service_namespace="fl", destination_service_name="fl-clients",
          response_code="200"}}'
        values: '0+30x40'
      - series: 'istio_requests_total{{reporter="destination", pod="c-00",
          destination_service_namespace="fl", destination_service_name="fl-clients",
          response_code="503"}}'
        values: '0+7.5x40'
      - series: 'istio_requests_total{{reporter="destination", pod="c-01",
          destination_service_namespace="fl", destination_service_name="fl-clients",
          response_code="200"}}'
        values: '0+15x40'
      - series: 'istio_requests_total{{reporter="destination", pod="c-02",
          destination_service_namespace="fl", destination_service_name="fl-clients",
          response_code="200"}}'
        values: '5+0x40'
    promql_expr_test:
      - expr: pod:istio_requests:rate2m{{pod="c-00"}}
        eval_time: 8m
        exp_samples:
          - labels: 'pod:istio_requests:rate2m{{pod="c-00",
              destination_service_namespace="fl",
              destination_service_name="fl-clients"}}'
            value: 2.5
      - expr: pod:istio_request_errors:ratio_rate2m{{pod=~"c-0[01]"}}
        eval_time: 8m
        exp_samples:
          - labels: 'pod:istio_request_errors:ratio_rate2m{{pod="c-00",
              destination_service_namespace="fl",
              destination_service_name="fl-clients"}}'
            value: 0.2
          - labels: 'pod:istio_request_errors:ratio_rate2m{{pod="c-01",
              destination_service_namespace="fl",
              destination_service_name="fl-clients"}}'
            value: 0
      # c-02 is NaN (no traffic, no data): only NaN differs from itself.
      - expr: count(pod:istio_request_errors:ratio_rate2m{{pod="c-02"}}
          != pod:istio_request_errors:ratio_rate2m{{pod="c-02"}})
        eval_time: 8m
        exp_samples:
          - labels: '{{}}'
            value: 1
"""


def test_the_rules_give_the_exact_rate_and_error_ratio(promtool, tmp_path) -> None:
    tests = tmp_path / "rules-test.yaml"
    tests.write_text(UNIT_TEST.format(rules=RULES_FILE))

    result = _run(promtool, "test", "rules", str(tests), cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
