"""Per-client telemetry from Istio's standard metrics in Prometheus.

:class:`PrometheusSource` answers the controller's ``read(window_s)`` with a fixed
set of PromQL queries, whatever the number of clients: each query groups by the
label that names a client's pod (``pod`` by default, as a PodMonitor writes it).

- ``reporter="destination"`` series, which the client's own sidecar reports, give
  the request rate, the error ratio (5xx and code 0) and the latency quantiles of
  ``istio_request_duration_milliseconds``;
- ``reporter="source"`` series, which the FL server's sidecar reports, give the
  failures the mesh made before a request reached a pod (code 0, or 503 and 504
  with a response flag such as UH, NR, UF, UO, URX or UT).  Istio's standard
  labels do not name the destination pod on the source side: such failures are
  attributed by ``mesh_failure_label`` (``destination_pod``), a label that a
  Telemetry tag override, or the local mesh's relabelling, adds;
- the FL metrics each client service exports (training loss, examples, local
  training seconds) come from the service's own scrape.

No data is never a number.  Prometheus sends values as strings; ``"NaN"`` and
``"+Inf"`` are parsed on purpose and no value that is not finite leaves this
module.  A client without traffic in the window is UNOBSERVED; a client with
traffic and no 5xx series has an error ratio of 0; a client whose error ratio is
``NaN`` is UNOBSERVED, since nothing sure can be said of it.

Every call has an explicit timeout, on the HTTP request and as the query's own
``timeout`` parameter, and is tried once: the controller owns the back-off.

A cycle costs eight answers of N series each.  An answer is decoded with a
typed decoder that keeps only the label naming the client and the value
(``msgspec``, no general JSON tree) into an array per figure, and the rules
above run on whole columns: a read gives a :class:`~meshctl.table.TelemetryTable`,
not an object per client.  An answer the typed decoder does not accept is
read again by the general path, which names what is wrong with it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import operator
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypedDict
from urllib.parse import urlsplit

import msgspec
import numpy as np
import requests
import yaml
from requests.adapters import HTTPAdapter
from urllib3 import exceptions as urllib3_errors
from urllib3.util.retry import Retry

from meshctl import protocol, table
from meshctl.table import TelemetryTable
from meshctl.telemetry import bulk
from meshctl.telemetry.envoystats import DEFAULT_FAILING_RATIO
from meshctl.types import ClientTelemetry

log = logging.getLogger("meshctl.telemetry.prometheus")

DEFAULT_POD_LABEL = "pod"
DEFAULT_NAMESPACE_LABEL = "namespace"
DEFAULT_MESH_FAILURE_LABEL = "destination_pod"
DEFAULT_TIMEOUT_S = 5.0
_READ_CHUNK_BYTES = 1 << 20
MIN_SCRAPE_INTERVALS = 4
# Prometheus' own default when a config names no scrape interval.
DEFAULT_SCRAPE_INTERVAL_S = 60.0

# Response flags of requests the mesh failed before (or instead of) a pod answering.
MESH_FAILURE_FLAGS = ("NR", "UH", "UF", "UO", "URX", "UT", "UC", "DC")

# The FL metrics a client service exports (meshctl.flower.clientservice).
FL_TRAIN_LOSS = "meshctl_fl_train_loss"
FL_TRAIN_EXAMPLES = "meshctl_fl_train_examples"
FL_LOCAL_TRAIN_SECONDS = "meshctl_fl_local_train_seconds"

ShortWindow = Literal["widen", "refuse"]


class PrometheusError(RuntimeError):
    """Prometheus could not answer a query; the controller keeps its last routes.

    ``kind`` says what happened: ``unreachable``, ``timeout``, ``bad_query`` (400),
    ``unprocessable`` (422), ``unavailable`` (503), ``http`` (another status) or
    ``bad_response``.  ``temporary`` is True when trying again later may help.
    """

    def __init__(self, message: str, *, kind: str, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status

    @property
    def temporary(self) -> bool:
        return self.kind in ("unreachable", "timeout", "unavailable", "http")


class WindowTooShort(PrometheusError, ValueError):
    """The window holds fewer than four scrape intervals and widening is off."""

    def __init__(self, message: str):
        super().__init__(message, kind="window")


class VectorSample(TypedDict):
    """One element of an instant vector, as Prometheus' HTTP API sends it."""

    metric: dict[str, str]
    value: list  # [unix seconds as a number, value as a string]


