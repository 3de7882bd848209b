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


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("plain", "json")
LogLevelOpt = Annotated[
    str,
    typer.Option(
        envvar="MESHCTL_LOG_LEVEL",
        help="Log level on stderr.  [env: MESHCTL_LOG_LEVEL]",
    ),
]
LogFormatOpt = Annotated[
    str,
    typer.Option(
        envvar="MESHCTL_LOG_FORMAT",
        help="plain, or json (one object a line).  [env: MESHCTL_LOG_FORMAT]",
    ),
]


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _setup_logging(level: str, log_format: str) -> None:
    if level.upper() not in LOG_LEVELS:
        raise _fail(
            ExitCode.USAGE,
            f"--log-level must be one of {', '.join(LOG_LEVELS)}, not {level!r}",
        )
    if log_format not in LOG_FORMATS:
        raise _fail(
            ExitCode.USAGE,
            f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}",
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter()
        if log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
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
        int | None,
        typer.Option(
            "--per-round",
            "-k",
            help="Clients asked for per round (default: the policy file's "
            "clientsPerRound, else 5).",
            show_default=False,
        ),
    ] = None,
    rounds: Annotated[int, typer.Option(help="Training rounds.")] = 15,
    policy: Annotated[
        str,
        typer.Option(
            help=f"Selection policy: {', '.join(policies.NAMES)}, or the path of "
            "a SelectionPolicy file (policies/*.yaml)."
        ),
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
        int | None,
        typer.Option(
            help="How many clients fail part of their requests "
            "(default: a tenth of --clients).",
            show_default=False,
        ),
    ] = None,
    fail_rate: Annotated[
        float, typer.Option(help="Share of requests a failing client fails.")
    ] = 0.5,
    target: Annotated[float, typer.Option(help="AUROC that counts as reached.")] = 0.97,
    scenario: Annotated[
        str,
        typer.Option(
            help="static (fixed failures) or dynamic (mid-run, fast clients turn "
            "slow or failing, some clients join late)."
        ),
    ] = "static",
    telemetry: Annotated[
        str,
        typer.Option(
            help="Where the controller reads telemetry: envoy (its admin stats) "
            "or prometheus (the production PromQL; a local Prometheus is started "
            "unless --prometheus-url is given)."
        ),
    ] = "envoy",
    prometheus_url: Annotated[
        str | None,
        typer.Option(
            help="With --telemetry prometheus: a Prometheus of your own, which "
            "must add the scrape jobs the demo prints (default: start one).",
            show_default=False,
        ),
    ] = None,
    fault_spec: Annotated[
        str,
        typer.Option(
            "--faults",
            help="Faults to inject, comma-separated, rounds from 1: "
            "crash:CLIENT@ROUND[+ROUNDS] (restarted after ROUNDS more rounds, "
            "1 by default), slow:CLIENTxFACTOR@ROUND, "
            "fail:CLIENTxSHARE@ROUND, nan|shape|oversized:CLIENT@ROUND (a bad "
            "reply), envoy-restart@ROUND, controller-restart@ROUND.  "
            "Example: crash:c-03@2,slow:c-05x10@1",
            show_default=False,
        ),
    ] = "",
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = "plain",
) -> None:
    """Run federated training on the embedded mesh: real Envoy, real data."""
    from fl_app.data import DataError  # the case study, loaded only when it runs
    from meshctl import demo as demo_run
    from meshctl import report

    _setup_logging(log_level, log_format)
    try:
        _, document = policies.resolve(policy)
    except policies.PolicyDocumentError as exc:
        for problem in exc.problems:  # path:line: field: message, one a line
            print(problem, file=sys.stderr)
        raise typer.Exit(int(ExitCode.INVALID)) from exc
    except policies.UnknownPolicy as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    if per_round is None:
        per_round = (document and document.clients_per_round) or 5
    if failing_clients is None:
        failing_clients = clients // 10
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
        out_dir=out_dir,
        telemetry=telemetry,
        prometheus_url=prometheus_url,
        scenario=scenario,
        faults=fault_spec,
    )
    try:
        settings.check()
    except (ValueError, policies.UnknownPolicy) as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    except DataError as exc:
        raise _fail(ExitCode.DATA_MISSING, str(exc)) from exc
    finished: list = []

    def on_round(entry) -> None:
        finished.append(entry)
        _print_round(entry)

    try:
        result = demo_run.run(settings, on_round=on_round)
    except demo_run.SettingsError as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    except DataError as exc:
        raise _fail(ExitCode.DATA_MISSING, str(exc)) from exc
    except demo_run.MESH_ERRORS as exc:
        raise _fail(ExitCode.MESH_FAILED, str(exc)) from exc
    except KeyboardInterrupt as exc:
        if out_dir is not None and finished:
            partial = demo_run.report_of(settings, finished, interrupted=True)
            report.write(partial, out_dir)
            err.print(f"report of the {len(finished)} finished rounds in {out_dir}")
        raise _fail(ExitCode.INTERRUPTED, "interrupted; all processes stopped") from exc
    except Exception as exc:  # the last resort: a message, not a traceback
        log.debug("the demo failed", exc_info=True)
        raise _fail(
            ExitCode.FAILED,
            f"{type(exc).__name__}: {exc} (--log-level debug shows the traceback)",
        ) from exc
    if out_dir is not None:
        paths = report.write(result, out_dir)
        err.print(f"report written: {', '.join(str(p) for p in paths)}")
    out.print(_summary_table(result))


