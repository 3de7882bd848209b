"""Per-client telemetry from a local Envoy's own statistics.

Each client is a subset, so Envoy keeps its numbers in the cluster
``outbound|80|<client>|fl-clients``.  :class:`EnvoyStatsSource` reads
``/stats/prometheus`` into a :class:`Snapshot` (cumulative counters and
histogram buckets at one monotonic instant); :func:`window` turns two snapshots
into per-client telemetry, as a Prometheus ``rate()`` and ``histogram_quantile()``
over the same interval would.

What Envoy's admin shows, and so what a snapshot holds:

- counters (``upstream_rq_total``, ``upstream_rq_<class>xx``) are live: a request
  counts as soon as its upstream request starts (total) or its response completes
  (class), with no wait for a stats flush;
- histograms (``upstream_rq_time``) are merged only at each stats flush (every
  second for the local mesh), so latency lags the counters by up to one flush
  interval.  Read a window's latency at least one interval after its traffic.
- ``upstream_rq_total`` counts upstream attempts: a retried request counts once per
  attempt, and a request answered by the mesh itself (a fault, a direct response,
  no healthy upstream) does not reach it.
"""

from __future__ import annotations

import collections
import math
import operator
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import compress, repeat

import httpx

from meshctl import protocol
from meshctl.telemetry import bulk
from meshctl.types import ClientState, ClientTelemetry

DEFAULT_FAILING_RATIO = 0.5

