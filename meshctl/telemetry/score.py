"""What ``meshctl score`` prints: every client's telemetry and state.

The JSON and YAML documents are ``{"clients": [{"client", "state",
"requests_per_s", "error_ratio", "latency_p50_ms", "latency_p95_ms",
"mesh_failures_per_s", "train_loss", "train_examples", "local_train_s"}, ...],
"window_s": ...}``; a figure the window does not hold is ``null``, never a
number.  The table shows the same rows, with ``-`` for no data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import yaml

from meshctl.telemetry.prometheus import FIGURES
from meshctl.types import ClientTelemetry

OUTPUTS = ("table", "json", "yaml")
FIELDS = ("client", "state", *FIGURES)
_HEADERS = {
    "client": "CLIENT",
    "state": "STATE",
    "requests_per_s": "REQ/S",
    "error_ratio": "ERRORS",
    "latency_p50_ms": "P50 MS",
    "latency_p95_ms": "P95 MS",
    "mesh_failures_per_s": "MESH FAIL/S",
    "train_loss": "LOSS",
    "train_examples": "EXAMPLES",
    "local_train_s": "TRAIN S",
}


def rows(telemetry: Mapping[str, ClientTelemetry]) -> list[dict]:
    """One plain dict per client, sorted by client, with every field of FIELDS."""
    out = []
    for client in sorted(telemetry):
        item = telemetry[client]
        row = {name: getattr(item, name, None) for name in FIELDS}
        row["state"] = str(item.state)
        out.append(row)
    return out


def document(telemetry: Mapping[str, ClientTelemetry], window_s: float) -> dict:
    """The machine-readable answer of ``meshctl score``."""
    return {"clients": rows(telemetry), "window_s": window_s}


def render(
    telemetry: Mapping[str, ClientTelemetry], window_s: float, output: str
) -> str:
    """The answer as ``table``, ``json`` or ``yaml`` text."""
    if output == "json":
        return json.dumps(document(telemetry, window_s), indent=2, allow_nan=False)
    if output == "yaml":
        return yaml.safe_dump(document(telemetry, window_s), sort_keys=False)
    if output == "table":
        return table(rows(telemetry))
    raise ValueError(f"-o must be one of {', '.join(OUTPUTS)}, not {output!r}")


def table(items: list[dict]) -> str:
    """Rows as aligned columns in the manner of kubectl, ``-`` for no data."""
    cells = [[_HEADERS[f] for f in FIELDS]]
    cells += [[_cell(row[f]) for f in FIELDS] for row in items]
    widths = [max(len(line[i]) for line in cells) for i in range(len(FIELDS))]
    return "\n".join(
        "   ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
