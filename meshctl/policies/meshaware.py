"""``mesh``: meshctl's own policy, driven by what the mesh sees of each client.

The mesh measures every request a client serves, the server reports every
round a client trains.  The policy keeps, per client:

- latency and error ratio as **level and trend** (Holt's linear smoothing),
  updated only from telemetry windows in which the mesh saw the client serve
  requests: a window without traffic leaves both as they were (no data is not
  zero).  The score uses the one-round-ahead forecast, level plus trend, so a
  client that is getting slower or failing more loses rank before its average
  says so;
- outlier ejections: a client that Envoy's outlier detection ejected in the
  window rests for ``ejection_cooldown_rounds`` rounds;
- failures the server saw (error or timeout) as a smoothed failure ratio, which
  also covers what the mesh cannot see (a reply that timed out client-side or
  failed the update checks);
- Oort's statistical utility of its last update, ``|B| * |mean loss|``.

The score of a measured client is

    (utility + staleness) ** w * speed * reliability * stickiness

- utility: relative to the best known; a client with no update yet gets the
  median of the known ones, neither rewarded nor punished;
- staleness: Oort's bonus ``sqrt(s * ln(round) / last round chosen)``, so
  that a client whose data the model has not seen for a while comes back;
- speed: a round lasts as long as its slowest client, so a client that
  finishes before the round's straggler costs nothing.  The expected
  straggler ``T`` is the ``k / (k + 1)`` quantile of the latency forecasts
  (the expected slowest of ``k`` clients drawn from them); speed is 1 up to
  ``T``, then ``(T / forecast) ** alpha``, Oort's deadline penalty;
- reliability: ``(1 - max(forecast error ratio, failure ratio)) ** 2``;
- stickiness: ``1 + hysteresis`` for the clients of the last round, so that a
  near tie does not move routes (the routing layer damps flapping again).

Each round: clients above ``max_error_ratio`` or ejected are filtered out
(refilled from the least bad ones if too few remain); a share ``exploration``
of the slots goes to clients never measured; one slot goes to a client idle
for more than ``max_idle_rounds`` (the participation floor, which is also how a
client that recovered gets measured again); a client that, chosen again, would
take part in more than ``max_share`` of the last ``share_window_rounds``
rounds rests (FedAvg on non-IID data needs every client's data, not the same
fast few); the rest go to the best scores.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from meshctl import table
from meshctl.policies import signals
from meshctl.policies.base import Selection, SelectionInput
from meshctl.table import TelemetryTable
from meshctl.types import SlotOutcome


@dataclass(frozen=True)
class MeshSettings:
    """The mesh policy's knobs and their defaults."""

    exploration: float = 0.2
    smoothing: float = 0.5  # level
    trend_smoothing: float = 0.3  # trend
    latency_penalty: float = 2.0  # alpha
    reliability_exponent: float = 2.0
    utility_weight: float = 1.0  # w
    max_error_ratio: float = 0.5
    exclude_ejected: bool = True
    ejection_cooldown_rounds: int = 2
    max_idle_rounds: int | None = 10
    max_share: float = 0.5
    share_window_rounds: int = 4
    staleness: float = 0.1  # s, Oort's staleness weight
    hysteresis: float = 0.15
    deadline_ms: float | None = None


def _floats() -> np.ndarray:
    return np.zeros(0, dtype=np.float64)


def _rounds() -> np.ndarray:
    return np.zeros(0, dtype=np.int64)


