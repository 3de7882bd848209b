"""``meshctl bench``: every policy through the real local mesh, side by side.

For each scenario, each policy trains FLUIDS once through the embedded mesh
(real client processes, real Envoy, the controller routing every round), on
the same data split, the same devices and the same fault schedule: only the
policy differs.

Each scenario starts its client services once (the data split, the devices
and the fault schedule are the scenario's, not the policy's); each run brings
its own Envoy and controller, so no run sees another's routes or telemetry,
and ``wall_s`` counts a run from its Envoy's start, without the clients'.

The bench writes ``bench.json`` (the numbers), ``bench.md`` (a table with each
policy's time to the target relative to ``random`` and to the best baseline)
and one plot per scenario (the metric against emulated time, a line per
policy).  Each run's full demo report goes to ``runs/SCENARIO-POLICY.json``.

The target: an untrained autoencoder with the server's head already scores an
AUROC near 0.95 on TON_IoT, a centrally trained one about 0.986, and FedAvg
with every client healthy about 0.98 after ten rounds.  A target below 0.97
is reached by luck in the first rounds; one at 0.98 is reached late or not at
all.  0.975 lies where the policies' curves part: it takes several rounds of
useful updates, so the time it takes measures the rounds a policy lost to slow
and failing clients.  The quick bench trains fewer, smaller rounds and aims at
0.97.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from meshctl import demo, policies, report, scenarios  # noqa: E402

log = logging.getLogger("meshctl.bench")

METRIC = "auroc"
FINAL_METRICS = ("auroc", "f1", "accuracy")
POLICIES = ("random", "oort", "pyramidfl", "power-of-choice", "mesh")
REFERENCE = "random"
BASELINES = ("oort", "pyramidfl", "power-of-choice")


@dataclass(frozen=True)
class BenchSize:
    """How big each run is; the same for every policy and scenario."""

    clients: int
    per_round: int
    rounds: int
    failing_clients: int
    target: float
    time_scale: float = 0.003  # wall seconds per emulated second


FULL = BenchSize(clients=20, per_round=5, rounds=15, failing_clients=2, target=0.975)
QUICK = BenchSize(
    clients=8, per_round=3, rounds=5, failing_clients=1, target=0.97, time_scale=0.0015
)


@dataclass(frozen=True)
class BenchSettings:
    """Everything a bench depends on; ``bench.md`` repeats it."""

    scenarios: tuple[str, ...] = scenarios.NAMES
    policies: tuple[str, ...] = POLICIES
    size: BenchSize = FULL
    seed: int = 0
    data_dir: Path | None = None
    work_dir: Path | None = None

    def check(self) -> None:
        """Raise ``ValueError`` naming the option that cannot work."""
        if not self.scenarios or not self.policies:
            raise ValueError("--scenario and --policies must name at least one each")
        for name in self.scenarios:
            scenarios.get(name)
        keys = [policy_key(p) for p in self.policies]
        if len(set(keys)) != len(keys):
            raise ValueError(f"--policies names a policy twice: {', '.join(keys)}")
        self.demo_settings(self.scenarios[0], self.policies[0]).check()

    def demo_settings(self, scenario: str, policy: str) -> demo.DemoSettings:
        """The demo run of one policy under one scenario."""
        size = self.size
        work_dir = None
        if self.work_dir is not None:
            work_dir = self.work_dir / f"{scenario}-{policy_key(policy)}"
        return demo.DemoSettings(
            clients=size.clients,
            per_round=size.per_round,
            rounds=size.rounds,
            policy=policy,
            seed=self.seed,
            data_dir=self.data_dir,
            work_dir=work_dir,
            time_scale=size.time_scale,
            failing_clients=size.failing_clients,
            target=size.target,
            scenario=scenario,
        )


def policy_key(policy: str) -> str:
    """The name a policy goes by in the bench: its name, or its document's."""
    _, document = policies.resolve(policy)
    return document.name if document is not None else policy


@dataclass
class BenchResult:
    """The bench's numbers and every run's demo report, by scenario and policy."""

    settings: BenchSettings
    bench: dict = field(default_factory=lambda: {"scenarios": {}})
    reports: dict[str, dict[str, dict]] = field(default_factory=dict)


def run(
    settings: BenchSettings,
    on_round: Callable[[str, str, report.RoundReport], None] = lambda *args: None,
    on_run: Callable[[BenchResult], None] = lambda result: None,
) -> BenchResult:
    """Run every policy under every scenario, one fresh mesh per run.

    ``on_run`` sees the result after each run, so that a bench stopped halfway
    still leaves the runs it finished.
    """
    settings.check()
    result = BenchResult(settings)
    for scenario in settings.scenarios:
        entry = {
            "target": {"metric": METRIC, "value": settings.size.target},
            "policies": {},
        }
        result.bench["scenarios"][scenario] = entry
        result.reports[scenario] = {}
        with contextlib.ExitStack() as stack:
            pool = _start_pool(stack, settings, scenario)
            for policy in settings.policies:
                _run_one(result, settings, scenario, policy, pool, on_round)
                on_run(result)
    return result


