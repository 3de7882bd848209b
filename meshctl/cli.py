"""The ``meshctl`` command line.

Machine output goes to stdout; progress, logs and colour go to stderr.  Every
option says its default in ``--help``, and ``MESHCTL_*`` environment variables
set the common ones.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from meshctl import exitcodes, policies
from meshctl.exitcodes import ExitCode

app = typer.Typer(
    name="meshctl",
    help="Federated-learning client selection through the service mesh.",
    epilog=exitcodes.epilog(),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Get the datasets the FLUIDS case study trains on.")
app.add_typer(data_app, name="data")

err = Console(stderr=True)
out = Console()
log = logging.getLogger("meshctl")


def _setup_logging(level: str, log_format: str) -> None:
    if log_format == "json":
        fmt = (
            '{"time": "%(asctime)s", "level": "%(levelname)s", '
            '"logger": "%(name)s", "message": "%(message)s"}'
        )
    else:
        fmt = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)
    for noisy in ("httpx", "httpcore", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Flower logs every strategy step through its own handler; meshctl logs rounds.
    logging.getLogger("flwr").setLevel(logging.ERROR)


def _fail(code: ExitCode, message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(int(code))


DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="MESHCTL_DATA_DIR",
        help="Directory holding the datasets, laid out as `meshctl data fetch` "
        "writes it.  [env: MESHCTL_DATA_DIR]",
        show_default=False,
    ),
]


@app.command()
def demo(
    clients: Annotated[int, typer.Option(help="Number of FL client services.")] = 20,
    per_round: Annotated[
        int, typer.Option("--per-round", "-k", help="Clients chosen per round.")
    ] = 5,
    rounds: Annotated[int, typer.Option(help="Training rounds.")] = 15,
    policy: Annotated[
        str, typer.Option(help=f"Selection policy: {', '.join(policies.NAMES)}.")
    ] = "mesh",
    dataset: Annotated[str, typer.Option(help="ton_iot or nsl_kdd.")] = "ton_iot",
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Write report.json, report.md and plots here."),
    ] = None,
    data_dir: DataDir = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            help="Keep the run's files (routes, Envoy config, logs) here "
            "instead of a temporary directory."
        ),
    ] = None,
    time_scale: Annotated[
        float, typer.Option(help="Wall seconds per emulated device second.")
    ] = 0.003,
    deadline_s: Annotated[
        float, typer.Option(help="Emulated seconds a round waits for its clients.")
    ] = 2400.0,
    failing_clients: Annotated[
        int, typer.Option(help="How many clients fail part of their requests.")
    ] = 2,
    fail_rate: Annotated[
        float, typer.Option(help="Share of requests a failing client fails.")
    ] = 0.5,
    target: Annotated[float, typer.Option(help="AUROC that counts as reached.")] = 0.95,
    log_level: Annotated[str, typer.Option(help="Log level on stderr.")] = "INFO",
    log_format: Annotated[str, typer.Option(help="plain or json.")] = "plain",
) -> None:
    """Run federated training on the embedded mesh: real Envoy, real data."""
    from fl_app.data import DataError  # the case study, loaded only when it runs
    from meshctl import demo as demo_run
    from meshctl import report

    _setup_logging(log_level, log_format)
    settings = demo_run.DemoSettings(
        clients=clients,
        per_round=per_round,
        rounds=rounds,
        policy=policy,
        dataset=dataset,
        seed=seed,
        data_dir=data_dir,
        work_dir=work_dir,
        time_scale=time_scale,
        deadline_s=deadline_s,
        failing_clients=failing_clients,
        fail_rate=fail_rate,
        target=target,
    )
    try:
        settings.check()
        result = demo_run.run(settings, on_round=_print_round)
    except (ValueError, policies.UnknownPolicy) as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    except DataError as exc:
        raise _fail(ExitCode.DATA_MISSING, str(exc)) from exc
    except KeyboardInterrupt as exc:
        raise _fail(ExitCode.INTERRUPTED, "interrupted; all processes stopped") from exc
    if out_dir is not None:
        paths = report.write(result, out_dir)
        err.print(f"report written: {', '.join(str(p) for p in paths)}")
    out.print(_summary_table(result))


def _print_round(entry) -> None:
    metrics = " ".join(f"{k}={v:.4f}" for k, v in entry.metrics.items())
    failed = f" failed: {', '.join(entry.failed)}" if entry.failed else ""
    err.print(
        f"[bold]round {entry.round}[/] {metrics}  emulated {entry.emulated_s:.0f}s "
        f"wall {entry.wall_s:.1f}s{failed}",
        highlight=False,
    )


def _summary_table(result: dict) -> Table:
    ttt = result["time_to_target"]
    table = Table(
        title=f"{result['policy']} on {result['dataset']}: "
        f"{result['clients']} clients, {result['per_round']} per round"
    )
    for column in ("round", "selected", "served by Envoy", "emulated s", "auroc", "f1"):
        table.add_column(column)
    for r in result["rounds"]:
        table.add_row(
            str(r["round"]),
            " ".join(r["selected"]),
            " ".join(f"{c}:{n}" for c, n in r["served_by"].items()),
            f"{r['emulated_s']:.0f}",
            f"{r['metrics'].get('auroc', float('nan')):.4f}",
            f"{r['metrics'].get('f1', float('nan')):.4f}",
        )
    reached = ttt["emulated_s"]
    table.caption = (
        f"time to {ttt['metric']} >= {ttt['target']}: "
        + (f"{reached:.0f} s emulated" if reached is not None else "not reached")
        + f"; wall {result['wall_total_s']:.0f} s"
    )
    return table


@data_app.command("fetch")
def data_fetch(
    dataset: Annotated[
        str, typer.Option(help="ton_iot, nsl_kdd, fedscale or all.")
    ] = "all",
    dest: Annotated[
        Path | None,
        typer.Option(
            help="Data directory to fill (default: $MESHCTL_DATA_DIR or ./data)."
        ),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from", help="Import from a local copy laid out like the data directory."
        ),
    ] = None,
) -> None:
    """Download the public datasets, checking every file's SHA-256."""
    from fl_app import fetch

    _setup_logging("INFO", "plain")
    dest = dest or Path(os.environ.get("MESHCTL_DATA_DIR", "data"))
    names = tuple(fetch.DATASETS) if dataset == "all" else (dataset,)
    try:
        for name in names:
            fetch.dataset_source(name)  # unknown names fail before any download
    except ValueError as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    failures = []
    for name in names:
        try:
            if source is not None:
                paths = fetch.import_from(source, dest, (name,))
            else:
                paths = fetch.fetch_dataset(name, dest)
        except fetch.FetchError as exc:
            failures.append(f"{name}: {exc}")
            continue
        for path in paths:
            out.print(str(path), highlight=False)
    if failures:
        raise _fail(ExitCode.DATA_MISSING, "\n".join(failures))