@dataclass(eq=False)
class Estimates:
    """What the policy has learnt of each client: one row per client.

    The levels, the failure ratio and the utility are NaN until measured (no
    data is not zero); a trend starts at 0.  ``chosen`` holds the clients of
    the last rounds, by round, for the share of recent rounds.
    """

    clients: list[str] = field(default_factory=list)
    latency_level: np.ndarray = field(default_factory=_floats)
    latency_trend: np.ndarray = field(default_factory=_floats)
    error_level: np.ndarray = field(default_factory=_floats)
    error_trend: np.ndarray = field(default_factory=_floats)
    failure_ratio: np.ndarray = field(default_factory=_floats)
    utility: np.ndarray = field(default_factory=_floats)
    heard_round: np.ndarray = field(default_factory=_rounds)  # last feedback folded in
    selected_round: np.ndarray = field(default_factory=_rounds)  # last round chosen
    rested_until: np.ndarray = field(default_factory=_rounds)
    chosen: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.clients)
        for name in _COLUMNS:
            column = getattr(self, name)
            if not isinstance(column, np.ndarray) or column.shape != (n,):
                raise ValueError(f"{name} must hold one value per client ({n})")
            if column.dtype != _dtype(name):
                raise ValueError(f"{name} must hold {_dtype(name)}, not {column.dtype}")
        self._index = {client: i for i, client in enumerate(self.clients)}
        if len(self._index) != n:
            raise ValueError("clients must not repeat")
        if not all(
            type(r) is int and isinstance(c, tuple) for r, c in self.chosen.items()
        ):
            raise ValueError("chosen must map rounds to tuples of clients")
        strangers = {c for clients in self.chosen.values() for c in clients}
        if strangers - self._index.keys():
            raise ValueError("chosen names clients without estimates")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Estimates):
            return NotImplemented
        return (
            self.clients == other.clients
            and self.chosen == other.chosen
            and all(
                np.array_equal(getattr(self, n), getattr(other, n), equal_nan=True)
                for n in _COLUMNS
            )
        )

    def add(self, clients: Sequence[str]) -> None:
        """Rows for those of ``clients`` not known yet, unmeasured."""
        new = [c for c in dict.fromkeys(clients) if c not in self._index]
        if not new:
            return
        for client in new:
            self._index[client] = len(self.clients)
            self.clients.append(client)
        for name in _COLUMNS:
            column = getattr(self, name)
            fill = np.full(len(new), np.nan if name in _UNKNOWN else 0, column.dtype)
            setattr(self, name, np.append(column, fill))

    def rows(self, clients: Sequence[str]) -> np.ndarray:
        """The row of each of ``clients``, all of them known."""
        return np.fromiter(map(self._index.__getitem__, clients), np.intp, len(clients))

    def row(self, client: str) -> int:
        return self._index[client]

    def measured(self) -> np.ndarray:
        """Whether anything was ever measured of each client."""
        return ~(
            np.isnan(self.latency_level)
            & np.isnan(self.error_level)
            & np.isnan(self.failure_ratio)
        )

    def latency_forecast(self, low: float = 0.0) -> np.ndarray:
        """Level plus trend, at least ``low``; NaN where never measured."""
        return np.maximum(low, self.latency_level + self.latency_trend)

    def unreliability(self) -> np.ndarray:
        """The larger of the forecast error ratio and the failure ratio, in [0, 1]."""
        error = np.clip(self.error_level + self.error_trend, 0.0, 1.0)
        error = np.where(np.isnan(error), 0.0, error)
        failure = np.where(np.isnan(self.failure_ratio), 0.0, self.failure_ratio)
        return np.minimum(1.0, np.maximum(error, failure))


_COLUMNS = (
    "latency_level",
    "latency_trend",
    "error_level",
    "error_trend",
    "failure_ratio",
    "utility",
    "heard_round",
    "selected_round",
    "rested_until",
)
_UNKNOWN = ("latency_level", "error_level", "failure_ratio", "utility")
_ROUNDS = ("heard_round", "selected_round", "rested_until")


def _dtype(column: str) -> np.dtype:
    return np.dtype(np.int64 if column in _ROUNDS else np.float64)


def smooth(
    level: np.ndarray,
    trend: np.ndarray,
    rows: np.ndarray,
    values: np.ndarray,
    alpha: float,
    beta: float,
) -> None:
    """Holt's linear smoothing of ``values`` into the ``rows`` of a level and a
    trend, in place; a level never measured starts at its value."""
    fresh = np.isnan(level[rows])
    level[rows[fresh]] = values[fresh]
    rows, values = rows[~fresh], values[~fresh]
    previous = level[rows]
    updated = alpha * values + (1 - alpha) * (previous + trend[rows])
    trend[rows] = beta * (updated - previous) + (1 - beta) * trend[rows]
    level[rows] = updated