def _print_round(entry, prefix: str = "") -> None:
    metrics = " ".join(f"{k}={v:.4f}" for k, v in entry.metrics.items())
    failed = f" failed: {', '.join(entry.failed)}" if entry.failed else ""
    err.print(
        f"[bold]{prefix}round {entry.round}[/] {metrics}  "
        f"emulated {entry.emulated_s:.0f}s wall {entry.wall_s:.1f}s{failed}",
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
    if ttt["emulated_s"] is None:
        reached = "not reached"
    else:
        reached = (
            f"round {ttt['round']}, {ttt['emulated_s']:.0f} s emulated, "
            f"{ttt['wall_s']:.0f} s of training wall time"
        )
    table.caption = (
        f"time to {ttt['metric']} >= {ttt['target']}: {reached}; "
        f"the whole run took {result['wall_total_s']:.0f} s"
    )
    return table


@app.command()
def bench(
    scenario: Annotated[
        str, typer.Option(help="static, dynamic or all (both, in that order).")
    ] = "all",
    policies_text: Annotated[
        str,
        typer.Option(
            "--policies",
            help="Comma-separated policy names or SelectionPolicy files.",
        ),
    ] = "random,oort,pyramidfl,power-of-choice,mesh",
    quick: Annotated[
        bool, typer.Option(help="8 clients, 5 rounds, target 0.97: a few minutes.")
    ] = False,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Write bench.json, bench.md and plots here.")
    ] = Path("out/bench"),
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    data_dir: DataDir = None,
    clients: Annotated[
        int | None,
        typer.Option(help="Override the size's number of clients.", show_default=False),
    ] = None,
    per_round: Annotated[
        int | None,
        typer.Option(help="Override the size's clients per round.", show_default=False),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(help="Override the size's rounds.", show_default=False),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(help="Keep each run's files here (one directory per run)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level on stderr.")] = "INFO",
) -> None:
    """Run every policy through the local mesh under the same scenarios; compare."""
    import dataclasses

    from fl_app.data import DataError  # the case study, loaded only when it runs
    from meshctl import bench as bench_run
    from meshctl import scenarios

    _setup_logging(log_level, "plain")
    size = bench_run.QUICK if quick else bench_run.FULL
    overrides = {"clients": clients, "per_round": per_round, "rounds": rounds}
    size = dataclasses.replace(
        size, **{k: v for k, v in overrides.items() if v is not None}
    )
    if clients is not None:
        size = dataclasses.replace(
            size, failing_clients=min(size.failing_clients, max(0, clients - 1))
        )
    settings = bench_run.BenchSettings(
        scenarios=bench_run.parse_list(scenario, scenarios.NAMES),
        policies=bench_run.parse_list(policies_text, bench_run.POLICIES),
        size=size,
        seed=seed,
        data_dir=data_dir,
        work_dir=work_dir,
    )

    def written(result) -> None:
        bench_run.write(result, out_dir)

    try:
        result = bench_run.run(
            settings,
            on_round=lambda s, p, entry: _print_round(entry, prefix=f"{s}/{p} "),
            on_run=written,
        )
    except policies.PolicyDocumentError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise typer.Exit(int(ExitCode.INVALID)) from exc
    except (ValueError, policies.UnknownPolicy) as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    except DataError as exc:
        raise _fail(ExitCode.DATA_MISSING, str(exc)) from exc
    except KeyboardInterrupt as exc:
        raise _fail(
            ExitCode.INTERRUPTED,
            f"interrupted; all processes stopped; finished runs are in {out_dir}",
        ) from exc
    paths = bench_run.write(result, out_dir)
    err.print(f"bench written: {', '.join(str(p) for p in paths)}")
    print(bench_run.markdown(result), end="")


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
    """Check VirtualService, DestinationRule and SelectionPolicy YAML.

    One line per problem."""
    from meshctl.routing import RoutingError
    from meshctl.routing import validate as checks

    try:
        schemas = checks.load_crd_schemas(crds) if crds is not None else None
        batches = [(path, checks.load_yaml_documents(path)) for path in files]
    except (OSError, RoutingError) as exc:
        raise _fail(ExitCode.INVALID, str(exc)) from exc
    # Objects in one file may refer to objects in another (a VirtualService to
    # the DestinationRule's subsets): each file is checked with the others beside.
    # Kinds meshctl has no rules or schema for are left out, and said so.
    skipped: dict[str, int] = {}
    routing = []
    for path, objects in batches:
        checked = []
        for obj in objects:
            if _validatable(obj, schemas):
                checked.append(obj)
            elif obj.get("kind") != policies.documents.KIND:
                kind = str(obj.get("kind") or "<no kind>")
                skipped[kind] = skipped.get(kind, 0) + 1
        routing.append((path, checked))
    problems = [
        problem
        for index, (path, objects) in enumerate(routing)
        for problem in checks.validate_objects(
            objects,
            source=str(path),
            schemas=schemas,
            context=[
                o for i, (_, other) in enumerate(routing) if i != index for o in other
            ],
        )
    ]
    # SelectionPolicy documents pass their own schema, reported with lines.
    for path, objects in batches:
        if any(o.get("kind") == policies.documents.KIND for o in objects):
            problems.extend(policies.documents.file_problems(path))
    for problem in problems:
        print(problem)
    if problems:
        raise typer.Exit(int(ExitCode.INVALID))
    count = sum(len(objects) for _, objects in batches) - sum(skipped.values())
    note = ""
    if skipped:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        note = f"; not checked (no meshctl rules or CRD schema): {kinds}"
    err.print(f"{count} object{'s' * (count != 1)} valid{note}", highlight=False)