# Only the per-cluster series that the telemetry needs.
_STATS_FILTER = (
    r"^cluster\.outbound\|.*\.(upstream_rq_total|upstream_rq_[1-5]xx|upstream_rq_time)$"
)
# Envoy writes the per-code counter, like the total, as ``..._rq_total`` (told
# apart by its ``envoy_response_code`` label) and the per-class one as ``..._rq_xx``.
_PREFIX = "envoy_cluster_upstream_rq_"
_TOTAL = "envoy_cluster_upstream_rq_total"
_CLASS = "envoy_cluster_upstream_rq_xx"
_BUCKET = "envoy_cluster_upstream_rq_time_bucket"
_COUNT = "envoy_cluster_upstream_rq_time_count"
_SERIES = frozenset((_TOTAL, _CLASS, _BUCKET, _COUNT))
# One sample line of the four series read: name, labels, value.
_SAMPLE = re.compile(
    r"^(envoy_cluster_upstream_rq_total|envoy_cluster_upstream_rq_xx"
    r"|envoy_cluster_upstream_rq_time_bucket|envoy_cluster_upstream_rq_time_count)"
    r"\{([^}\n]*)\}[ \t]+(\S+)",
    re.MULTILINE,
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
# A line of the four series exactly as Envoy writes it: label values without
# escapes, a plain integer value.  Groups: per-code total's code, total's
# cluster, class, class's cluster, bucket's cluster, bucket bound, latency
# count's cluster, value.
_VALUE = r'"([^"\\\n}]+)"'
_ENVOY_LINE = re.compile(
    r"^envoy_cluster_upstream_rq_(?:"
    r'total\{(envoy_response_code="[^"\\\n}]+",)?'
    rf"envoy_cluster_name={_VALUE}\}}"
    rf"|xx\{{envoy_response_code_class={_VALUE},envoy_cluster_name={_VALUE}\}}"
    rf"|time_bucket\{{envoy_cluster_name={_VALUE},le={_VALUE}\}}"
    rf"|time_count\{{envoy_cluster_name={_VALUE}\}}"
    r") ([0-9]+)$",
    re.MULTILINE,
)


class EnvoyStatsError(RuntimeError):
    """Envoy's statistics could not be read; callers keep their last routes."""


@dataclass(frozen=True)
class ClientCounters:
    """One client's cumulative counters at one instant.

    ``responses_by_class`` maps a response code class ("2", "5", ...) to a count;
    ``latency_buckets`` holds ``(upper bound in ms, cumulative count)`` pairs in
    increasing order, the last bound being infinity.
    """

    requests_total: int = 0
    responses_by_class: Mapping[str, int] = field(default_factory=dict)
    latency_buckets: tuple[tuple[float, int], ...] = ()
    latency_count: int = 0


@dataclass(frozen=True)
class Snapshot:
    """Every client's counters, taken at ``taken_at`` (``time.monotonic()``)."""

    taken_at: float
    clients: Mapping[str, ClientCounters]


# -------------------------------------------------------------------- parsing


def parse_prometheus(
    text: str, host: str = protocol.SERVICE_HOST
) -> dict[str, ClientCounters]:
    """Per-client counters from Envoy's Prometheus text for the subsets of ``host``.

    Only the four series the telemetry needs are read.  Envoy's own lines are
    read by one regular expression over the whole text that knows their exact
    shape; when any line of the four series has another shape (escapes, other
    labels, a timestamp), the text is read again line by line, each line's
    labels parsed, as before.  A general exposition parser costs seconds per
    hundred thousand clusters.
    """
    with bulk.paused():
        series = _envoy_lines(text, host) or _any_lines(text, host)
        return _counters(*series)


def _counters(
    totals: dict[str, int],
    classes: dict[str, dict[str, int]],
    buckets: dict[str, list[tuple[float, int]]],
    counts: dict[str, int],
) -> dict[str, ClientCounters]:
    """Each client's counters from the four series."""
    return {
        client: ClientCounters(
            requests_total=totals.get(client, 0),
            responses_by_class=dict(classes.get(client, {})),
            latency_buckets=tuple(sorted(buckets.get(client, []))),
            latency_count=counts.get(client, 0),
        )
        for client in set(totals) | set(classes) | set(buckets)
    }


# Totals, classes, buckets and latency counts, per client.
_Series = tuple[
    dict[str, int],
    dict[str, dict[str, int]],
    dict[str, list[tuple[float, int]]],
    dict[str, int],
]


def _envoy_lines(text: str, host: str) -> _Series | None:
    """The four series when every line of them has Envoy's own shape, else None.

    The matches are taken apart a column at a time (each line fills the groups
    of its own series only), so no Python code runs once per line.
    """
    found = _ENVOY_LINE.findall(text)
    lines = sum(text.count(f"\n{name}{{") for name in _SERIES)
    lines += any(text.startswith(f"{name}{{") for name in _SERIES)
    if len(found) != lines:
        return None
    if not found:
        return {}, {}, {}, {}
    columns = [list(map(operator.itemgetter(i), found)) for i in range(8)]
    code, total_of, code_class, class_of, bucket_of, le, count_of, value = columns
    client_of = _ClientOf(host)

    def series(of: list[str], more: list[str]) -> tuple[list, list, list]:
        """The lines of one series that name a client: clients, more, values."""
        clients = list(map(client_of.__getitem__, compress(of, of)))
        values = list(map(int, map(float, compress(value, of))))
        extra = list(compress(more, of))
        if None in clients:
            known = list(map(operator.is_not, clients, repeat(None)))
            clients, extra, values = (
                list(compress(c, known)) for c in (clients, extra, values)
            )
        return clients, extra, values

    if any(code):  # per-code totals are not the total
        total_of = [t if not c else "" for t, c in zip(total_of, code, strict=True)]
    clients, _, values = series(total_of, total_of)
    totals = dict(zip(clients, values, strict=True))
    clients, _, values = series(count_of, count_of)
    counts = dict(zip(clients, values, strict=True))
    classes: dict[str, dict[str, int]] = collections.defaultdict(dict)
    clients, names, values = series(class_of, code_class)
    for client, first, last in _runs(clients):
        classes[client].update(zip(names[first:last], values[first:last], strict=True))
    buckets: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
    clients, bounds, values = series(bucket_of, le)
    pairs = list(zip(map(float, bounds), values, strict=True))
    for client, first, last in _runs(clients):
        buckets[client].extend(pairs[first:last])
    return totals, classes, buckets, counts


def _runs(clients: list[str]) -> list[tuple[str, int, int]]:
    """``(client, first, last)`` of each run of equal neighbours in ``clients``:
    Envoy writes the lines of one cluster next to each other."""
    changes = map(operator.ne, clients[1:], clients[:-1])
    starts = [0, *compress(range(1, len(clients)), changes), len(clients)]
    return [
        (clients[first], first, last)
        for first, last in zip(starts, starts[1:], strict=False)
        if first < last
    ]


def _any_lines(text: str, host: str) -> _Series:
    """The four series from lines of any shape, each line's labels parsed."""
    totals: dict[str, int] = {}
    classes: dict[str, dict[str, int]] = collections.defaultdict(dict)
    buckets: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
    counts: dict[str, int] = {}
    client_of = _ClientOf(host)
    for line in text.split("\n"):
        if not line.startswith(_PREFIX):
            continue
        sample = _sample(line)
        if sample is None:
            continue
        name, labels, value_text = sample
        client = client_of[labels.get("envoy_cluster_name", "")]
        if client is None:
            continue
        value = int(float(value_text))
        if name == _TOTAL:
            if "envoy_response_code" not in labels:
                totals[client] = value
        elif name == _CLASS:
            classes[client][labels.get("envoy_response_code_class", "")] = value
        elif name == _BUCKET:
            buckets[client].append((float(labels["le"]), value))
        else:
            counts[client] = value
    return totals, classes, buckets, counts


def _sample(line: str) -> tuple[str, dict[str, str], str] | None:
    """One sample line of the four series read: name, labels, value; or None.

    Envoy's own lines (``name{k="v",...} 12``) are split with string methods;
    any other shape goes through :data:`_SAMPLE` and :data:`_LABEL`.
    """
    name, brace, rest = line.partition("{")
    if brace and name in _SERIES:
        label_text, close, tail = rest.partition("}")
        value_text = tail[1:]
        if close and tail[:1] == " " and value_text.isascii() and value_text.isdigit():
            labels = _labels(label_text)
            if labels is not None:
                return name, labels, value_text
    found = _SAMPLE.match(line)
    if found is None:
        return None
    name, label_text, value_text = found.groups()
    return name, dict(_LABEL.findall(label_text)), value_text


def _labels(text: str) -> dict[str, str] | None:
    """``k="v",...`` without escapes as a dict; None for any other shape."""
    if "\\" in text or text[-1:] != '"':
        return None
    labels = {}
    for pair in text[:-1].split('",'):
        key, equals, value = pair.partition('="')
        if not equals or '"' in value or not (key.isascii() and key.isidentifier()):
            return None
        labels[key] = value
    return labels


class _ClientOf(dict):
    """The client of each cluster name, worked out once per name."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def __missing__(self, cluster: str) -> str | None:
        client = self[cluster] = _client_of(cluster, self.host)
        return client


def _client_of(cluster: str, host: str) -> str | None:
    """The subset (client id) of an outbound cluster of ``host``, or None."""
    parts = cluster.split("|")
    if len(parts) != 4 or parts[0] != "outbound" or parts[3] != host:
        return None
    if parts[1] != str(protocol.SERVICE_PORT) or not parts[2]:
        return None
    return parts[2]


# --------------------------------------------------------------------- windows


def served_by(older: Snapshot, newer: Snapshot) -> dict[str, int]:
    """Upstream requests per client between two snapshots (clients with > 0)."""
    served = {}
    for client, counters in newer.clients.items():
        before = older.clients.get(client, ClientCounters())
        requests = _delta(before.requests_total, counters.requests_total)
        if requests > 0:
            served[client] = requests
    return served


def window(
    older: Snapshot,
    newer: Snapshot,
    failing_ratio: float = DEFAULT_FAILING_RATIO,
) -> dict[str, ClientTelemetry]:
    """Per-client telemetry between two snapshots, for every client in ``newer``.

    A counter lower in ``newer`` was reset (its cluster was recreated): like
    Prometheus, the newer value is taken as the increase.  The error ratio is the
    share of 5xx among completed responses.  A client that completed no response
    is UNOBSERVED and carries no numbers.
    """
    duration_s = newer.taken_at - older.taken_at
    empty = ClientCounters()
    before = older.clients.get
    with bulk.paused():
        return {
            client: _telemetry(
                client, before(client, empty), counters, duration_s, failing_ratio
            )
            for client, counters in sorted(newer.clients.items())
        }


def _telemetry(
    client: str,
    before: ClientCounters,
    after: ClientCounters,
    duration_s: float,
    failing_ratio: float,
) -> ClientTelemetry:
    """One client's telemetry from its counters at both ends of a window."""
    requests = _delta(before.requests_total, after.requests_total)
    old = before.responses_by_class
    responses = {
        code_class: _delta(old.get(code_class, 0), count)
        for code_class, count in after.responses_by_class.items()
    }
    completed = sum(responses.values())
    if completed == 0:
        return ClientTelemetry(client=client, state=ClientState.UNOBSERVED)

    error_ratio = responses.get("5", 0) / completed
    buckets = sorted(_bucket_increase(before, after))
    state = (
        ClientState.FAILING if error_ratio >= failing_ratio else ClientState.OBSERVED
    )
    return ClientTelemetry(
        client=client,
        state=state,
        requests=requests,
        requests_per_s=requests / duration_s if duration_s > 0 else None,
        error_ratio=error_ratio,
        latency_p50_ms=_sorted_quantile(0.5, buckets),
        latency_p95_ms=_sorted_quantile(0.95, buckets),
    )


def _delta(before: int, after: int) -> int:
    """A counter's increase; a counter that went down was reset."""
    return after - before if after >= before else after


def _bucket_increase(
    before: ClientCounters, after: ClientCounters
) -> list[tuple[float, int]]:
    """Cumulative bucket increases; the newer buckets whole after a reset."""
    if after.latency_count < before.latency_count:
        return list(after.latency_buckets)
    old = dict(before.latency_buckets)
    increase = []
    for bound, count in after.latency_buckets:
        previous = old.get(bound, 0)
        if count < previous:
            return list(after.latency_buckets)
        increase.append((bound, count - previous))
    return increase


def histogram_quantile(q: float, buckets: list[tuple[float, int]]) -> float | None:
    """The ``q`` quantile of cumulative ``(upper bound, count)`` buckets.

    Linear interpolation inside the bucket that holds the rank, the first bucket
    starting at 0, as Prometheus' ``histogram_quantile`` does; a rank in the
    infinite bucket gives the highest finite bound.  None without observations.
    """
    return _sorted_quantile(q, sorted(buckets))


def _sorted_quantile(q: float, buckets: list[tuple[float, int]]) -> float | None:
    """:func:`histogram_quantile` of buckets already sorted by bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound


# ---------------------------------------------------------------------- source


class EnvoyStatsSource:
    """Reads a local Envoy's statistics and keeps recent snapshots.

    Every :meth:`snapshot` is kept for ``keep_s`` seconds, so :meth:`read` can
    answer for any window up to that long.
    """

    def __init__(
        self,
        admin_url: str,
        host: str = protocol.SERVICE_HOST,
        *,
        failing_ratio: float = DEFAULT_FAILING_RATIO,
        keep_s: float = 900.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.admin_url = admin_url.rstrip("/")
        self.host = host
        self.failing_ratio = failing_ratio
        self.keep_s = keep_s
        self.timeout_s = timeout_s
        self._history: collections.deque[Snapshot] = collections.deque()
        # One client for every read: building one loads the TLS trust store.
        self._http = httpx.Client(timeout=timeout_s)

    def snapshot(self) -> Snapshot:
        """Read every client's counters now, and remember them."""
        text = self._fetch()
        taken = Snapshot(
            taken_at=time.monotonic(), clients=parse_prometheus(text, self.host)
        )
        self._history.append(taken)
        while (
            self._history and taken.taken_at - self._history[0].taken_at > self.keep_s
        ):
            self._history.popleft()
        return taken

    def read(self, window_s: float) -> dict[str, ClientTelemetry]:
        """Telemetry from the oldest kept snapshot within ``window_s`` until now.

        Takes a snapshot now.  When no kept snapshot is that recent (reads further
        apart than ``window_s``) the latest older one starts the window, so the
        window is longer than asked and rates use its true duration.  On the first
        call there is nothing to compare: every client is UNOBSERVED.
        """
        history = list(self._history)
        newer = self.snapshot()
        recent = [s for s in history if newer.taken_at - s.taken_at <= window_s]
        older = recent[0] if recent else (history[-1] if history else newer)
        return window(older, newer, self.failing_ratio)

    def window(self, older: Snapshot, newer: Snapshot) -> dict[str, ClientTelemetry]:
        """:func:`window` with this source's failing ratio."""
        return window(older, newer, self.failing_ratio)

    def served_by(self, older: Snapshot, newer: Snapshot) -> dict[str, int]:
        """:func:`served_by`: upstream requests per client between two snapshots."""
        return served_by(older, newer)

    def close(self) -> None:
        """Close the HTTP connection to Envoy's admin interface."""
        self._http.close()

    def _fetch(self) -> str:
        """Envoy's per-cluster statistics in Prometheus text format."""
        url = f"{self.admin_url}/stats/prometheus"
        try:
            response = self._http.get(url, params={"filter": _STATS_FILTER})
            response.raise_for_status()
        except httpx.HTTPError as error:
            raise EnvoyStatsError(
                f"cannot read Envoy statistics at {url}: {error}; "
                "no telemetry this cycle, the routes stay as they are"
            ) from error
        return response.text
