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
from dataclasses import dataclass
from pathlib import Path

import httpx

from meshctl import protocol
from meshctl.localmesh import processes
from meshctl.types import Workload

log = logging.getLogger("meshctl.workloads")


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
        self._workloads: dict[str, Workload] = {}
        self._health = httpx.Client(timeout=1.0)

    @property
    def workloads(self) -> list[Workload]:
        return list(self._workloads.values())

    def start(self, specs: Sequence[ClientSpec]) -> None:
        """Start one process per spec; returns without waiting for readiness."""
        self._log_dir.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            self._start_one(spec)

    def _start_one(self, spec: ClientSpec) -> None:
        port = free_port(self._host)
        command = [
            sys.executable,
            "-m",
            "meshctl.flower.clientservice",
            f"--app={spec.app}",
            f"--name={spec.name}",
            f"--node-id={spec.node_id}",
            f"--host={self._host}",
            f"--port={port}",
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
        self._workloads[spec.name] = Workload(
            name=spec.name,
            address=self._host,
            port=port,
            labels={
                protocol.APP_LABEL: protocol.APP_VALUE,
                protocol.CLIENT_LABEL: spec.name,
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
                        f"client service {name} exited with code {code}; "
                        f"see {log_path}"
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
        """The clients whose process runs and whose health probe answers 200."""
        names = list(self._workloads) if names is None else names
        return [name for name in names if self._probe(name)]

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