def _validatable(obj: dict, schemas: dict | None) -> bool:
    """Whether ``meshctl validate`` has rules or a schema for ``obj``'s kind."""
    from meshctl.routing import validate as checks

    if obj.get("kind") in (checks.VIRTUAL_SERVICE, checks.DESTINATION_RULE):
        return True
    group = str(obj.get("apiVersion", "")).partition("/")[0]
    return schemas is not None and group.endswith("istio.io")


@app.command()
def score(
    prometheus_url: Annotated[
        str,
        typer.Option(
            envvar="MESHCTL_PROMETHEUS_URL",
            help="Prometheus base URL.  [env: MESHCTL_PROMETHEUS_URL]",
        ),
    ],
    namespace: Annotated[
        str, typer.Option("-n", "--namespace", help="The FL clients' namespace.")
    ] = "fl",
    window: Annotated[
        str, typer.Option(help="Telemetry window, a Prometheus duration (30s, 5m).")
    ] = "5m",
    output: Annotated[
        str, typer.Option("-o", "--output", help="table, json or yaml.")
    ] = "table",
    service: Annotated[
        str, typer.Option(help="The Service in front of the FL clients.")
    ] = "fl-clients",
    pod_label: Annotated[
        str, typer.Option(help="The series label that names a client's pod.")
    ] = "pod",
    short_window: Annotated[
        str,
        typer.Option(help="widen or refuse a window under four scrape intervals."),
    ] = "widen",
    timeout_s: Annotated[
        float, typer.Option("--timeout", help="Seconds each Prometheus call may take.")
    ] = 5.0,
) -> None:
    """Print every client's telemetry and state, as the controller reads them."""
    from meshctl.telemetry import prometheus as source
    from meshctl.telemetry import score as scoring

    _setup_logging("WARNING", "plain")
    try:
        window_s = source.parse_duration_s(window)
        if output not in scoring.OUTPUTS:
            raise ValueError(f"-o is table, json or yaml, not {output!r}")
        if short_window not in ("widen", "refuse"):
            raise ValueError(f"--short-window is widen or refuse, not {short_window!r}")
        reader = source.PrometheusSource(
            prometheus_url,
            namespace=namespace,
            service=service,
            pod_label=pod_label,
            timeout_s=timeout_s,
            on_short_window=short_window,
        )
        try:
            window_s = reader.window_s(window_s)
            telemetry = reader.read(window_s)
        finally:
            reader.close()
    except (ValueError, source.WindowTooShort) as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    except source.PrometheusError as exc:
        raise _fail(ExitCode.TELEMETRY_FAILED, str(exc)) from exc
    print(scoring.render(telemetry, window_s, output))


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


