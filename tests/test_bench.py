"""The bench's numbers: entries, ratios against random and the best baseline."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from meshctl import bench, cli, exitcodes
from meshctl.bench import BenchResult, BenchSettings, Ratio


def _entry(time_s: float | None, auroc: float = 0.98) -> dict:
    return {
        "time_to_target_emulated_s": time_s,
        "final": {"auroc": auroc, "f1": 0.97, "accuracy": 0.96},
        "rounds": 15,
        "wall_s": 100.0,
    }


ENTRIES = {
    "random": _entry(20_000.0),
    "oort": _entry(12_000.0),
    "pyramidfl": _entry(None),
    "power-of-choice": _entry(8_000.0),
    "mesh": _entry(4_000.0),
}
RUN_S = {name: 30_000.0 for name in ENTRIES}


@pytest.mark.parametrize(
    ("time_s", "reference_s", "reference_run_s", "expected"),
    [
        (4_000.0, 8_000.0, 30_000.0, Ratio(0.5)),
        (None, 8_000.0, 30_000.0, Ratio(None)),
        (6_000.0, None, 30_000.0, Ratio(0.2, bound=True)),
        (6_000.0, None, None, Ratio(None)),
        (6_000.0, 0.0, 30_000.0, Ratio(None)),
    ],
    ids=["both-reached", "policy-missed", "reference-missed", "no-run", "zero"],
)
def test_a_ratio_is_the_time_over_the_references(
    time_s, reference_s, reference_run_s, expected
) -> None:
    assert bench.ratio(time_s, reference_s, reference_run_s) == expected


@pytest.mark.parametrize(
    ("ratio", "text"),
    [(Ratio(0.5), "0.50"), (Ratio(0.2, bound=True), "< 0.20"), (Ratio(None), "n/a")],
    ids=["plain", "bound", "unknown"],
)
def test_a_ratio_reads_as_a_number_a_bound_or_na(ratio: Ratio, text: str) -> None:
    assert ratio.text() == text


def test_the_best_baseline_is_the_one_that_reached_the_target_first() -> None:
    assert bench.best_baseline(ENTRIES) == "power-of-choice"
    assert bench.best_baseline({"random": _entry(1.0), "mesh": _entry(1.0)}) is None
    assert bench.best_baseline({"oort": _entry(None)}) is None


def test_the_ratio_table_compares_each_policy_to_random_and_best_baseline() -> None:
    rows = {row["policy"]: row for row in bench.ratio_rows(ENTRIES, RUN_S)}

    assert rows["mesh"]["vs_random"] == Ratio(0.2)
    assert rows["mesh"]["vs_best_baseline"] == Ratio(0.5)
    assert rows["power-of-choice"]["vs_best_baseline"] == Ratio(1.0)
    assert rows["oort"]["vs_random"] == Ratio(0.6)
    assert rows["pyramidfl"]["vs_random"] == Ratio(None)
    assert {row["best_baseline"] for row in rows.values()} == {"power-of-choice"}


def test_a_reference_that_never_reached_the_target_gives_a_bound() -> None:
    entries = {"random": _entry(None), "oort": _entry(None), "mesh": _entry(6_000.0)}
    run_s = {"random": 30_000.0, "oort": 24_000.0, "mesh": 30_000.0}

    (mesh,) = [r for r in bench.ratio_rows(entries, run_s) if r["policy"] == "mesh"]
    assert mesh["vs_random"] == Ratio(0.2, bound=True)
    assert mesh["vs_best_baseline"] == Ratio(0.25, bound=True)


def test_the_markdown_has_a_row_per_policy_with_its_ratios() -> None:
    reports = {
        name: {"rounds": [{"emulated_s": 30_000.0, "metrics": {"auroc": 0.98}}]}
        for name in ENTRIES
    }
    result = BenchResult(
        BenchSettings(scenarios=("static",), size=bench.QUICK),
        bench={
            "scenarios": {
                "static": {
                    "target": {"metric": "auroc", "value": 0.97},
                    "policies": ENTRIES,
                }
            }
        },
        reports={"static": reports},
    )

    text = bench.markdown(result)

    assert "lower than the full bench's 0.975" in text
    assert "vs best baseline (power-of-choice)" in text
    assert "| mesh | 4000 | 0.20 | 0.50 | 0.9800 |" in text
    assert "| pyramidfl | not reached | n/a | n/a |" in text
    assert "5.00x sooner than random; 3.00x sooner than oort" in text


def test_mesh_speedups_are_the_inverse_ratios_or_bounds() -> None:
    entries = {"random": _entry(None), "oort": _entry(8_000.0), "mesh": _entry(4_000.0)}
    run_s = {"random": 30_000.0, "oort": 30_000.0, "mesh": 30_000.0}

    assert bench.mesh_speedups(entries, run_s) == [
        "> 7.50x sooner than random",
        "2.00x sooner than oort",
    ]
    assert bench.mesh_speedups({"random": _entry(1.0)}, run_s) == []


def test_a_policy_entry_keeps_what_bench_json_promises() -> None:
    demo_report = {
        "rounds": [{"round": 1}, {"round": 2}],
        "final": {"auroc": 0.97, "f1": 0.96, "accuracy": math.nan, "loss": 1.0},
        "time_to_target": {"metric": "auroc", "target": 0.97, "emulated_s": 1234.5},
        "wall_total_s": 42.0,
    }

    assert bench.policy_entry(demo_report) == {
        "time_to_target_emulated_s": 1234.5,
        "final": {"auroc": 0.97, "f1": 0.96, "accuracy": None},
        "rounds": 2,
        "wall_s": 42.0,
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("random, mesh", ("random", "mesh")),
        ("all", ("static", "dynamic")),
        ("static,", ("static",)),
    ],
    ids=["two", "all", "trailing-comma"],
)
def test_lists_on_the_command_line(text: str, expected: tuple[str, ...]) -> None:
    assert bench.parse_list(text, ("static", "dynamic")) == expected


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (BenchSettings(scenarios=("chaos",)), "unknown scenario 'chaos'"),
        (BenchSettings(policies=("nope",)), "unknown policy 'nope'"),
        (BenchSettings(policies=("mesh", "mesh")), "names a policy twice"),
        (BenchSettings(policies=()), "at least one"),
    ],
    ids=["scenario", "policy", "twice", "empty"],
)
def test_bad_settings_fail_before_anything_starts(
    settings: BenchSettings, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        settings.check()


def test_every_run_of_a_scenario_shares_its_clients_but_not_its_policy() -> None:
    settings = BenchSettings(size=bench.QUICK, seed=4)

    a = settings.demo_settings("dynamic", "random")
    b = settings.demo_settings("dynamic", "mesh")

    assert a.policy != b.policy
    for name in ("clients", "seed", "scenario", "rounds", "time_scale", "target"):
        assert getattr(a, name) == getattr(b, name)
    assert (a.clients, a.rounds, a.target) == (8, 5, 0.97)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "--scenario=chaos"], "unknown scenario 'chaos'"),
        (["bench", "--policies=random,oracle"], "unknown policy 'oracle'"),
        (["demo", "--scenario=chaos"], "unknown scenario 'chaos'"),
    ],
    ids=["bench-scenario", "bench-policy", "demo-scenario"],
)
def test_unknown_names_are_usage_errors_before_anything_starts(
    args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli.app, args)

    assert result.exit_code == int(exitcodes.ExitCode.USAGE)
    assert message in " ".join(result.output.split())


def test_the_markdown_says_when_mesh_never_reached_the_target() -> None:
    entries = {"random": _entry(9_000.0), "mesh": _entry(None)}
    result = BenchResult(
        BenchSettings(scenarios=("dynamic",)),
        bench={
            "scenarios": {
                "dynamic": {
                    "target": {"metric": "auroc", "value": 0.975},
                    "policies": entries,
                }
            }
        },
        reports={"dynamic": {}},
    )

    assert "`mesh` did not reach the target in 15 rounds." in bench.markdown(result)
