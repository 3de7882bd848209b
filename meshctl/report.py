"""The demo's report: ``report.json``, ``report.md`` and plots.

``report.json`` keeps the contract users script against: per round the clients
the controller chose, the routing version, how many requests Envoy's own counters
attribute to each client, the emulated and wall-clock time, and the test metrics.
Times in ``rounds`` are cumulative since training started; the round's own
duration is in ``round_emulated_s`` and ``round_wall_s``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


@dataclass(frozen=True)
class RoundReport:
    """One round, as the report states it."""

    round: int
    selected: list[str]
    routing_version: str
    served_by: dict[str, int]
    emulated_s: float
    wall_s: float
    round_emulated_s: float
    round_wall_s: float
    routing_apply_s: float
    routing_served_s: list[float]
    metrics: dict[str, float]
    failed: dict[str, str] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)


def first_at_target(
    rounds: Sequence[RoundReport], metric: str, target: float
) -> RoundReport | None:
    """The first round whose ``metric`` reached ``target``."""
    for entry in rounds:
        value = entry.metrics.get(metric)
        if value is not None and math.isfinite(value) and value >= target:
            return entry
    return None


def time_to_target(
    rounds: Sequence[RoundReport], metric: str, target: float
) -> float | None:
    """Cumulative emulated seconds when ``metric`` first reached ``target``."""
    entry = first_at_target(rounds, metric, target)
    return entry.emulated_s if entry is not None else None


def build(
    *,
    settings: Mapping[str, object],
    rounds: Sequence[RoundReport],
    target: float,
    metric: str = "auroc",
) -> dict:
    """The report as a JSON-ready dict."""
    final = dict(rounds[-1].metrics) if rounds else {}
    reached = first_at_target(rounds, metric, target)
    return {
        **settings,
        "rounds": [asdict(r) for r in rounds],
        "final": final,
        "time_to_target": {
            "metric": metric,
            "target": target,
            "emulated_s": reached.emulated_s if reached else None,
            "wall_s": reached.wall_s if reached else None,
            "round": reached.round if reached else None,
        },
    }


def write(report: dict, out_dir: Path) -> list[Path]:
    """Write the JSON, the Markdown summary and the plots; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "report.md"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(markdown(report))
    paths.append(_plot_metric(report, out_dir / "metric_vs_time.png"))
    paths.append(_plot_selection(report, out_dir / "selection.png"))
    return paths


def markdown(report: dict) -> str:
    """A short human summary with one row per round."""
    ttt = report["time_to_target"]
    reached = (
        f"{ttt['emulated_s']:.0f} s emulated"
        if ttt["emulated_s"] is not None
        else "not reached"
    )
    lines = [
        f"# meshctl demo: {report['policy']} on {report['dataset']}",
        "",
        f"{report['clients']} clients, {report['per_round']} per round, "
        f"seed {report['seed']}.  Final: " + _metrics_text(report["final"]) + ".",
        f"Time to {ttt['metric']} >= {ttt['target']}: {reached}.",
        "",
        "| round | selected | served by Envoy | routing version | emulated s "
        "| wall s | auroc | f1 | accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rounds"]:
        served = ", ".join(f"{c}:{n}" for c, n in sorted(r["served_by"].items()))
        m = r["metrics"]
        lines.append(
            f"| {r['round']} | {', '.join(r['selected'])} | {served} "
            f"| {r['routing_version']} | {r['emulated_s']:.0f} | {r['wall_s']:.1f} "
            f"| {m.get('auroc', float('nan')):.4f} | {m.get('f1', float('nan')):.4f} "
            f"| {m.get('accuracy', float('nan')):.4f} |"
        )
    failed = [
        (r["round"], c, why) for r in report["rounds"] for c, why in r["failed"].items()
    ]
    if failed:
        lines += ["", "Failed slots:", ""]
        lines += [f"- round {n}, {client}: {why}" for n, client, why in failed]
    if "faults" in report:
        lines += ["", f"Faults injected (`--faults {report['faults']['spec']}`):", ""]
        lines += [
            f"- {e['at_s']:.1f} s, {e['fault']}: {e['what']}"
            for e in report["faults"]["events"]
        ]
    return "\n".join(lines) + "\n"


def _metrics_text(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no metrics"


def _plot_metric(report: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [r["emulated_s"] for r in report["rounds"]]
    for metric in ("auroc", "f1", "accuracy"):
        ys = [r["metrics"].get(metric) for r in report["rounds"]]
        ax.plot(xs, ys, marker="o", label=metric)
    target = report["time_to_target"]
    ax.axhline(target["target"], color="grey", linestyle=":", label="target")
    ax.set_xlabel("emulated time (s)")
    ax.set_ylabel("test metric")
    ax.set_title(f"{report['dataset']}, policy {report['policy']}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_selection(report: dict, path: Path) -> Path:
    clients = sorted(
        {c for r in report["rounds"] for c in r["selected"]}
        | set(report.get("client_ids", []))
    )
    rounds = [r["round"] for r in report["rounds"]]
    fig, ax = plt.subplots(
        figsize=(max(5, 0.4 * len(rounds) + 2), 0.3 * len(clients) + 2)
    )
    for r in report["rounds"]:
        for client in r["selected"]:
            failed = client in r.get("failed", {})
            ax.scatter(
                r["round"],
                clients.index(client),
                marker="x" if failed else "s",
                color="tab:red" if failed else "tab:blue",
                s=60,
            )
    ax.set_yticks(range(len(clients)), clients)
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_title("clients chosen per round (x: failed or late)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