@app.command()
def apply(
    kustomize: Annotated[
        Path | None,
        typer.Option("-k", "--kustomize", help="Kustomization directory to render."),
    ] = None,
    filename: Annotated[
        Path | None,
        typer.Option("-f", "--filename", help="YAML file or directory; - for stdin."),
    ] = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(envvar="KUBECONFIG", help="Kubeconfig file.  [env: KUBECONFIG]"),
    ] = None,
    context: Annotated[
        str | None, typer.Option(help="Kubeconfig context (default: current).")
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option("-n", "--namespace", help="Namespace of objects that name none."),
    ] = None,
    dry_run: Annotated[
        str, typer.Option("--dry-run", help="none, client (no server) or server.")
    ] = "none",
    to_dir: Annotated[
        Path | None,
        typer.Option(help="Write the manifests here for a GitOps repository instead."),
    ] = None,
    force_conflicts: Annotated[
        bool, typer.Option(help="Take fields other field managers own.")
    ] = False,
) -> None:
    """Apply manifests with server-side apply (field manager meshctl), or write them."""
    from meshctl.kube import apply as kube_apply
    from meshctl.kube import client as kube_client
    from meshctl.kube import errors as kube_errors
    from meshctl.routing import validate as checks

    modes = kube_apply.DRY_RUN_MODES
    if (kustomize is None) == (filename is None) or dry_run not in modes:
        raise _fail(
            ExitCode.USAGE,
            f"give one of -k DIR or -f FILE; --dry-run is one of {', '.join(modes)}",
        )
    try:
        objects = (
            kube_apply.render_kustomization(kustomize)
            if kustomize is not None
            else kube_apply.read_files(filename)
        )
        objects = kube_apply.prepare(objects, namespace, _istio_problems(checks))
        if to_dir is not None:
            for path in kube_apply.write_to_dir(objects, to_dir):
                print(path)
            return
        api = None
        if dry_run != "client":
            api = kube_client.Api(kube_client.connect(kubeconfig, context))
        namespace = namespace or kube_client.default_namespace(kubeconfig, context)
        for applied in kube_apply.apply(
            api,
            objects,
            namespace=namespace,
            dry_run=dry_run,
            force_conflicts=force_conflicts,
        ):
            print(applied)
    except kube_apply.ManifestError as exc:
        raise _fail(ExitCode.INVALID, str(exc)) from exc
    except kube_errors.KubeError as exc:
        raise _fail(_kube_exit_code(exc), str(exc)) from exc


_ISTIO_API_SUFFIXES = tuple(
    f".istio.io/{v}" for v in ("v1", "v1beta1", "v1alpha3", "v1alpha1")
)