class MeshPolicy:
    """Prefers fast, reliable, useful clients; explores, rests and probes."""

    name = "mesh"

    def __init__(self, settings: MeshSettings | None = None) -> None:
        self.settings = settings or MeshSettings()
        self._estimates = Estimates()
        self._last: tuple[str, ...] = ()

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        server_round = given.server_round
        self._observe(given)
        k = min(given.per_round, len(given.candidates))
        candidates = list(given.candidates)
        rows = self._estimates.rows(candidates)
        measured = self._estimates.measured()[rows]
        flags = measured.tolist()
        scored = [c for c, m in zip(candidates, flags, strict=True) if m]
        unmeasured = [c for c, m in zip(candidates, flags, strict=True) if not m]
        scored_rows = rows[measured]
        values = self._scores(scored_rows, server_round, k)
        scores = dict(zip(scored, values.tolist(), strict=True))
        chosen: list[str] = []
        reasons: dict[str, str] = {}

        # Exploration first, so that never-measured clients get a chance.
        explore = min(len(unmeasured), max(1, round(self.settings.exploration * k)))
        explore = max(explore, min(len(unmeasured), k - len(scores)))
        for client in rng.sample(unmeasured, explore):
            chosen.append(client)
            reasons[client] = "explore: never measured"

        # The participation floor: the longest idle client, if idle long enough.
        probe = self._idle(server_round, scored_rows, values)
        if probe is not None and len(chosen) < k:
            client = scored[probe]
            chosen.append(client)
            idle = server_round - int(
                self._estimates.selected_round[scored_rows[probe]]
            )
            reasons[client] = f"fairness: idle for {idle} rounds"

        # The best scores among the clients that pass the filters, then
        # unmeasured clients rather than rested ones: a client that just
        # failed is a worse bet than one nobody has tried.  At most k
        # eligible clients are looked at (each either taken or already
        # chosen), so the first k of the ranking are enough.
        rested = self._rested(server_round, scored_rows)
        eligible, held = np.flatnonzero(~rested), np.flatnonzero(rested)
        randoms = np.array([rng.random() for _ in range(len(eligible))])
        ranked = [
            scored[i] for i in eligible[best_positions(values[eligible], randoms, k)]
        ]
        taken = set(chosen)
        untried = [c for c in unmeasured if c not in taken]
        ranked += rng.sample(untried, len(untried))
        randoms = np.array([rng.random() for _ in range(len(held))])
        ranked += [scored[i] for i in held[np.lexsort((randoms, -values[held]))]]
        filtered = {scored[i] for i in held}
        for client in ranked:
            if len(chosen) >= k:
                break
            if client in taken:
                continue
            chosen.append(client)
            taken.add(client)
            reasons[client] = _reason(client, scores, filtered)
        self._remember(server_round, chosen)
        return Selection(clients=tuple(chosen), scores=scores, reasons=reasons)

    # -- estimates ------------------------------------------------------------

    def _observe(self, given: SelectionInput) -> None:
        estimates = self._estimates
        estimates.add([*given.candidates, *given.history, *self._last])
        self._observe_mesh(
            given.server_round,
            TelemetryTable.of(given.telemetry),
            {*given.candidates, *given.history},
        )
        rows = estimates.rows(list(given.history))
        heard_rounds = estimates.heard_round[rows].tolist()
        for (client, feedback), row, heard in zip(
            given.history.items(), rows.tolist(), heard_rounds, strict=True
        ):
            if not feedback or feedback[-1].outcome.server_round <= heard:
                continue  # nothing new since the last round folded in
            for outcome in signals.outcomes_after(given.history, client, heard):
                self._observe_outcome(row, outcome)

    def _observe_mesh(
        self, server_round: int, telemetry: TelemetryTable, clients: set[str]
    ) -> None:
        """Fold the window into the estimates of ``clients`` that served requests
        in it: a window without traffic leaves an estimate as it was."""
        estimates, settings = self._estimates, self.settings
        names = telemetry.clients
        served = (
            np.fromiter((c in clients for c in names), bool, len(names))
            & (telemetry.state != table.UNOBSERVED)
            & (telemetry.requests > 0)
        )
        at = np.flatnonzero(served)
        rows = estimates.rows([names[i] for i in at])
        alpha, beta = settings.smoothing, settings.trend_smoothing
        for level, trend, figure in (
            (estimates.latency_level, estimates.latency_trend, "latency_p95_ms"),
            (estimates.error_level, estimates.error_trend, "error_ratio"),
        ):
            values = telemetry.figure(figure)[at]
            finite = np.isfinite(values)
            smooth(level, trend, rows[finite], values[finite], alpha, beta)
        if settings.exclude_ejected:
            ejections = telemetry.figure("ejections")[at]
            ejected = rows[~np.isnan(ejections) & (ejections != 0)]
            estimates.rested_until[ejected] = np.maximum(
                estimates.rested_until[ejected],
                server_round + settings.ejection_cooldown_rounds,
            )

    def _observe_outcome(self, row: int, outcome: SlotOutcome) -> None:
        estimates, settings = self._estimates, self.settings
        estimates.heard_round[row] = max(
            int(estimates.heard_round[row]), outcome.server_round
        )
        if outcome.status == "lost":
            return  # the mesh failed, not the client: nothing to learn of it
        failed = 0.0 if outcome.status == "ok" else 1.0
        previous = float(estimates.failure_ratio[row])
        if math.isnan(previous):
            estimates.failure_ratio[row] = failed
        else:
            alpha = settings.smoothing
            estimates.failure_ratio[row] = alpha * failed + (1 - alpha) * previous
        if outcome.status == "timeout":
            # A late client took at least as long as the server waited for it,
            # and at least the configured deadline.
            waited_ms = max(outcome.duration_s * 1000, settings.deadline_ms or 0)
            smooth(
                estimates.latency_level,
                estimates.latency_trend,
                np.array([row]),
                np.array([waited_ms], dtype=np.float64),
                settings.smoothing,
                settings.trend_smoothing,
            )
        utility = signals.statistical_utility(outcome)
        if utility is not None:
            estimates.utility[row] = utility

    # -- scores ---------------------------------------------------------------

    def _scores(
        self, rows: np.ndarray, server_round: int, per_round: int
    ) -> np.ndarray:
        """The score of each of the measured clients in ``rows``; see the
        module's docstring."""
        estimates, settings = self._estimates, self.settings
        level = estimates.latency_level[rows]
        latency_ms = estimates.latency_forecast(low=1e-3)[rows]
        known_latency = ~np.isnan(level) & (level != 0)
        straggler_ms = _quantile(
            estimates.latency_forecast()[rows][known_latency],
            per_round / (per_round + 1),
        )
        utility = estimates.utility[rows]
        known = utility[~np.isnan(utility) & (utility != 0)]
        best = float(known.max()) if len(known) else None
        unknown = float(np.median(known / best)) if best else 1.0

        with np.errstate(all="ignore"):
            if best:
                utility = np.where(np.isnan(utility), unknown, utility / best)
            else:
                utility = np.full(len(rows), unknown)
            # Oort's staleness bonus, sqrt(s * ln(round) / last round chosen).
            utility = utility + np.sqrt(
                settings.staleness
                * math.log(max(1, server_round))
                / np.maximum(1, estimates.selected_round[rows])
            )
            speed = np.ones(len(rows))
            if straggler_ms:
                slow = latency_ms > straggler_ms
                speed[slow] = (straggler_ms / latency_ms[slow]) ** (
                    settings.latency_penalty
                )
            reliability = (1.0 - estimates.unreliability()[rows]) ** (
                settings.reliability_exponent
            )
            last = np.zeros(len(estimates.clients), dtype=bool)
            last[estimates.rows(self._last)] = True
            sticky = np.where(last[rows], 1.0 + settings.hysteresis, 1.0)
            return utility**settings.utility_weight * speed * reliability * sticky

    # -- filters and fairness -------------------------------------------------

    def _rested(self, server_round: int, rows: np.ndarray) -> np.ndarray:
        """Which of the scored clients in ``rows`` rest this round: ejected
        lately, too unreliable, or with too large a share of recent rounds."""
        estimates, settings = self._estimates, self.settings
        window = settings.share_window_rounds
        recent = np.zeros(len(estimates.clients), dtype=np.int64)
        for chosen_round, clients in estimates.chosen.items():
            if server_round - window < chosen_round < server_round:
                np.add.at(recent, estimates.rows(clients), 1)
        # The client's share of the last rounds if it were chosen this round.
        share = (recent[rows] + 1) / window
        return (
            (estimates.rested_until[rows] >= server_round)
            | (estimates.unreliability()[rows] > settings.max_error_ratio)
            | (share > settings.max_share)
        )

    def _idle(
        self, server_round: int, rows: np.ndarray, scores: np.ndarray
    ) -> int | None:
        """The position in ``rows`` of the client idle the longest, if longer
        than ``max_idle_rounds`` and not resting; the best score breaks ties."""
        limit = self.settings.max_idle_rounds
        if limit is None:
            return None
        estimates = self._estimates
        idle = server_round - estimates.selected_round[rows]
        overdue = np.flatnonzero(
            (idle > limit) & (estimates.rested_until[rows] < server_round)
        )
        if not len(overdue):
            return None
        longest = overdue[idle[overdue] == idle[overdue].max()]
        best = np.where(np.isnan(scores[longest]), -np.inf, scores[longest])
        return int(longest[np.argmax(best)])

    def _remember(self, server_round: int, chosen: list[str]) -> None:
        estimates = self._estimates
        estimates.selected_round[estimates.rows(chosen)] = server_round
        estimates.chosen[server_round] = tuple(chosen)
        window = self.settings.share_window_rounds
        for old in [r for r in estimates.chosen if r <= server_round - window]:
            del estimates.chosen[old]
        self._last = tuple(chosen)


