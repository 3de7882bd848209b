"""A real Prometheus for tests, and known series pushed into it.

:class:`PrometheusProcess` runs Debian's ``prometheus`` on loopback with its own
config and a temporary TSDB.  :func:`remote_write` pushes exact samples through the
remote-write receiver, so a test knows every figure a query must return: the
samples are queryable as soon as the push returns, with no scrape to wait for.

The remote-write body is a ``WriteRequest`` protobuf compressed with snappy's
block format.  Both are small enough to write by hand here: the message has four
field kinds, and snappy allows a block made only of literals.
"""

from __future__ import annotations

import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

DEBIAN_PACKAGE = "prometheus"


def find_prometheus() -> str | None:
    """The ``prometheus`` binary on PATH, or None."""
    return shutil.which("prometheus")


def skip_message() -> str:
    """Why a Prometheus test cannot run, and how to make it run."""
    return (
        "no prometheus binary on PATH; install Debian's package: "
        f"apt-get install -y --no-install-recommends {DEBIAN_PACKAGE}"
    )


# ---------------------------------------------------------------- remote write


@dataclass(frozen=True)
class Series:
    """One series and its samples as ``(unix seconds, value)`` pairs."""

    labels: Mapping[str, str]
    samples: Sequence[tuple[float, float]]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _label(name: str, value: str) -> bytes:
    return _field(1, name.encode()) + _field(2, value.encode())


def _sample(timestamp_s: float, value: float) -> bytes:
    # value: field 1, fixed 64-bit double; timestamp: field 2, varint milliseconds.
    return (
        b"\x09"
        + struct.pack("<d", value)
        + b"\x10"
        + _varint(round(timestamp_s * 1000))
    )


def write_request(series: Iterable[Series]) -> bytes:
    """A remote-write ``WriteRequest`` holding ``series``, serialised."""
    body = b""
    for item in series:
        payload = b"".join(
            _field(1, _label(name, value))
            for name, value in sorted(item.labels.items())
        )
        payload += b"".join(_field(2, _sample(t, v)) for t, v in item.samples)
        body += _field(1, payload)
    return body


def snappy_block(data: bytes) -> bytes:
    """``data`` in snappy's block format, as literals only (valid, uncompressed)."""
    out = bytearray(_varint(len(data)))
    for start in range(0, len(data), 65536):
        chunk = data[start : start + 65536]
        size = len(chunk) - 1
        if size < 60:
            out.append(size << 2)
        elif size < 256:
            out += bytes([60 << 2, size])
        else:
            out += bytes([61 << 2]) + struct.pack("<H", size)
        out += chunk
    return bytes(out)


def remote_write(url: str, series: Iterable[Series]) -> None:
    """Push ``series`` to a Prometheus remote-write receiver at ``url``."""
    response = httpx.post(
        f"{url}/api/v1/write",
        content=snappy_block(write_request(series)),
        headers={
            "content-encoding": "snappy",
            "content-type": "application/x-protobuf",
            "x-prometheus-remote-write-version": "0.1.0",
        },
        timeout=5.0,
    )
    response.raise_for_status()


def counter(
    labels: Mapping[str, str],
    *,
    end_s: float,
    per_s: float,
    span_s: float = 300.0,
    step_s: float = 1.0,
    start_value: float = 1000.0,
) -> Series:
    """A counter rising by ``per_s`` every second until ``end_s``."""
    steps = int(span_s / step_s)
    return Series(
        labels,
        [
            (end_s - span_s + i * step_s, start_value + per_s * i * step_s)
            for i in range(steps + 1)
        ],
    )


# ---------------------------------------------------------------- the process


class PrometheusProcess:
    """One Prometheus on loopback, with its own config and TSDB in ``work_dir``."""

    def __init__(
        self,
        work_dir: Path,
        *,
        scrape_interval: str = "15s",
        scrape_configs: Sequence[dict] = (),
        rule_files: Sequence[Path] = (),
        port: int = 0,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.scrape_interval = scrape_interval
        self.scrape_configs = list(scrape_configs)
        self.rule_files = list(rule_files)
        self.port = port
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> PrometheusProcess:
        """Start Prometheus and wait until ``/-/ready`` answers 200."""
        from meshctl.localmesh.workloads import free_port

        binary = find_prometheus()
        if binary is None:
            raise RuntimeError(skip_message())
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        config = self.work_dir / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {
                        "scrape_interval": self.scrape_interval,
                        "evaluation_interval": self.scrape_interval,
                    },
                    "storage": {"tsdb": {"out_of_order_time_window": "1h"}},
                    "rule_files": [str(p) for p in self.rule_files],
                    "scrape_configs": self.scrape_configs,
                }
            )
        )
        log = open(self.work_dir / "prometheus.log", "ab")  # noqa: SIM115
        self._proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.work_dir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-remote-write-receiver",
                "--storage.tsdb.retention.time=1d",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with code {self._proc.returncode}; "
                    f"see {self.work_dir / 'prometheus.log'}"
                )
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"prometheus not ready on {self.url} in {timeout_s:.0f}s")

    def stop(self) -> None:
        """Stop Prometheus by its pid; kill it if it does not exit in 5 s."""
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