@dataclass(frozen=True)
class PrometheusTelemetry(ClientTelemetry):
    """A client's telemetry with what only Prometheus knows of it."""

    mesh_failures_per_s: float | None = None
    train_loss: float | None = None
    train_examples: float | None = None
    local_train_s: float | None = None


# --------------------------------------------------------------------- values


def parse_value(text: object) -> float:
    """A sample value as Prometheus writes it: a decimal string, ``NaN``, ``+Inf``
    or ``-Inf``; a bare JSON number is read as itself.

    Raises :class:`PrometheusError` for anything else, so a malformed answer is
    never mistaken for data.
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        return float(text)
    if not isinstance(text, str):
        raise PrometheusError(
            f"sample value {text!r} is not a number", kind="bad_response"
        )
    try:
        return float(text)
    except ValueError as exc:
        raise PrometheusError(
            f"sample value {text!r} is not a number", kind="bad_response"
        ) from exc


def finite(value: float | None) -> float | None:
    """``value`` when it is a finite number, else None: no data is never a number."""
    if value is None or not math.isfinite(value):
        return None
    return value


def check_url(url: str) -> str:
    """``url`` when it names a Prometheus server (http or https, and a host);
    a ValueError that says so otherwise."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError as exc:  # an unclosed IPv6 bracket, say
        raise ValueError(f"Prometheus URL {url!r} is not a URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not hostname:
        raise ValueError(
            f"Prometheus URL {url!r} is not an http(s) URL such as "
            "http://prometheus.monitoring:9090"
        )
    return url


def parse_duration_s(text: str) -> float:
    """Seconds in a Prometheus duration such as ``15s``, ``1m30s`` or ``100ms``."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)", text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        raise ValueError(f"{text!r} is not a Prometheus duration (like 30s, 5m, 1h)")
    return sum(float(n) * units.get(u, 31536000) for n, u in parts)


def format_duration(seconds: float) -> str:
    """A PromQL range for ``seconds``: whole seconds, or milliseconds if needed."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def scrape_interval_s(config_yaml: str, jobs: Sequence[str] = ()) -> float:
    """The longest scrape interval in a Prometheus config (of ``jobs`` if given).

    A job without its own interval uses the global one; a config without any uses
    Prometheus' default of one minute.
    """
    config = yaml.safe_load(config_yaml) or {}
    default = (config.get("global") or {}).get("scrape_interval")
    global_s = parse_duration_s(default) if default else DEFAULT_SCRAPE_INTERVAL_S
    intervals = [
        parse_duration_s(job["scrape_interval"])
        if job.get("scrape_interval")
        else global_s
        for job in config.get("scrape_configs") or []
        if not jobs or job.get("job_name") in jobs
    ]
    return max(intervals, default=global_s)


def effective_window_s(
    window_s: float, interval_s: float, on_short: ShortWindow = "widen"
) -> float:
    """The window to query: at least four scrape intervals, or an error.

    ``rate()`` needs two samples in its range; with fewer than four intervals a
    missed scrape leaves a client with no data.
    """
    minimum = MIN_SCRAPE_INTERVALS * interval_s
    if window_s >= minimum:
        return window_s
    if on_short == "refuse":
        raise WindowTooShort(
            f"window {window_s:g}s is shorter than {MIN_SCRAPE_INTERVALS} scrape "
            f"intervals of {interval_s:g}s; use a window of at least {minimum:g}s"
        )
    log.warning(
        "window %gs is shorter than %d scrape intervals of %gs; querying %gs instead",
        window_s,
        MIN_SCRAPE_INTERVALS,
        interval_s,
        minimum,
    )
    return minimum


# -------------------------------------------------------------------- queries


@dataclass(frozen=True)
class QuerySet:
    """The PromQL of one cycle, for one service, namespace and window.

    The same expressions, with the window as ``$__rate_interval``-free text, are
    what the recording rules and the dashboards use.
    """

    service: str = protocol.SERVICE_HOST
    namespace: str = "fl"
    pod_label: str = DEFAULT_POD_LABEL
    namespace_label: str = DEFAULT_NAMESPACE_LABEL
    mesh_failure_label: str = DEFAULT_MESH_FAILURE_LABEL

    def _istio(self, reporter: str, extra: str = "") -> str:
        selector = (
            f'reporter="{reporter}", destination_service_name="{self.service}", '
            f'destination_service_namespace="{self.namespace}"'
        )
        return selector + (f", {extra}" if extra else "")

    def requests_per_s(self, window: str) -> str:
        return (
            f"sum by ({self.pod_label}) "
            f"(rate(istio_requests_total{{{self._istio('destination')}}}[{window}]))"
        )

    def error_ratio(self, window: str) -> str:
        # A pod with traffic and no 5xx series at all has no error series: the
        # "or ... * 0" branch gives it 0, so only a pod with no traffic is NaN.
        errors = self._istio("destination", 'response_code=~"5..|0"')
        total = f"rate(istio_requests_total{{{self._istio('destination')}}}[{window}])"
        by = f"sum by ({self.pod_label})"
        return (
            f"({by} (rate(istio_requests_total{{{errors}}}[{window}])) "
            f"or {by} ({total}) * 0) / {by} ({total})"
        )

    def latency_ms(self, quantile: float, window: str) -> str:
        bucket = "istio_request_duration_milliseconds_bucket"
        return (
            f"histogram_quantile({quantile}, sum by ({self.pod_label}, le) "
            f"(rate({bucket}{{{self._istio('destination')}}}[{window}])))"
        )

    def mesh_failures_per_s(self, window: str) -> str:
        flags = "|".join(MESH_FAILURE_FLAGS)
        flagged = self._istio(
            "source", f'response_code=~"503|504", response_flags=~".*({flags}).*"'
        )
        no_response = self._istio("source", 'response_code="0"')
        return (
            f"sum by ({self.mesh_failure_label}) "
            f"(rate(istio_requests_total{{{flagged}}}[{window}]) "
            f"or rate(istio_requests_total{{{no_response}}}[{window}]))"
        )

    def fl_last(self, metric: str, window: str) -> str:
        selector = f'{self.namespace_label}="{self.namespace}"'
        return (
            f"max by ({self.pod_label}) "
            f"(last_over_time({metric}{{{selector}}}[{window}]))"
        )

    def all(self, window: str) -> dict[str, tuple[str, str]]:
        """Every query of a cycle: name -> (expression, label naming the client)."""
        pod = self.pod_label
        return {
            "requests_per_s": (self.requests_per_s(window), pod),
            "error_ratio": (self.error_ratio(window), pod),
            "latency_p50_ms": (self.latency_ms(0.5, window), pod),
            "latency_p95_ms": (self.latency_ms(0.95, window), pod),
            "mesh_failures_per_s": (
                self.mesh_failures_per_s(window),
                self.mesh_failure_label,
            ),
            "train_loss": (self.fl_last(FL_TRAIN_LOSS, window), pod),
            "train_examples": (self.fl_last(FL_TRAIN_EXAMPLES, window), pod),
            "local_train_s": (self.fl_last(FL_LOCAL_TRAIN_SECONDS, window), pod),
        }


# ------------------------------------------------------------------ telemetry

# The figures of a client's row, one query each.
FIGURES = (
    "requests_per_s",
    "error_ratio",
    "latency_p50_ms",
    "latency_p95_ms",
    "mesh_failures_per_s",
    "train_loss",
    "train_examples",
    "local_train_s",
)

Series = tuple[list[str], np.ndarray]
"""The clients an answer names and their values, in its order; NaN and Inf kept."""


def client_telemetry(
    client: str,
    values: Mapping[str, float],
    window_s: float,
    failing_ratio: float = DEFAULT_FAILING_RATIO,
) -> PrometheusTelemetry:
    """One client's telemetry from its raw query values (NaN and Inf included).

    UNOBSERVED when the destination saw no traffic or the error ratio is not a
    number, unless the mesh itself failed requests for it: a pod the mesh cannot
    reach is FAILING.  Otherwise FAILING when destination errors and mesh failures
    together reach ``failing_ratio`` of the requests, else OBSERVED.
    """
    figures = {name: {client: values.get(name, math.nan)} for name in FIGURES}
    return client_rows(figures, window_s, failing_ratio)[client]  # type: ignore[return-value]


def client_rows(
    figures: Mapping[str, Mapping[str, float]],
    window_s: float,
    failing_ratio: float = DEFAULT_FAILING_RATIO,
) -> TelemetryTable:
    """Every client's telemetry from ``{figure: {client: value}}``: what
    :func:`client_telemetry` gives each."""
    answers = {
        name: (list(by_client), np.array(list(by_client.values()), dtype=float))
        for name, by_client in figures.items()
    }
    return client_table(answers, window_s, failing_ratio)


def client_table(
    answers: Mapping[str, Series],
    window_s: float,
    failing_ratio: float = DEFAULT_FAILING_RATIO,
) -> TelemetryTable:
    """Every client's telemetry from the answers of a cycle, by figure.

    The rules of :func:`client_telemetry`, applied to whole columns: a client
    that an answer does not name has no data for that figure.
    """
    clients, columns = _align(answers)
    unknown = np.full(len(clients), np.nan)

    def column(name: str) -> np.ndarray:
        return columns.get(name, unknown)

    with np.errstate(all="ignore"):
        rate = _not_negative(column("requests_per_s"))
        ratio = _not_negative(column("error_ratio"))
        mesh = _not_negative(column("mesh_failures_per_s"))
        measured = (rate > 0) & ~np.isnan(ratio)

        # Scaled by the larger rate, so that huge rates cannot overflow the sums.
        failures = np.where(np.isnan(mesh), 0.0, mesh)
        scale = np.maximum(rate, failures)
        failed = ratio * (rate / scale) + failures / scale
        attempted = rate / scale + failures / scale
        failing = failed / attempted >= failing_ratio
        state = np.where(
            measured,
            np.where(failing, table.FAILING, table.OBSERVED),
            np.where(mesh > 0, table.FAILING, table.UNOBSERVED),
        )
        requests = _counts(np.where(measured, rate * window_s, 0.0))

        def when_measured(values: np.ndarray) -> np.ndarray:
            return np.where(measured, values, np.nan)

        figures = {
            "requests_per_s": when_measured(rate),
            "error_ratio": when_measured(ratio),
            "latency_p50_ms": when_measured(_finite_or_nan(column("latency_p50_ms"))),
            "latency_p95_ms": when_measured(_finite_or_nan(column("latency_p95_ms"))),
            "mesh_failures_per_s": mesh,
            "train_loss": _finite_or_nan(column("train_loss")),
            "train_examples": _finite_or_nan(column("train_examples")),
            "local_train_s": _finite_or_nan(column("local_train_s")),
        }
    return TelemetryTable(
        clients,
        state=state,
        requests=requests,
        figures=figures,
        row_type=PrometheusTelemetry,
    )


def _align(answers: Mapping[str, Series]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Every client any answer names, in order of appearance, and each figure
    as a column over them (NaN where its answer does not name the client)."""
    clients: list[str] = []
    index: dict[str, int] = {}
    placed: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}
    last: tuple[list[str], np.ndarray] | None = None
    for name, (names, values) in answers.items():
        if names == clients:  # the usual case: every answer in the same order
            placed[name] = (None, values)
            continue
        if last is not None and names == last[0]:  # the order of the one before
            placed[name] = (last[1], values)
            continue
        new = [c for c in dict.fromkeys(names) if c not in index]
        index.update(
            zip(new, range(len(clients), len(clients) + len(new)), strict=True)
        )
        clients += new
        rows = np.fromiter(map(index.__getitem__, names), np.intp, len(names))
        placed[name] = (rows, values)
        last = (names, rows)
    columns = {}
    for name, (rows, values) in placed.items():
        if rows is not None or len(values) != len(clients):
            column = np.full(len(clients), np.nan)
            column[rows if rows is not None else slice(len(values))] = values
            values = column
        columns[name] = values
    return clients, columns


def _not_negative(values: np.ndarray) -> np.ndarray:
    """Rates and ratios: finite and not negative, else NaN (no sure figure)."""
    return np.where(np.isfinite(values) & (values >= 0), values, np.nan)


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def _counts(values: np.ndarray) -> np.ndarray:
    """Request counts from ``rate * window``; absurd rates saturate."""
    huge = ~(values < 2.0**63)  # Inf and NaN too
    counts = np.rint(np.where(huge, 0.0, values)).astype(np.int64)
    return np.where(huge, sys.maxsize, counts)


# --------------------------------------------------------------------- source


class PrometheusSource:
    """Reads every client's telemetry from Prometheus with a fixed set of queries.

    ``on_short_window`` says what to do with a window shorter than four scrape
    intervals of the server (read from ``/api/v1/status/config`` on first use):
    ``widen`` it with a warning, or ``refuse`` it with :class:`WindowTooShort`.
    ``clock`` gives the evaluation instant of a cycle (unix seconds); every query
    of a cycle is evaluated at that one instant, so their figures agree.
    ``fresh_scrape_jobs`` name scrape jobs whose next scrape of every target
    each read waits for (at most two scrape intervals), so that traffic just
    before the read is counted: worth it where cycles follow each other within
    seconds, as in the demo; in a cluster the window is minutes long and no read
    waits.
    """

    def __init__(
        self,
        url: str,
        *,
        namespace: str = "fl",
        service: str = protocol.SERVICE_HOST,
        pod_label: str = DEFAULT_POD_LABEL,
        namespace_label: str = DEFAULT_NAMESPACE_LABEL,
        mesh_failure_label: str = DEFAULT_MESH_FAILURE_LABEL,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        failing_ratio: float = DEFAULT_FAILING_RATIO,
        on_short_window: ShortWindow = "widen",
        scrape_jobs: Sequence[str] = (),
        fresh_scrape_jobs: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = check_url(url).rstrip("/")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"the timeout ({timeout_s} s) must be a positive number")
        self.queries = QuerySet(
            service=service,
            namespace=namespace,
            pod_label=pod_label,
            namespace_label=namespace_label,
            mesh_failure_label=mesh_failure_label,
        )
        self.timeout_s = timeout_s
        self.failing_ratio = failing_ratio
        self.on_short_window = on_short_window
        self.scrape_jobs = tuple(scrape_jobs)
        self.fresh_scrape_jobs = tuple(fresh_scrape_jobs)
        self._clock = clock
        self._interval_s: float | None = None
        self._session = requests.Session()
        # No retries inside a cycle: a retry with back-off would stall the round,
        # and the controller already retries on its own schedule.
        self._session.mount(
            self.url, HTTPAdapter(max_retries=Retry(total=0, raise_on_status=False))
        )

    # -- the TelemetrySource protocol

    def read(self, window_s: float) -> TelemetryTable:
        """Every client's telemetry over ``window_s`` seconds until now."""
        window_s = self.window_s(window_s)
        window = format_duration(window_s)
        if self.fresh_scrape_jobs:
            self.wait_for_scrape(self.fresh_scrape_jobs, self._clock())
        at = self._clock()
        with bulk.paused():
            answers = {
                name: self.series(query, label, at, name)
                for name, (query, label) in self.queries.all(window).items()
            }
            return client_table(answers, window_s, self.failing_ratio)

    # -- the parts

    def window_s(self, window_s: float) -> float:
        """``window_s``, widened or refused against the server's scrape interval."""
        if self._interval_s is None:
            self._interval_s = self.scrape_interval_s()
        return effective_window_s(window_s, self._interval_s, self.on_short_window)

    def scrape_interval_s(self) -> float:
        """The server's longest scrape interval, from ``/api/v1/status/config``."""
        url = f"{self.url}/api/v1/status/config"
        try:
            response = self._session.get(url, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise _transport_error(self.url, "reading its config", exc) from exc
        if response.status_code != 200:
            raise _status_error(self.url, "reading its config", response)
        try:
            config_yaml = response.json()["data"]["yaml"]
            return scrape_interval_s(config_yaml, self.scrape_jobs)
        except (ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
            raise PrometheusError(
                f"Prometheus at {self.url} sent a config meshctl cannot read: {exc}",
                kind="bad_response",
            ) from exc

    def last_scrape_s(self, jobs: Sequence[str]) -> float | None:
        """When the least recent of the last scrapes of ``jobs``' targets started
        (unix seconds), or None when Prometheus has not scraped them."""
        # A PromQL string takes no regex escapes such as "\-": match names whole.
        names = "|".join(jobs)
        query = f'min(timestamp(up{{job=~"{names}"}}))'
        body = self._query_body(query, self._clock(), "last scrape")
        result = self._result(body, "last scrape")
        try:
            return parse_value(result[0]["value"][1]) if result else None
        except (KeyError, IndexError, TypeError) as exc:
            raise PrometheusError(
                f"Prometheus at {self.url} answered {str(result)[:200]} to the "
                "last scrape query",
                kind="bad_response",
            ) from exc

    def wait_for_scrape(self, jobs: Sequence[str], after_s: float) -> bool:
        """Wait until every target of ``jobs`` was scraped at ``after_s`` or later.

        Gives up after two scrape intervals with a warning (the read then uses
        what Prometheus has); True when such a scrape landed.
        """
        interval_s = self._interval_s or self.scrape_interval_s()
        deadline = time.monotonic() + 2 * interval_s + self.timeout_s
        while time.monotonic() < deadline:
            last = self.last_scrape_s(jobs)
            if last is not None and last >= after_s:
                return True
            time.sleep(min(0.1, interval_s / 4))
        log.warning(
            "no scrape of jobs %s since %.3f in %.0f s; reading what Prometheus has",
            ", ".join(jobs),
            after_s,
            2 * interval_s + self.timeout_s,
        )
        return False

    def query(
        self, query: str, label: str, at: float, name: str = "ad hoc"
    ) -> dict[str, float]:
        """An instant vector as ``{value of label: value}``; NaN and Inf kept.

        Series without ``label`` are left out (logged at DEBUG): they name no client.
        """
        clients, values = self.series(query, label, at, name)
        return dict(zip(clients, values.tolist(), strict=True))

    def series(self, query: str, label: str, at: float, name: str = "ad hoc") -> Series:
        """:meth:`query`'s answer as the clients it names and an array of values."""
        body = self._query_body(query, at, name)
        found = _decode_vector(body, label)
        if found is not None:
            return found
        by_client = self._read_vector(body, label, name)
        return list(by_client), np.array(list(by_client.values()), dtype=float)

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    def _query_body(self, query: str, at: float, name: str) -> bytes:
        """The body of a 200 answer to ``query``, evaluated at ``at``."""
        what = f"running the {name} query"
        log.debug("%s query at %.3f: %s", name, at, query)
        params = {
            "query": query,
            "time": f"{at:.3f}",
            "timeout": f"{self.timeout_s:g}s",
        }
        try:
            response = self._session.get(
                f"{self.url}/api/v1/query",
                params=params,
                timeout=self.timeout_s,
                stream=True,
            )
            if response.status_code == 200:
                # An answer of a hundred thousand series is megabytes: read it
                # in large pieces, not in requests' default 10 kB.
                body = b"".join(response.iter_content(_READ_CHUNK_BYTES))
            else:
                body = response.content
        except requests.RequestException as exc:
            raise _transport_error(self.url, what, exc) from exc
        if response.status_code != 200:
            raise _status_error(self.url, what, response)
        return body

    def _read_vector(self, body: bytes, label: str, name: str) -> dict[str, float]:
        """:meth:`query`'s answer read as general JSON, each element checked: the
        path of an answer the typed decoder refused, which says what is wrong."""
        result = self._result(body, name)
        by_client: dict[str, float] = {}
        for item in result:
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("metric"), dict)
                or not isinstance(item.get("value"), list)
                or len(item["value"]) != 2
            ):
                raise PrometheusError(
                    f"Prometheus at {self.url} answered {str(item)[:200]} "
                    f"where an instant vector element was expected in the {name} query",
                    kind="bad_response",
                )
            sample: VectorSample = item  # type: ignore[assignment]
            client = sample["metric"].get(label)
            if not client or not isinstance(client, str):
                log.debug("series without %s left out: %s", label, sample["metric"])
                continue
            try:
                by_client[client] = parse_value(sample["value"][1])
            except PrometheusError as exc:
                raise PrometheusError(
                    f"Prometheus at {self.url} answered {exc} for {label} "
                    f"{client!r} in the {name} query",
                    kind="bad_response",
                ) from exc
        return by_client

    def _result(self, body: bytes, name: str) -> list:
        """The ``data.result`` list of an answer, or a PrometheusError."""
        what = f"running the {name} query"
        try:
            result = json.loads(body)["data"]["result"]
        except (ValueError, KeyError, TypeError) as exc:
            raise PrometheusError(
                f"Prometheus at {self.url} answered a body meshctl cannot read "
                f"({exc}); {what}",
                kind="bad_response",
            ) from exc
        if not isinstance(result, list):
            raise PrometheusError(
                f"Prometheus at {self.url} answered {str(result)[:200]} where an "
                f"instant vector was expected; {what}",
                kind="bad_response",
            )
        return result


# ---------------------------------------------------------------- fast decoding


class _Value(
    msgspec.Struct, array_like=True, forbid_unknown_fields=True, frozen=True, gc=False
):
    """A sample's ``[unix seconds, value]``, the value read as a float."""

    at: Any
    number: float


@functools.cache
def _vector_decoder(label: str) -> msgspec.json.Decoder:
    """A decoder of instant-vector answers keeping only ``label`` and the value.

    Untracked by the garbage collector: a hundred thousand samples would
    otherwise set off full collections while they are decoded.  Not strict, so
    that it reads a value's string as a float itself (``"1.5"``, ``"NaN"``,
    ``"Inf"``, ``"-Inf"``) rather than through a string object per sample.
    """
    options: dict[str, Any] = {"frozen": True, "gc": False}
    metric = msgspec.defstruct(
        "Metric", [("client", str | None, None)], rename={"client": label}, **options
    )
    sample = msgspec.defstruct(
        "Sample", [("metric", metric), ("value", _Value)], **options
    )
    data = msgspec.defstruct("Data", [("result", list[sample])], **options)
    answer = msgspec.defstruct("Answer", [("data", data)], **options)
    return msgspec.json.Decoder(answer, strict=False)


_CLIENT = operator.attrgetter("metric.client")
_NUMBER = operator.attrgetter("value.number")


def _decode_vector(body: bytes, label: str) -> Series | None:
    """The clients and values of a well-formed instant vector, where every
    series names a client and every value is a number; None otherwise, and the
    general path then reads the answer and says what is wrong with it.

    The decoder reads no ``"+Inf"``: it is spelt ``"Inf"`` first, where it
    ends a sample's value (in compact JSON, the only place that can be).  A
    value it does not read, such as ``" 1"``, sends the answer down the
    general path, which reads what ``float()`` reads.
    """
    try:
        answer = _vector_decoder(label).decode(body.replace(b',"+Inf"]', b',"Inf"]'))
    except msgspec.MsgspecError:
        return None
    result = answer.data.result
    clients = list(map(_CLIENT, result))
    if None in clients or "" in clients:
        return None
    return clients, np.fromiter(map(_NUMBER, result), np.float64, len(result))


_STATUS_KINDS = {400: "bad_query", 422: "unprocessable", 503: "unavailable"}


def _status_error(url: str, what: str, response: requests.Response) -> PrometheusError:
    """A PrometheusError for an answer that is not 200, with the server's reason."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        reason = f"{body.get('errorType', '')}: {body.get('error', '')}"
    else:
        reason = response.text[:200]
    kind = _STATUS_KINDS.get(response.status_code, "http")
    return PrometheusError(
        f"Prometheus at {url} answered {response.status_code} ({reason[:300]}) "
        f"while {what}",
        kind=kind,
        status=response.status_code,
    )


def _transport_error(
    url: str, what: str, error: requests.RequestException
) -> PrometheusError:
    """A PrometheusError for a call that got no answer: down or too slow."""
    # With retries off, urllib3 wraps a read timeout in MaxRetryError: look inside.
    reason = getattr(error.args[0], "reason", None) if error.args else None
    timed_out = isinstance(reason, urllib3_errors.TimeoutError) and not isinstance(
        reason, urllib3_errors.NewConnectionError
    )
    if isinstance(error, requests.Timeout) or timed_out:
        return PrometheusError(
            f"Prometheus at {url} did not answer in time while {what} ({error})",
            kind="timeout",
        )
    return PrometheusError(
        f"Prometheus at {url} is unreachable while {what} ({error})",
        kind="unreachable",
    )