def _reason(client: str, scores: dict[str, float], filtered: set[str]) -> str:
    if client not in scores:
        return "explore: never measured, preferred to a rested client"
    if client in filtered:
        return f"score {scores[client]:.3f} (filtered, but too few others)"
    return f"score {scores[client]:.3f}"


def best_positions(scores: np.ndarray, randoms: np.ndarray, count: int) -> np.ndarray:
    """The positions of the ``count`` best scores, best first.

    The order of sorting by ``(-score, random, position)``, without sorting a
    hundred thousand clients to route ten; a score that is not a number ranks
    last.
    """
    ranks = -np.where(np.isnan(scores), -np.inf, scores)
    if count < len(scores):
        # Every position that can be among the first count, ties included.
        cut = np.partition(ranks, count - 1)[count - 1] if count > 0 else -np.inf
        among = np.flatnonzero(ranks <= cut)
    else:
        among = np.arange(len(scores))
    order = np.lexsort((among, randoms[among], ranks[among]))
    return among[order[:count]]


def first_ranked(
    scores: dict[str, float], randoms: list[float], count: int
) -> list[str]:
    """The ``count`` first clients of ``sorted(scores, key=(-score, random))``;
    see :func:`ranked_first`."""
    clients = list(scores)
    values = np.array(list(scores.values()), dtype=np.float64)
    return [clients[i] for i in best_positions(values, np.array(randoms), count)]


def _quantile(values: np.ndarray, share: float) -> float | None:
    """The ``share`` quantile of ``values``, linearly interpolated; ``None``
    when there are none."""
    if not len(values):
        return None
    ordered = np.sort(values)
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