def _start_pool(
    stack: contextlib.ExitStack, settings: BenchSettings, scenario: str
) -> demo.ClientPool:
    """The scenario's client services, shared by every policy's run."""
    stack.enter_context(demo.terminate_as_interrupt())
    if settings.work_dir is not None:
        pool_dir = settings.work_dir / f"{scenario}-clients"
    else:
        pool_dir = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="meshctl-bench-"))
        )
    first = settings.demo_settings(scenario, settings.policies[0])
    pool = stack.enter_context(demo.client_pool(first, pool_dir))
    ready_s = pool.workloads.wait_ready()
    log.info(
        "bench: scenario %s: %d client services ready in %.1fs",
        scenario,
        len(pool.workloads.workloads),
        ready_s,
    )
    return pool


def _run_one(
    result: BenchResult,
    settings: BenchSettings,
    scenario: str,
    policy: str,
    pool: demo.ClientPool,
    on_round: Callable[[str, str, report.RoundReport], None],
) -> None:
    """One policy's run under one scenario, added to ``result``."""
    key = policy_key(policy)
    entry = result.bench["scenarios"][scenario]
    log.info("bench: scenario %s, policy %s", scenario, key)
    demo_report = demo.run(
        settings.demo_settings(scenario, policy),
        on_round=lambda r: on_round(scenario, key, r),
        pool=pool,
    )
    result.reports[scenario][key] = demo_report
    entry["policies"][key] = policy_entry(demo_report)
    log.info(
        "bench: %s/%s: time to %s >= %s: %s emulated s, final %s, %.0f s wall",
        scenario,
        key,
        METRIC,
        settings.size.target,
        entry["policies"][key]["time_to_target_emulated_s"],
        entry["policies"][key]["final"],
        demo_report["wall_total_s"],
    )


def policy_entry(demo_report: Mapping) -> dict:
    """One policy's line in ``bench.json``, from its demo report."""
    final = demo_report["final"]
    return {
        "time_to_target_emulated_s": demo_report["time_to_target"]["emulated_s"],
        "final": {m: _number(final.get(m)) for m in FINAL_METRICS},
        "rounds": len(demo_report["rounds"]),
        "wall_s": float(demo_report["wall_total_s"]),
    }