def _istio_problems(checks):
    """meshctl's rules and $MESHCTL_ISTIO_CRDS's schemas, for Istio objects."""
    crds = os.environ.get("MESHCTL_ISTIO_CRDS")
    schemas = checks.load_crd_schemas(crds) if crds else None

    def check(objects) -> list[str]:
        istio = [o for o in objects if o["apiVersion"].endswith(_ISTIO_API_SUFFIXES)]
        problems = checks.validate_objects(istio, source="manifests", schemas=schemas)
        return [str(p) for p in problems]

    return check


def _kube_exit_code(exc: Exception) -> ExitCode:
    """The exit code for an API server error."""
    from meshctl.kube import errors as kube_errors

    codes = {
        kube_errors.Forbidden: ExitCode.PERMISSION_DENIED,
        kube_errors.Unreachable: ExitCode.CLUSTER_UNREACHABLE,
        kube_errors.Conflict: ExitCode.CONFLICT,
        kube_errors.Invalid: ExitCode.INVALID,
        kube_errors.NotFound: ExitCode.INVALID,
    }
    found = (code for cls, code in codes.items() if isinstance(exc, cls))
    return next(found, ExitCode.FAILED)


KubeconfigOpt = Annotated[
    Path | None,
    typer.Option(envvar="KUBECONFIG", help="Kubeconfig file.  [env: KUBECONFIG]"),
]
ContextOpt = Annotated[
    str | None, typer.Option(help="Kubeconfig context (default: current).")
]
NamespaceOpt = Annotated[
    str | None,
    typer.Option(
        "-n",
        "--namespace",
        help="The FL namespace (default: the context's, else fl).",
        show_default=False,
    ),
]
OutputOpt = Annotated[str, typer.Option("-o", "--output", help="table, json or yaml.")]
WindowOpt = Annotated[
    str, typer.Option(help="Telemetry window, a Prometheus duration (30s, 5m).")
]
PolicyOpt = Annotated[
    str,
    typer.Option(
        envvar="MESHCTL_POLICY",
        help=f"Selection policy: {', '.join(policies.NAMES)}, or the path of a "
        "SelectionPolicy file.  [env: MESHCTL_POLICY]",
    ),
]
SettleOpt = Annotated[
    float,
    typer.Option("--settle", help="Seconds to wait after each routing step for Istio."),
]


def _cluster_backend(kubeconfig, context, namespace):
    """The API connection and the routing backend of the FL namespace."""
    from meshctl.backends.cluster import ClusterBackend
    from meshctl.kube import client as kube_client

    api = kube_client.Api(kube_client.connect(kubeconfig, context))
    namespace = namespace or kube_client.default_namespace(kubeconfig, context) or "fl"
    return ClusterBackend(api, namespace=namespace)


def _resolve_policy(policy: str):
    """The policy and its document, or the exit a bad name or file deserves."""
    try:
        return policies.resolve(policy)
    except policies.PolicyDocumentError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise typer.Exit(int(ExitCode.INVALID)) from exc
    except policies.UnknownPolicy as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc


@app.command()
def select(
    prometheus_url: Annotated[
        str,
        typer.Option(
            envvar="MESHCTL_PROMETHEUS_URL",
            help="Prometheus base URL.  [env: MESHCTL_PROMETHEUS_URL]",
        ),
    ],
    policy: PolicyOpt = "mesh",
    per_round: Annotated[
        int | None,
        typer.Option(
            "--per-round",
            "-k",
            min=1,
            help="Clients to route (default: the policy file's clientsPerRound, "
            "else 5).",
            show_default=False,
        ),
    ] = None,
    window: WindowOpt = "5m",
    settle_s: SettleOpt = 5.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the diff; write nothing.")
    ] = False,
    output: OutputOpt = "table",
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Run one selection cycle on a cluster: telemetry, policy, routes."""
    from meshctl.controller import select as selecting
    from meshctl.kube import errors as kube_errors
    from meshctl.telemetry import prometheus as source

    _setup_logging(os.environ.get("MESHCTL_LOG_LEVEL", "WARNING"), "plain")
    chosen, document = _resolve_policy(policy)
    if output not in selecting.OUTPUTS:
        raise _fail(ExitCode.USAGE, "-o is table, json or yaml")
    try:
        backend = _cluster_backend(kubeconfig, context, namespace)
        reader = source.PrometheusSource(prometheus_url, namespace=backend.namespace)
        try:
            result = selecting.select_once(
                backend,
                reader,
                chosen,
                per_round=_per_round(per_round, document),
                window_s=source.parse_duration_s(window),
                settle_s=settle_s,
                dry_run=dry_run,
            )
        finally:
            reader.close()
    except ValueError as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    except source.PrometheusError as exc:
        raise _fail(ExitCode.TELEMETRY_FAILED, str(exc)) from exc
    except kube_errors.KubeError as exc:
        raise _fail(_kube_exit_code(exc), str(exc)) from exc
    except selecting.SelectError as exc:
        code = _kube_exit_code(exc.kube_error) if exc.kube_error else ExitCode.FAILED
        raise _fail(code, str(exc)) from exc
    if dry_run and result.diff:
        print(result.diff, end="", file=sys.stdout if output == "table" else sys.stderr)
    print(selecting.render(result, output))


def _per_round(given: int | None, document: policies.PolicyDocument | None) -> int:
    """``-k`` if given, else the policy file's clientsPerRound, else 5."""
    if given is not None:
        return given
    return (document.clients_per_round if document else None) or 5


@app.command()
def run(
    prometheus_url: Annotated[
        str,
        typer.Option(
            "--prometheus-url",
            "--prometheus",
            envvar="MESHCTL_PROMETHEUS_URL",
            help="Prometheus base URL.  [env: MESHCTL_PROMETHEUS_URL]",
        ),
    ],
    policy: PolicyOpt = "mesh",
    listen: Annotated[
        str, typer.Option(help="host:port of the round API, /healthz and /readyz.")
    ] = "0.0.0.0:8080",
    metrics_listen: Annotated[
        str | None,
        typer.Option(help="host:port of /metrics (default: the --listen port)."),
    ] = None,
    window: WindowOpt = "5m",
    settle_s: SettleOpt = 5.0,
    state_file: Annotated[
        Path | None,
        typer.Option(
            "--state-file",
            help="Save the controller's state here after each round and recover "
            "it at start (a volume that outlives the pod); default: keep none.",
        ),
    ] = None,
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = "plain",
) -> None:
    """Run the controller in a cluster until SIGTERM: round API, watch, health."""
    import signal

    from meshctl.controller import loop
    from meshctl.controller.state import ControllerStateError
    from meshctl.kube import errors as kube_errors
    from meshctl.telemetry import prometheus as source

    _setup_logging(log_level, log_format)
    chosen, _ = _resolve_policy(policy)
    try:
        backend = _cluster_backend(kubeconfig, context, namespace)
        settings = loop.LoopSettings(
            listen=loop.parse_address(listen),
            metrics_listen=loop.parse_address(metrics_listen),
            window_s=source.parse_duration_s(window),
            settle_s=settle_s,
            state_path=state_file,
        )
        reader = source.PrometheusSource(prometheus_url, namespace=backend.namespace)
    except ValueError as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    except kube_errors.KubeError as exc:
        raise _fail(_kube_exit_code(exc), str(exc)) from exc
    try:
        controller_loop = loop.ControllerLoop(backend, reader, chosen, settings)
    except ControllerStateError as exc:
        reader.close()
        message = f"{exc}; move the file away to start fresh"
        raise _fail(ExitCode.INVALID, message) from exc
    signal.signal(signal.SIGTERM, lambda *_: controller_loop.request_stop())
    try:
        controller_loop.start()
        controller_loop.wait()
    except OSError as exc:
        raise _fail(ExitCode.USAGE, f"cannot listen on {listen}: {exc}") from exc
    except KeyboardInterrupt:
        pass
    finally:
        controller_loop.stop()
        reader.close()


