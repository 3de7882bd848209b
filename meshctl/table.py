"""Telemetry of many clients as columns, read as a mapping of client to row.

A telemetry source that reads a hundred thousand clients builds one array per
figure rather than an object per client, and a policy that scores them all
works on the arrays.  Everything else reads the same table as
``{client: ClientTelemetry}``: a row becomes an object only when it is looked
up.  A figure unknown for a client is NaN in its column and None in its row, so
no data never becomes a number on either side.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any

import numpy as np

from meshctl.types import ClientState, ClientTelemetry

# A client's state in the ``state`` column is its position in this tuple.
STATES: tuple[ClientState, ...] = tuple(ClientState)
OBSERVED = STATES.index(ClientState.OBSERVED)
UNOBSERVED = STATES.index(ClientState.UNOBSERVED)
FAILING = STATES.index(ClientState.FAILING)

# The optional figures of every ClientTelemetry, and those that are whole numbers.
FIGURES = ("requests_per_s", "error_ratio", "latency_p50_ms", "latency_p95_ms")
COUNTS = ("ejections",)


class TelemetryTable(Mapping[str, ClientTelemetry]):
    """Every client's telemetry over one window: one array per figure.

    ``state`` holds positions in :data:`STATES`, ``requests`` whole request
    counts, and ``figures`` one float array per optional field of
    ``row_type`` (NaN where unknown); a figure named in ``counts`` is a whole
    number in its rows.  The arrays are read-only: a table is a value.
    """

    def __init__(
        self,
        clients: Sequence[str],
        *,
        state: np.ndarray,
        requests: np.ndarray,
        figures: Mapping[str, np.ndarray],
        row_type: type[ClientTelemetry] = ClientTelemetry,
        counts: Sequence[str] = COUNTS,
    ) -> None:
        n = len(clients)
        self.clients: tuple[str, ...] = tuple(clients)
        self.state = _frozen(state, np.int8, n, "state")
        self.requests = _frozen(requests, np.int64, n, "requests")
        self.figures = {
            name: _frozen(values, np.float64, n, name)
            for name, values in figures.items()
        }
        unknown = set(self.figures) - {f.name for f in fields(row_type)}
        if unknown:
            raise ValueError(
                f"{row_type.__name__} has no field {', '.join(sorted(unknown))}"
            )
        self.row_type = row_type
        self._counts = frozenset(counts)
        self._index: dict[str, int] | None = None

    @classmethod
    def of(cls, telemetry: Mapping[str, ClientTelemetry]) -> TelemetryTable:
        """``telemetry`` as a table: itself if it is one, else built from its rows.

        A table built from rows holds the figures of :class:`ClientTelemetry`;
        fields that only a subclass has are left out.
        """
        if isinstance(telemetry, TelemetryTable):
            return telemetry
        rows = list(telemetry.values())
        figures = {
            name: np.array(
                [_number(getattr(row, name)) for row in rows], dtype=np.float64
            )
            for name in (*FIGURES, *COUNTS)
        }
        return cls(
            list(telemetry),
            state=np.array([STATES.index(r.state) for r in rows], dtype=np.int8),
            requests=np.array([r.requests for r in rows], dtype=np.int64),
            figures=figures,
        )

    # -- columns

    @property
    def index(self) -> Mapping[str, int]:
        """Each client's row number."""
        if self._index is None:
            self._index = {client: i for i, client in enumerate(self.clients)}
        return self._index

    def figure(self, name: str) -> np.ndarray:
        """The column of ``name``, all NaN when this table does not hold it."""
        found = self.figures.get(name)
        if found is None:
            found = _frozen(np.full(len(self), np.nan), np.float64, len(self), name)
        return found

    def rows_of(self, clients: Sequence[str]) -> np.ndarray:
        """The row number of each of ``clients``, -1 for a client not in the table."""
        if list(clients) == list(self.clients):
            return np.arange(len(self.clients), dtype=np.intp)
        get = self.index.get
        return np.fromiter((get(c, -1) for c in clients), np.intp, len(clients))

    def state_of(self, clients: Sequence[str]) -> np.ndarray:
        """The state of each of ``clients``; UNOBSERVED for one not in the table."""
        rows = self.rows_of(clients)
        states = np.full(len(rows), UNOBSERVED, dtype=np.int8)
        states[rows >= 0] = self.state[rows[rows >= 0]]
        return states

    def figure_of(self, name: str, clients: Sequence[str]) -> np.ndarray:
        """The figure ``name`` of each of ``clients``; NaN for one not in the table."""
        rows = self.rows_of(clients)
        values = np.full(len(rows), np.nan)
        values[rows >= 0] = self.figure(name)[rows[rows >= 0]]
        return values

    # -- the mapping

    def __getitem__(self, client: str) -> ClientTelemetry:
        return self.row(self.index[client])

    def __contains__(self, client: object) -> bool:
        return client in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.clients)

    def __len__(self) -> int:
        return len(self.clients)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} clients of "
            f"{self.row_type.__name__}, figures {', '.join(self.figures)})"
        )

    def row(self, i: int) -> ClientTelemetry:
        """Row ``i`` as a ``row_type``, NaN figures as None."""
        values: dict[str, Any] = {}
        for name, column in self.figures.items():
            value = float(column[i])
            if value != value:  # NaN: unknown
                values[name] = None
            elif name in self._counts:
                values[name] = int(value)
            else:
                values[name] = value
        return self.row_type(
            client=self.clients[i],
            state=STATES[self.state[i]],
            requests=int(self.requests[i]),
            **values,
        )


def _frozen(values: Any, dtype: type, n: int, name: str) -> np.ndarray:
    """``values`` as a read-only array of ``n`` elements of ``dtype``."""
    array = np.array(values, dtype=dtype)
    if array.shape != (n,):
        raise ValueError(f"column {name} holds {array.shape}, not ({n},)")
    array.flags.writeable = False
    return array


def _number(value: float | int | None) -> float:
    return np.nan if value is None else float(value)