def _number(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Ratio:
    """A time to target over a reference's; ``bound`` when the reference
    never reached the target, so its time is only known to exceed ``value``'s
    denominator (the reference's whole run)."""

    value: float | None
    bound: bool = False

    def text(self) -> str:
        """``0.62``, ``< 0.62`` for a bound, ``n/a`` when it cannot be said."""
        if self.value is None:
            return "n/a"
        return f"{'< ' if self.bound else ''}{self.value:.2f}"


def ratio(
    time_s: float | None, reference_s: float | None, reference_run_s: float | None
) -> Ratio:
    """``time_s / reference_s``; a bound when only the policy reached the target."""
    if time_s is None:
        return Ratio(None)
    if reference_s is not None:
        return Ratio(time_s / reference_s) if reference_s > 0 else Ratio(None)
    if reference_run_s:
        return Ratio(time_s / reference_run_s, bound=True)
    return Ratio(None)


def best_baseline(entries: Mapping[str, Mapping]) -> str | None:
    """The baseline that reached the target first, or None if none did."""
    reached = [
        (entries[name]["time_to_target_emulated_s"], name)
        for name in BASELINES
        if name in entries and entries[name]["time_to_target_emulated_s"] is not None
    ]
    return min(reached)[1] if reached else None


def ratio_rows(
    entries: Mapping[str, Mapping], run_s: Mapping[str, float | None]
) -> list[dict]:
    """Per policy: its time to target over random's and over the best baseline's.

    ``run_s`` gives each policy's whole emulated run, which bounds the time of
    a reference that never reached the target.  Without a baseline that
    reached the target, the best baseline is the one with the shortest run.
    """
    best = best_baseline(entries)
    if best is None:
        present = [b for b in BASELINES if b in entries]
        best = min(present, key=lambda b: run_s.get(b) or math.inf, default=None)
    rows = []
    for name, entry in entries.items():
        time_s = entry["time_to_target_emulated_s"]
        rows.append(
            {
                "policy": name,
                "time_to_target_emulated_s": time_s,
                "vs_random": _against(entries, run_s, REFERENCE, time_s),
                "vs_best_baseline": _against(entries, run_s, best, time_s),
                "best_baseline": best,
            }
        )
    return rows


def _against(
    entries: Mapping[str, Mapping],
    run_s: Mapping[str, float | None],
    reference: str | None,
    time_s: float | None,
) -> Ratio:
    if reference is None or reference not in entries:
        return Ratio(None)
    return ratio(
        time_s, entries[reference]["time_to_target_emulated_s"], run_s.get(reference)
    )


def markdown(result: BenchResult) -> str:
    """``bench.md``: the settings, then a table per scenario."""
    settings, size = result.settings, result.settings.size
    lines = [
        "# meshctl bench",
        "",
        f"FLUIDS on TON_IoT through the local mesh: {size.clients} clients, "
        f"{size.per_round} per round, {size.rounds} rounds, seed {settings.seed}, "
        f"time scale {size.time_scale} wall s per emulated s.  Target: "
        f"{METRIC} >= {size.target}"
        + (
            f" (lower than the full bench's {FULL.target})."
            if size.target < FULL.target
            else "."
        ),
        "",
        "Times are emulated seconds until the test AUROC first reached the target. "
        "A ratio is the policy's time over the reference's: below 1 is sooner.  "
        "`< x` means the reference never reached the target, so the ratio is at "
        "most the policy's time over the reference's whole run.",
    ]
    for scenario, entry in result.bench["scenarios"].items():
        run_s = {
            key: _run_emulated_s(rep)
            for key, rep in result.reports.get(scenario, {}).items()
        }
        lines += ["", *_scenario_table(scenario, entry, run_s)]
    return "\n".join(lines) + "\n"


def _run_emulated_s(demo_report: Mapping) -> float | None:
    rounds = demo_report.get("rounds") or []
    return rounds[-1]["emulated_s"] if rounds else None


def _scenario_table(
    scenario: str, entry: Mapping, run_s: Mapping[str, float | None]
) -> list[str]:
    rows = ratio_rows(entry["policies"], run_s)
    best = rows[0]["best_baseline"] if rows else None
    lines = [
        f"## {scenario}",
        "",
        scenarios.get(scenario).description + ".",
        "",
        f"| policy | time to target (emulated s) | vs random | vs best baseline "
        f"({best or 'none'}) | final auroc | final f1 | final accuracy | rounds "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        policy = entry["policies"][row["policy"]]
        time_s = row["time_to_target_emulated_s"]
        final = policy["final"]
        lines.append(
            f"| {row['policy']} "
            f"| {'not reached' if time_s is None else f'{time_s:.0f}'} "
            f"| {row['vs_random'].text()} | {row['vs_best_baseline'].text()} "
            + " ".join(f"| {_fmt(final[m])}" for m in FINAL_METRICS)
            + f" | {policy['rounds']} | {policy['wall_s']:.0f} |"
        )
    mesh = entry["policies"].get("mesh")
    if mesh is not None and mesh["time_to_target_emulated_s"] is None:
        lines += ["", f"`mesh` did not reach the target in {mesh['rounds']} rounds."]
    elif speedups := mesh_speedups(entry["policies"], run_s):
        lines += ["", "`mesh` reached the target " + "; ".join(speedups) + "."]
    return lines


def mesh_speedups(
    entries: Mapping[str, Mapping], run_s: Mapping[str, float | None]
) -> list[str]:
    """How many times sooner ``mesh`` reached the target than each other policy.

    The inverse of the ratio; ``> x`` when the other never reached it.
    """
    if "mesh" not in entries:
        return []
    mesh_s = entries["mesh"]["time_to_target_emulated_s"]
    phrases = []
    for name, entry in entries.items():
        if name == "mesh":
            continue
        r = ratio(mesh_s, entry["time_to_target_emulated_s"], run_s.get(name))
        if r.value:
            sign = "> " if r.bound else ""
            phrases.append(f"{sign}{1 / r.value:.2f}x sooner than {name}")
        else:
            phrases.append(f"n/a against {name}")
    return phrases


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def plot(scenario: str, reports: Mapping[str, Mapping], target: float, path: Path):
    """The metric against emulated time, one line per policy; returns ``path``."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, demo_report in reports.items():
        xs = [r["emulated_s"] for r in demo_report["rounds"]]
        ys = [r["metrics"].get(METRIC, math.nan) for r in demo_report["rounds"]]
        ax.plot(xs, ys, marker="o", markersize=3, label=key)
    ax.axhline(target, color="grey", linestyle=":", label=f"target {target}")
    ax.set_xlabel("emulated time (s)")
    ax.set_ylabel(f"test {METRIC}")
    ax.set_title(f"scenario {scenario}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(result: BenchResult, out_dir: Path) -> list[Path]:
    """Write ``bench.json``, ``bench.md``, a plot per scenario and the runs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "bench.json", out_dir / "bench.md"]
    paths[0].write_text(json.dumps(result.bench, indent=2) + "\n")
    paths[1].write_text(markdown(result))
    for scenario, entry in result.bench["scenarios"].items():
        paths.append(
            plot(
                scenario,
                result.reports.get(scenario, {}),
                entry["target"]["value"],
                out_dir / f"{scenario}.png",
            )
        )
    runs = out_dir / "runs"
    runs.mkdir(exist_ok=True)
    for scenario, by_policy in result.reports.items():
        for key, demo_report in by_policy.items():
            path = runs / f"{scenario}-{key}.json"
            path.write_text(json.dumps(demo_report, indent=2) + "\n")
    return paths


def parse_list(text: str, valid: Sequence[str] | None = None) -> tuple[str, ...]:
    """``a,b,c`` as a tuple, blanks dropped; ``all`` means every ``valid``."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if valid is not None and items == ("all",):
        return tuple(valid)
    return items
