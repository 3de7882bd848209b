"""Client services as local processes: the embedded stand-in for pods.

Each client service runs in a process of its own, in its own session, on its own
loopback port, with the labels a DestinationRule subset selects it by.  Readiness
is probed on the service's health path, directly and not through the mesh, the
way a kubelet probes a pod.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx

from meshctl import protocol
from meshctl.localmesh import processes
from meshctl.types import Workload

log = logging.getLogger("meshctl.workloads")

PROBE_THREADS = 16  # readiness probes in flight at once


class WorkloadError(RuntimeError):
    """A client service did not start or did not become ready."""


@dataclass(frozen=True)
class ClientSpec:
    """How to start one client service."""

    name: str
    app: str  # the ClientApp, as module:attribute
    node_config: Mapping[str, bool | float | int | str]
    node_id: int = 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _config_text(config: Mapping[str, bool | float | int | str]) -> str:
    parts = []
    for key, value in config.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if any(c.isspace() for c in text) or "=" in key:
            raise ValueError(f"node config {key}={text!r} cannot hold spaces or '='")
        parts.append(f"{key}={text}")
    return " ".join(parts)


class LocalWorkloads:
    """Starts, probes and stops the client service processes."""

    def __init__(self, log_dir: Path, host: str = "127.0.0.1") -> None:
        self._log_dir = Path(log_dir)
        self._host = host
        self._procs: dict[str, subprocess.Popen] = {}
        self._specs: dict[str, ClientSpec] = {}
        self._workloads: dict[str, Workload] = {}
        self._health = httpx.Client(
            timeout=1.0, limits=httpx.Limits(max_connections=PROBE_THREADS)
        )
        self._probes = ThreadPoolExecutor(
            max_workers=PROBE_THREADS, thread_name_prefix="probe"
        )

    @property
    def workloads(self) -> list[Workload]:
        return list(self._workloads.values())

    def start(self, specs: Sequence[ClientSpec], timeout_s: float = 120.0) -> None:
        """Start one process per spec; returns once each has bound its port.

        Each service binds a free port itself and reports it, so no other
        process can take the port between its choice and its bind.  Readiness
        comes later: :meth:`wait_ready`.
        """
        self._log_dir.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            self._start_one(spec)
        deadline = time.monotonic() + timeout_s
        for spec in specs:
            port = self._await_port(spec.name, deadline)
            self._workloads[spec.name] = self._workload(spec.name, port)

    def kill(self, name: str) -> None:
        """Kill one client service at once (SIGKILL), as a crash would."""
        proc = self._process(name)
        _signal(proc, signal.SIGKILL)
        proc.wait()
        log.warning("client service %s (pid %s) was killed", name, proc.pid)

    def restart(self, name: str) -> None:
        """Start a client service again, on the same port; killed first if it runs.

        As a kubelet restarts a container: the same spec and address, so the
        routes that name it need no change.  Returns without waiting for
        readiness; :meth:`ready` says when it answers again.
        """
        proc = self._process(name)
        if proc.poll() is None:  # hung rather than dead: stopped first
            self.kill(name)
        self._start_one(self._specs[name], port=self._workloads[name].port)
        log.warning(
            "client service %s restarted as pid %s", name, self._procs[name].pid
        )

    def pid(self, name: str) -> int:
        """The process id of the client service's current process."""
        return self._process(name).pid

    def alive(self, name: str) -> bool:
        """True while the client service's process runs."""
        return self._process(name).poll() is None

    def _process(self, name: str) -> subprocess.Popen:
        try:
            return self._procs[name]
        except KeyError:
            raise WorkloadError(f"no client service named {name!r}") from None

    def _start_one(self, spec: ClientSpec, port: int = 0) -> None:
        """Start one service process on ``port`` (0: a port of its choosing)."""
        port_file = self._port_file(spec.name)
        port_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "meshctl.flower.clientservice",
            f"--app={spec.app}",
            f"--name={spec.name}",
            f"--node-id={spec.node_id}",
            f"--host={self._host}",
            f"--port={port}",
            f"--port-file={port_file}",
            f"--node-config={_config_text(spec.node_config)}",
        ]
        env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", OMP_NUM_THREADS="1")
        with open(self._log_dir / f"{spec.name}.log", "ab") as out:
            self._procs[spec.name] = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                **processes.child_options(),
            )
        self._specs[spec.name] = spec

    def _port_file(self, name: str) -> Path:
        return self._log_dir / f"{name}.port"

    def _await_port(self, name: str, deadline: float) -> int:
        """The port a starting service reports once it has bound it."""
        port_file = self._port_file(name)
        while True:
            try:
                return int(port_file.read_text())
            except (FileNotFoundError, ValueError):
                pass
            code = self._procs[name].poll()
            if code is not None:
                raise WorkloadError(
                    f"client service {name} exited with code {code} before it "
                    f"bound a port; see {self._log_dir / f'{name}.log'}"
                )
            if time.monotonic() > deadline:
                raise WorkloadError(f"client service {name} bound no port in time")
            time.sleep(0.05)

    def _workload(self, name: str, port: int) -> Workload:
        return Workload(
            name=name,
            address=self._host,
            port=port,
            labels={
                protocol.APP_LABEL: protocol.APP_VALUE,
                protocol.CLIENT_LABEL: name,
            },
        )

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Block until every client answers its health probe; seconds waited."""
        started = time.monotonic()
        pending = set(self._workloads)
        while pending:
            for name in sorted(pending):
                code = self._procs[name].poll()
                if code is not None:
                    log_path = self._log_dir / f"{name}.log"
                    raise WorkloadError(
                        f"client service {name} exited with code {code}; see {log_path}"
                    )
            pending -= set(self.ready(sorted(pending)))
            if time.monotonic() - started > timeout_s:
                raise WorkloadError(
                    f"{len(pending)} client services not ready after {timeout_s:.0f}s: "
                    f"{', '.join(sorted(pending))}"
                )
            if pending:
                time.sleep(0.2)
        return time.monotonic() - started

    def ready(self, names: Sequence[str] | None = None) -> list[str]:
        """The clients whose process runs and whose health probe answers 200.

        The probes run side by side, so that one client that hangs costs the
        caller one probe timeout, not one per client.
        """
        names = list(self._workloads) if names is None else list(names)
        answers = list(self._probes.map(self._probe, names))
        return [name for name, ok in zip(names, answers, strict=True) if ok]

    def _probe(self, name: str) -> bool:
        if self._procs[name].poll() is not None:
            return False
        workload = self._workloads[name]
        url = f"http://{workload.address}:{workload.port}{protocol.HEALTH_PATH}"
        try:
            return self._health.get(url).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, grace_s: float = 3.0) -> None:
        """Terminate every client service, then kill what is left."""
        for proc in self._procs.values():
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
        self._procs.clear()
        self._probes.shutdown(wait=True)
        self._health.close()

    def __enter__(self) -> LocalWorkloads:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal(proc: subprocess.Popen, sig: int) -> None:
    """Signal a client service's whole session, so nothing it started survives."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