@app.command()
def status(
    prometheus_url: Annotated[
        str | None,
        typer.Option(
            envvar="MESHCTL_PROMETHEUS_URL",
            help="Prometheus base URL for the clients' states (default: none).  "
            "[env: MESHCTL_PROMETHEUS_URL]",
            show_default=False,
        ),
    ] = None,
    window: WindowOpt = "5m",
    output: OutputOpt = "table",
    kubeconfig: KubeconfigOpt = None,
    context: ContextOpt = None,
    namespace: NamespaceOpt = None,
) -> None:
    """Show the clients, their states, the selection, weights and routing version."""
    from meshctl.controller import status as cluster_status
    from meshctl.kube import errors as kube_errors
    from meshctl.telemetry import prometheus as source

    _setup_logging("WARNING", "plain")
    if output not in cluster_status.OUTPUTS:
        raise _fail(ExitCode.USAGE, "-o is table, json or yaml")
    reader = None
    try:
        backend = _cluster_backend(kubeconfig, context, namespace)
        if prometheus_url:
            reader = source.PrometheusSource(
                prometheus_url, namespace=backend.namespace
            )
        found = cluster_status.read_status(
            backend, reader, window_s=source.parse_duration_s(window)
        )
    except ValueError as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    except source.PrometheusError as exc:
        raise _fail(ExitCode.TELEMETRY_FAILED, str(exc)) from exc
    except kube_errors.KubeError as exc:
        raise _fail(_kube_exit_code(exc), str(exc)) from exc
    except cluster_status.StatusError as exc:
        raise _fail(_kube_exit_code(exc.kube_error), str(exc)) from exc
    finally:
        if reader is not None:
            reader.close()
    print(cluster_status.render_status(found, output))


@app.command()
def server(
    mesh: Annotated[
        str, typer.Option(help="URL of the FL clients' Service, through the mesh.")
    ],
    controller: Annotated[str, typer.Option(help="URL of the controller's round API.")],
    app_ref: Annotated[
        str,
        typer.Option("--app", help="The ServerApp as module:attribute."),
    ] = "fl_app.server_app:app",
    per_round: Annotated[
        int, typer.Option("--per-round", "-k", help="Clients per round.")
    ] = 5,
    run_config: Annotated[
        list[str] | None,
        typer.Option(
            help="key=value for the ServerApp's run config (repeatable), "
            "e.g. num-rounds=10.",
            show_default=False,
        ),
    ] = None,
    deadline_s: Annotated[
        float, typer.Option(help="Seconds a round waits for its clients.")
    ] = 600.0,
    health_port: Annotated[
        int, typer.Option(help="Port of /healthz (0: none).")
    ] = 8081,
    max_reply_bytes: Annotated[
        int,
        typer.Option(
            min=1,
            help="A client reply larger than this is refused before it is read "
            "whole; the slot fails and the round goes on.",
        ),
    ] = 64 * 1024 * 1024,
    log_level: LogLevelOpt = "INFO",
    log_format: LogFormatOpt = "plain",
) -> None:
    """Run the FL server in a cluster: a ServerApp over the mesh's routing slots."""
    from meshctl.controller.roundapi import RoundAPIClient, RoundAPIError, TokenError
    from meshctl.flower import serverrole

    _setup_logging(log_level, log_format)
    try:
        settings = serverrole.ServerSettings(
            app_ref=app_ref,
            mesh_url=mesh,
            deadline_s=deadline_s,
            health_port=health_port,
            run_config=serverrole.parse_run_config(run_config or []),
            max_reply_bytes=max_reply_bytes,
        )
        serverrole.check_app_ref(app_ref)
    except (ValueError, serverrole.ServerRoleError) as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    try:
        serverrole.check_controller(controller)  # before the app's heavy imports
    except serverrole.ServerRoleError as exc:
        raise _fail(ExitCode.FAILED, str(exc)) from exc
    try:
        server_app = serverrole.load_app(app_ref)
    except serverrole.ServerRoleError as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    try:
        api = RoundAPIClient(controller, per_round=per_round, timeout_s=deadline_s)
    except TokenError as exc:
        raise _fail(ExitCode.USAGE, str(exc)) from exc
    try:
        serverrole.run(server_app, settings, arm=api.arm, report=api.report)
    except (RoundAPIError, serverrole.ServerRoleError) as exc:
        raise _fail(ExitCode.FAILED, str(exc)) from exc
    finally:
        api.close()


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    app()


if __name__ == "__main__":
    main()
