"""A real Prometheus beside the local mesh, started and stopped like Envoy.

:class:`LocalPrometheus` runs Debian's ``prometheus`` binary on loopback with a
config it is given (see :mod:`meshctl.telemetry.localprom`) and a TSDB in its
work directory.  It is a managed child (:mod:`meshctl.localmesh.processes`): in
a session of its own, stopped by its pid, and told to end when its parent dies.
Prometheus scrapes for the first time about five seconds after it starts, so
start it before the processes whose data is wanted early.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from meshctl.localmesh import processes
from meshctl.localmesh.workloads import free_port

log = logging.getLogger(__name__)

DEBIAN_PACKAGE = "prometheus"
_LOOPBACK = "127.0.0.1"


class PrometheusProcessError(RuntimeError):
    """The local Prometheus is not installed, did not start or stopped."""


def find_prometheus() -> str:
    """The ``prometheus`` binary on PATH, or an error naming the package."""
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusProcessError(
            "no prometheus binary on PATH; install Debian's package with "
            f"`apt-get install --no-install-recommends {DEBIAN_PACKAGE}`, "
            "or give --prometheus-url of a Prometheus of your own"
        )
    return found


class LocalPrometheus:
    """One Prometheus process on loopback; a context manager.

    ``config`` is the whole Prometheus config as a dict; ``work_dir`` receives
    ``prometheus.yml``, the TSDB and ``prometheus.log``.
    """

    def __init__(
        self,
        work_dir: Path,
        config: dict,
        *,
        port: int = 0,
        ready_timeout_s: float = 20.0,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.config = config
        self.port = port
        self.ready_timeout_s = ready_timeout_s
        self.config_path = self.work_dir / "prometheus.yml"
        self.log_path = self.work_dir / "prometheus.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of Prometheus' HTTP API."""
        return f"http://{_LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The process id, or None when stopped."""
        return self._process.pid if self._process is not None else None

    def start(self) -> LocalPrometheus:
        """Write the config, start Prometheus and wait until ``/-/ready`` is 200."""
        binary = find_prometheus()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(_LOOPBACK)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        command = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.work_dir / 'tsdb'}",
            f"--web.listen-address={_LOOPBACK}:{self.port}",
            "--storage.tsdb.retention.time=1d",
            "--log.level=warn",
        ]
        with open(self.log_path, "ab") as output:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                **processes.child_options(),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("Prometheus pid %s serves %s", self.pid, self.url)
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(timeout=1.0) as http:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise PrometheusProcessError(
                        f"prometheus exited with code {self._process.returncode}; "
                        f"see {self.log_path}"
                    )
                try:
                    if http.get(f"{self.url}/-/ready").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        raise PrometheusProcessError(
            f"prometheus not ready on {self.url} after {self.ready_timeout_s:.0f}s; "
            f"see {self.log_path}"
        )

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop Prometheus by its pid: SIGTERM, then SIGKILL after ``grace_s``."""
        process, self._process = self._process, None
        processes.stop(process, "Prometheus", grace_s)

    def __enter__(self) -> LocalPrometheus:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
