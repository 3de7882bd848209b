"""The production PromQL against a real Prometheus scraping the local Envoy.

Prometheus scrapes Envoy's ``/stats/prometheus`` with the relabelling of
:mod:`meshctl.telemetry.localprom`, so the Istio-named series appear and
:class:`PrometheusSource` reads the local mesh unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from meshctl.localmesh.envoy import LocalMesh
from meshctl.telemetry import localprom
from meshctl.telemetry.prometheus import PrometheusSource
from meshctl.types import ClientState
from tests import prometheus_support as ps
from tests.conftest import Backend
from tests.test_envoystats import _objects, _send

pytestmark = pytest.mark.envoy


def _value(url: str, query: str) -> float | None:
    result = httpx.get(f"{url}/api/v1/query", params={"query": query}).json()
    items = result["data"]["result"]
    return float(items[0]["value"][1]) if items else None


def _wait_for(url: str, query: str, expected: float, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _value(url, query) == expected:
            return
        time.sleep(0.1)
    raise AssertionError(f"{query} never reached {expected} in {url}")


@pytest.fixture
def scraped_mesh(
    tmp_path,
    http_backends: Callable[..., Backend],
    local_mesh: Callable[..., LocalMesh],
):
    """A mesh with a healthy and a half-failing client, scraped every 200 ms."""
    if ps.find_prometheus() is None:
        pytest.skip(ps.skip_message())
    backends = [
        http_backends("c-00"),
        http_backends("c-01", fail_every=2),
        http_backends("c-02"),
    ]
    mesh = local_mesh([b.workload for b in backends])
    mesh.sync(*_objects({1: "c-00", 2: "c-01", 3: "c-02"}))
    admin = mesh.admin_url.removeprefix("http://")
    config = localprom.scrape_config(admin, [], scrape_interval="200ms")
    server = ps.PrometheusProcess(
        tmp_path / "prometheus",
        scrape_interval="200ms",
        scrape_configs=config["scrape_configs"],
    ).start()
    yield mesh, server.url
    server.stop()


def test_the_production_queries_read_the_relabelled_local_envoy(scraped_mesh):
    mesh, url = scraped_mesh
    total = 'sum(istio_requests_total{pod="c-01", reporter="destination"})'

    # A counter's first sample is its baseline: the traffic measured comes after.
    _send(mesh, {1: 2, 2: 2})
    _wait_for(url, total, 2.0)
    _send(mesh, {1: 20, 2: 20})
    _wait_for(url, total, 22.0)

    telemetry = PrometheusSource(url, namespace="fl").read(30)

    healthy, failing = telemetry["c-00"], telemetry["c-01"]
    assert healthy.state is ClientState.OBSERVED
    assert healthy.error_ratio == 0.0
    assert healthy.requests_per_s > 0
    assert failing.state is ClientState.FAILING
    assert failing.error_ratio == pytest.approx(0.5)
    assert "c-02" not in telemetry or telemetry["c-02"].state is (
        ClientState.UNOBSERVED
    )