@app.command()
def validate(
    files: Annotated[
        list[Path], typer.Argument(help="YAML files; several documents each is fine.")
    ],
    crds: Annotated[
        Path | None,
        typer.Option(
            envvar="MESHCTL_ISTIO_CRDS",
            help="Istio CRD file whose openAPIV3Schema the objects must also pass.  "
            "[env: MESHCTL_ISTIO_CRDS]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Check VirtualService and DestinationRule YAML; one line per problem."""
    from meshctl.routing import RoutingError
    from meshctl.routing import validate as checks

    try:
        schemas = checks.load_crd_schemas(crds) if crds is not None else None
        batches = [(path, checks.load_yaml_documents(path)) for path in files]
    except (OSError, RoutingError) as exc:
        raise _fail(ExitCode.INVALID, str(exc)) from exc
    problems = [
        problem
        for path, objects in batches
        for problem in checks.validate_objects(
            objects, source=str(path), schemas=schemas
        )
    ]
    for problem in problems:
        print(problem)
    if problems:
        raise typer.Exit(int(ExitCode.INVALID))
    count = sum(len(objects) for _, objects in batches)
    err.print(f"{count} objects valid", highlight=False)


@app.command("exit-codes")
def exit_codes(
    output: Annotated[
        str, typer.Option("-o", "--output", help="table or json.")
    ] = "table",
) -> None:
    """List meshctl's exit codes and what each means."""
    if output == "json":
        print(json.dumps({int(c): exitcodes.HELP[c] for c in ExitCode}, indent=2))
        return
    for code in ExitCode:
        out.print(f"{int(code):>3}  {exitcodes.HELP[code]}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    app()


if __name__ == "__main__":
    main()
