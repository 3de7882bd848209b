"""Shared fixtures: the real data, Istio's CRDs, tiny HTTP client services and a
real local Envoy mesh."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

from meshctl import protocol
from meshctl.localmesh.envoy import LocalMesh
from meshctl.routing import validate
from meshctl.types import Workload

# `HYPOTHESIS_PROFILE=fuzz` (make fuzz) gives every fuzz test many more examples.
hypothesis_settings.register_profile(
    "fuzz", max_examples=int(os.environ.get("MESHCTL_FUZZ_EXAMPLES", "3000"))
)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The datasets and CRDs live beside the project, in ../shared/data, unless the
# environment names another place.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data directory, or a skip saying how to provide it."""
    path = Path(os.environ.get("MESHCTL_DATA_DIR") or SHARED_DATA)
    if not path.is_dir():
        pytest.skip(f"real data not found at {path}; set MESHCTL_DATA_DIR")
    return path


@pytest.fixture(scope="session")
def crd_path(data_dir: Path) -> Path:
    """Istio's CRDs from ``MESHCTL_ISTIO_CRDS``, else from the data directory."""
    default = data_dir / "istio" / "crd-all.gen.yaml"
    path = Path(os.environ.get("MESHCTL_ISTIO_CRDS") or default)
    if not path.exists():
        pytest.skip(f"Istio CRDs not found at {path}; set MESHCTL_ISTIO_CRDS")
    return path


@pytest.fixture(scope="session")
def istio_schemas(crd_path: Path) -> dict:
    """The CRDs' openAPIV3Schemas as JSON Schemas, loaded once per session."""
    return validate.load_crd_schemas(crd_path)


@dataclass
class Backend:
    """A client service stand-in that answers every request with its name."""

    name: str
    server: ThreadingHTTPServer

    @property
    def workload(self) -> Workload:
        """The workload a subset selects this backend by."""
        labels = {
            protocol.CLIENT_LABEL: self.name,
            protocol.APP_LABEL: protocol.APP_VALUE,
        }
        return Workload(self.name, "127.0.0.1", self.server.server_address[1], labels)


def _handler(
    name: str, delay_s: float, fail_every: int
) -> type[BaseHTTPRequestHandler]:
    """A request handler: sleeps ``delay_s``; every ``fail_every``-th answer is 500."""
    counter = iter(range(1, 1 << 62))
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            with lock:
                count = next(counter)
            time.sleep(delay_s)
            status = 500 if fail_every and count % fail_every == 0 else 200
            body = name.encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def http_backends() -> Iterator[Callable[..., Backend]]:
    """Start named HTTP backends on loopback: ``start(name, delay_s=, fail_every=)``."""
    servers: list[ThreadingHTTPServer] = []

    def start(name: str, *, delay_s: float = 0.0, fail_every: int = 0) -> Backend:
        server = ThreadingHTTPServer(
            ("127.0.0.1", 0), _handler(name, delay_s, fail_every)
        )
        servers.append(server)
        serve = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        serve.start()
        return Backend(name, server)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prometheus per session on loopback, fed by remote write; its URL.

    Skips, naming the Debian package, where no ``prometheus`` binary exists.
    """
    from tests import prometheus_support

    if prometheus_support.find_prometheus() is None:
        pytest.skip(prometheus_support.skip_message())
    server = prometheus_support.PrometheusProcess(
        tmp_path_factory.mktemp("prometheus"), scrape_interval="5s"
    ).start()
    yield server.url
    server.stop()


@pytest.fixture
def local_mesh(tmp_path: Path) -> Iterator[Callable[..., LocalMesh]]:
    """Start real Envoy meshes in ``tmp_path``; every one is stopped at teardown."""
    meshes: list[LocalMesh] = []

    def start(workloads: list[Workload], **options: object) -> LocalMesh:
        work_dir = tmp_path / f"mesh-{len(meshes)}"
        mesh = LocalMesh(work_dir, workloads=workloads, **options)
        meshes.append(mesh)
        return mesh.start()

    yield start
    for mesh in meshes:
        mesh.stop()


@pytest.fixture
def fake_kube(crd_path: Path) -> Iterator:
    """A fake Kubernetes API server over HTTP serving Istio's CRDs, with the
    namespace ``fl``; stopped at teardown."""
    from tests.fakekube import FakeKube

    with FakeKube(crd_path, namespaces=("default", "fl")) as server:
        yield server


@pytest.fixture
def kubeconfig(fake_kube, tmp_path: Path) -> Path:
    """A kubeconfig whose current context points at ``fake_kube``."""
    return fake_kube.write_kubeconfig(tmp_path / "kubeconfig")
