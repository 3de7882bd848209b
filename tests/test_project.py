"""Promises the project keeps about itself: layers, exit codes, the CLI surface."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meshctl import cli, exitcodes

ROOT = Path(__file__).resolve().parents[1]


def test_lower_layers_never_import_higher_ones() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is installed with the test extras"

    result = subprocess.run([lint], cwd=ROOT, capture_output=True, text=True)

    assert result.returncode == 0, result.stdout[-3000:]
    assert "broken" in result.stdout and "0 broken" in result.stdout


@pytest.mark.parametrize("code", list(exitcodes.ExitCode), ids=lambda c: c.name)
def test_every_exit_code_has_help_text(code: exitcodes.ExitCode) -> None:
    assert exitcodes.HELP[code].strip()
    assert str(int(code)) in exitcodes.epilog()


def test_the_commands_users_are_told_about_exist() -> None:
    result = CliRunner().invoke(cli.app, ["--help"])

    assert result.exit_code == 0
    for command in ("demo", "data", "validate", "exit-codes"):
        assert command in result.output


def test_demo_refuses_impossible_settings_with_a_usage_error() -> None:
    result = CliRunner().invoke(cli.app, ["demo", "--clients=2", "--per-round=3"])

    assert result.exit_code == int(exitcodes.ExitCode.USAGE)
    assert "--per-round" in result.output


def test_an_unknown_policy_is_a_usage_error_naming_the_known_ones() -> None:
    result = CliRunner().invoke(cli.app, ["demo", "--policy=oracle"])

    assert result.exit_code == int(exitcodes.ExitCode.USAGE)
    assert "mesh, oort, power-of-choice" in " ".join(result.output.split())


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        pytest.param(
            ["--time-scale=nan"],
            exitcodes.ExitCode.USAGE,
            "--time-scale (nan) must be a positive number",
            id="time-scale-nan",
        ),
        pytest.param(
            ["--deadline-s=inf"],
            exitcodes.ExitCode.USAGE,
            "--deadline-s (inf) must be a positive number",
            id="deadline-inf",
        ),
        pytest.param(
            ["--dataset=fedscale"],
            exitcodes.ExitCode.USAGE,
            "--dataset must be one of ton_iot, nsl_kdd, not 'fedscale'",
            id="device-trace-is-no-dataset",
        ),
        pytest.param(
            ["--telemetry=prometheus", "--prometheus-url=prometheus:9090"],
            exitcodes.ExitCode.USAGE,
            "'prometheus:9090' is not an http(s) URL",
            id="url-without-scheme",
        ),
        pytest.param(
            [f"--policy={ROOT / 'policies'}"],
            exitcodes.ExitCode.INVALID,
            f"{ROOT / 'policies'}:0: (file): cannot read: Is a directory",
            id="policy-directory",
        ),
    ],
)
def test_demo_names_a_bad_option_before_anything_starts(args, code, says) -> None:
    result = CliRunner().invoke(cli.app, ["demo", *args])

    assert result.exit_code == int(code)
    assert says in " ".join(result.output.split())
