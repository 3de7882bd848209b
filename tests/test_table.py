"""Telemetry as columns: a table reads as the mapping of rows it stands for."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meshctl import table
from meshctl.table import TelemetryTable
from meshctl.telemetry.prometheus import PrometheusTelemetry
from meshctl.types import ClientState, ClientTelemetry

ROWS = {
    "c-00": ClientTelemetry(
        "c-00", ClientState.OBSERVED, 12, 0.2, 0.0, 40.0, 90.0, ejections=0
    ),
    "c-01": ClientTelemetry("c-01", ClientState.UNOBSERVED),
    "c-02": ClientTelemetry("c-02", ClientState.FAILING, 5, 0.1, 0.8, ejections=3),
}


def test_a_table_of_rows_gives_back_the_same_rows() -> None:
    found = TelemetryTable.of(ROWS)

    assert found == ROWS
    assert list(found) == list(ROWS)
    assert found["c-02"].ejections == 3 and isinstance(found["c-02"].ejections, int)
    assert "c-09" not in found and found.get("c-09") is None


def test_no_data_is_nan_in_a_column_and_none_in_a_row() -> None:
    found = TelemetryTable.of(ROWS)

    assert math.isnan(found.figure("latency_p95_ms")[1])
    assert found["c-01"].latency_p95_ms is None
    assert found["c-01"].ejections is None
    assert found.state.tolist() == [table.OBSERVED, table.UNOBSERVED, table.FAILING]


def test_a_figure_the_table_does_not_hold_is_unknown_for_every_client() -> None:
    found = TelemetryTable.of(ROWS)

    assert np.isnan(found.figure("train_loss")).all()


def test_rows_of_names_each_clients_row_and_minus_one_for_a_stranger() -> None:
    found = TelemetryTable.of(ROWS)

    assert found.rows_of(["c-02", "c-09", "c-00"]).tolist() == [2, -1, 0]
    assert found.rows_of(list(ROWS)).tolist() == [0, 1, 2]


def test_the_columns_cannot_be_changed_behind_the_tables_back() -> None:
    state = np.array([table.OBSERVED], dtype=np.int8)
    found = TelemetryTable(
        ["c-00"], state=state, requests=[3], figures={"error_ratio": [0.5]}
    )
    state[0] = table.FAILING  # the caller's own array

    assert found["c-00"].state is ClientState.OBSERVED
    with pytest.raises(ValueError, match="read-only"):
        found.requests[0] = 7


def test_rows_take_the_type_of_their_source() -> None:
    found = TelemetryTable(
        ["c-00"],
        state=[table.OBSERVED],
        requests=[3],
        figures={"train_loss": [0.25], "error_ratio": [0.0]},
        row_type=PrometheusTelemetry,
    )

    assert found["c-00"] == PrometheusTelemetry(
        "c-00", ClientState.OBSERVED, 3, error_ratio=0.0, train_loss=0.25
    )


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        pytest.param(
            {"state": [0, 0], "requests": [1], "figures": {}},
            "column requests holds",
            id="short-column",
        ),
        pytest.param(
            {"state": [0], "requests": [1], "figures": {"train_loss": [1.0]}},
            "ClientTelemetry has no field train_loss",
            id="figure-of-another-source",
        ),
    ],
)
def test_a_malformed_table_names_its_column(kwargs, says) -> None:
    clients = ["c-00"] if len(kwargs["state"]) == 1 else ["c-00", "c-01"]
    with pytest.raises(ValueError, match=says):
        TelemetryTable(clients, **kwargs)


def test_a_client_not_in_the_table_is_unobserved_with_no_figures() -> None:
    found = TelemetryTable.of(ROWS)

    states = found.state_of(["c-02", "c-09"]).tolist()
    p95 = found.figure_of("latency_p95_ms", ["c-00", "c-09"]).tolist()

    assert states == [table.FAILING, table.UNOBSERVED]
    assert p95[0] == 90.0 and math.isnan(p95[1])
