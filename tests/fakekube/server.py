"""A fake Kubernetes API server over real HTTP, for the official client.

It serves discovery, the core and apps types meshctl's manifests use, and
every custom resource of a CRD file (Istio's).  Faithful where meshctl's
correctness depends on it:

- one resource-version counter; ``uid``, ``generation``, ``creationTimestamp``;
- 201 on create, 409 ``AlreadyExists``, 404 ``NotFound`` as ``Status`` objects;
- PUT, merge patch and JSON patch, with 409 ``Conflict`` when the body carries
  a ``resourceVersion`` that is not the current one (a stale write);
- server-side apply (``application/apply-patch+yaml``) with ``managedFields``
  per manager, 409 on conflicting fields unless ``force``, and removal of
  fields an applier stops applying;
- watch (``?watch=true``): chunked JSON lines, from a resource version or
  with the current objects first, ``timeoutSeconds``, 410 once compacted;
- ``dryRun=All``; custom resources checked against their CRD schema (422);
- RBAC from Role rules (403 naming verb, resource and namespace).

Simplified: every list is atomic for apply and strategic merge (true of the
Istio CRDs, not of Pod containers); no admission, defaulting or status.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from meshctl.routing import validate
from tests.fakekube import store as st

DEFAULT_USER = "system:serviceaccount:fl:meshctl-controller"
_PATCH_TYPES = {
    "application/merge-patch+json": "merge",
    "application/json-patch+json": "json",
    "application/strategic-merge-patch+json": "strategic",
    "application/apply-patch+yaml": "apply",
}


class FakeKube:
    """The fake API server: start it, point a kubeconfig at it, inspect it."""

    def __init__(
        self,
        crd_path: str | Path | None = None,
        *,
        extra_types: Iterable[st.ResourceType] = (),
        namespaces: Iterable[str] = ("default", "kube-system"),
        user: str = DEFAULT_USER,
    ) -> None:
        types = [*st.BUILTIN_TYPES, *extra_types]
        schemas: Mapping = {}
        strict: Mapping = {}
        if crd_path is not None:
            crd_types, schemas, strict = _load_crds(str(crd_path))
            types += crd_types
        self.store = st.Store(types, schemas)
        self.store.set_strict_schemas(strict)
        self.user = user
        self.rules: list[dict] | None = None
        # (method, path, status) of every resource request, in order.
        self.requests: list[tuple[str, str, int]] = []
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        for ns in namespaces:
            self.put(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
            )

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> FakeKube:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self.store.changed:
            self.store.changed.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeKube:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def url(self) -> str:
        assert self._server is not None, "start the fake API server first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- clients ----------------------------------------------------------------

    def write_kubeconfig(
        self, path: str | Path, *, context: str = "fake", namespace: str | None = None
    ) -> Path:
        """A kubeconfig whose current context points at this server."""
        ctx: dict[str, Any] = {"cluster": "fake", "user": "fake"}
        if namespace:
            ctx["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": context, "context": ctx}],
            "current-context": context,
        }
        path = Path(path)
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        return path

    # --- test helpers (no RBAC, no HTTP) -----------------------------------------

    def resource_type(self, api_version: str, kind: str) -> st.ResourceType:
        group, _, version = api_version.rpartition("/")
        for rtype in self.store.types:
            if (rtype.group, rtype.version, rtype.kind) == (group, version, kind):
                return rtype
        raise KeyError(f"{api_version} {kind} is not served")

    def put(self, obj: dict, *, manager: str = "kubectl-edit") -> dict:
        """Create the object, or update it unconditionally, as ``manager``."""
        rtype = self.resource_type(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        ns = meta.get("namespace") if rtype.namespaced else None
        body = json.loads(json.dumps(obj))
        body["metadata"].pop("resourceVersion", None)
        opts = st.WriteOptions(field_manager=manager)
        if store_has(self.store, rtype, ns, meta["name"]):
            return self.store.replace(rtype, ns, meta["name"], body, opts)
        return self.store.create(rtype, ns, body, opts)

    def get(self, api_version: str, kind: str, name: str, namespace: str | None = None):
        """The stored object, or ``None``."""
        rtype = self.resource_type(api_version, kind)
        try:
            return self.store.get(rtype, namespace if rtype.namespaced else None, name)
        except st.ApiError:
            return None

    def allow_only(self, rules: list[dict] | None) -> None:
        """Authorise requests by these Role rules; ``None`` allows everything."""
        self.rules = rules

    def authorised(self, verb: str, rtype: st.ResourceType, name: str | None) -> bool:
        if self.rules is None:
            return True
        return any(_rule_allows(rule, verb, rtype, name) for rule in self.rules)


@functools.cache
def _load_crds(crd_path: str) -> tuple[list[st.ResourceType], dict, dict]:
    """Resource types and schemas of a CRD file, parsed once per process."""
    return (
        st.crd_types(crd_path),
        validate.load_crd_schemas(crd_path, reject_unknown_fields=False),
        validate.load_crd_schemas(crd_path),
    )


def _rule_allows(rule: Mapping, verb: str, rtype: st.ResourceType, name: str | None):
    def has(key: str, value: str) -> bool:
        values = rule.get(key) or []
        return "*" in values or value in values

    names = rule.get("resourceNames")
    return (
        has("apiGroups", rtype.group)
        and has("resources", rtype.plural)
        and has("verbs", verb)
        and (not names or name in names)
    )


# --- HTTP ---------------------------------------------------------------------


def _handler(fake: FakeKube) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.fake = fake
    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    fake: FakeKube

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._serve("PUT")

    def do_PATCH(self) -> None:  # noqa: N802
        self._serve("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._serve("DELETE")

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass

    # --- dispatch ---------------------------------------------------------------

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(url.query).items()}
        body = self._read_body()
        try:
            discovery = self._discovery(method, url.path)
            if discovery is not None:
                self._send(HTTPStatus.OK, discovery)
                return
            self._resource(method, url.path, params, body)
        except st.ApiError as exc:
            self._send(exc.code, exc.status())

    def _read_body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _discovery(self, method: str, path: str) -> dict | None:
        """Answers for /version, /api, /apis and the group-version lists."""
        parts = [p for p in path.split("/") if p]
        if method != "GET":
            return None
        types = self.fake.store.types
        if parts == ["version"]:
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fakekube"}
        if parts == ["api"]:
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [],
            }
        if parts == ["apis"]:
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": _groups(types),
            }
        if len(parts) == 2 and parts[0] == "apis":
            for group in _groups(types):
                if group["name"] == parts[1]:
                    return {"kind": "APIGroup", "apiVersion": "v1", **group}
            raise st.ApiError(
                404, "NotFound", "the server could not find the requested resource"
            )
        if parts == ["api", "v1"] or (len(parts) == 3 and parts[0] == "apis"):
            group = "" if parts[0] == "api" else parts[1]
            version = parts[-1]
            resources = [
                t.discovery() for t in types if (t.group, t.version) == (group, version)
            ]
            if not resources:
                raise st.ApiError(
                    404, "NotFound", "the server could not find the requested resource"
                )
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": resources,
            }
        return None

    def _resource(self, method: str, path: str, params: dict, body: bytes) -> None:
        rtype, ns, name = self._parse_path(path)
        watch = params.get("watch") in ("true", "1")
        verb = _verb(method, name, watch)
        if not self.fake.authorised(verb, rtype, name or _selected_name(params)):
            raise st.forbidden(rtype, name, verb, ns, self.fake.user)

        store = self.fake.store
        if verb == "watch":
            self._watch(rtype, ns, params)
        elif verb == "list":
            selectors = st.Selectors.parse(
                params.get("labelSelector", ""), params.get("fieldSelector", "")
            )
            self._send(HTTPStatus.OK, store.list(rtype, ns, selectors))
        elif verb == "get":
            self._send(HTTPStatus.OK, store.get(rtype, ns, name))
        elif verb == "delete":
            self._send(HTTPStatus.OK, store.delete(rtype, ns, name, _dry_run(params)))
        else:
            self._write(verb, rtype, ns, name, params, body)

    def _write(self, verb, rtype, ns, name, params, body: bytes) -> None:
        content_type = (self.headers.get("content-type") or "").split(";")[0].strip()
        opts = st.WriteOptions(
            field_manager=params.get("fieldManager") or self._default_manager(),
            dry_run=_dry_run(params),
            force=params.get("force") in ("true", "1"),
            strict_fields=params.get("fieldValidation") == "Strict",
        )
        store = self.fake.store
        if verb == "create":
            created = store.create(rtype, ns, _json(body), opts)
            self._send(HTTPStatus.CREATED, created)
        elif verb == "update":
            self._send(HTTPStatus.OK, store.replace(rtype, ns, name, _json(body), opts))
        else:
            patch_type = _PATCH_TYPES.get(content_type)
            if patch_type is None:
                raise st.ApiError(
                    415,
                    "UnsupportedMediaType",
                    f"unsupported patch type {content_type!r}",
                )
            if patch_type == "apply":
                opts = st.WriteOptions(
                    **{**opts.__dict__, "field_manager": params.get("fieldManager", "")}
                )
                patch = _yaml(body)
                exists = store_has(store, rtype, ns, name)
                result = store.patch(rtype, ns, name, patch_type, patch, opts)
                self._send(HTTPStatus.OK if exists else HTTPStatus.CREATED, result)
                return
            result = store.patch(rtype, ns, name, patch_type, _json(body), opts)
            self._send(HTTPStatus.OK, result)

    def _default_manager(self) -> str:
        """What the real server uses without ``fieldManager``: the user agent's name."""
        agent = self.headers.get("user-agent") or "unknown"
        return agent.split("/")[0] or "unknown"

    def _parse_path(self, path: str) -> tuple[st.ResourceType, str | None, str | None]:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise st.ApiError(
                404, "NotFound", "the server could not find the requested resource"
            )
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        if len(rest) not in (1, 2):
            raise st.ApiError(
                404, "NotFound", "the server could not find the requested resource"
            )
        rtype = self.fake.store.find_type(group, version, rest[0])
        if rtype is None or (rtype.namespaced is False and ns is not None):
            raise st.ApiError(
                404, "NotFound", "the server could not find the requested resource"
            )
        return rtype, ns, rest[1] if len(rest) == 2 else None

    # --- responses --------------------------------------------------------------

    def _send(self, status: int, payload: dict) -> None:
        if not self.path.startswith(
            ("/api?", "/apis?", "/version")
        ) and self.path not in (
            "/api",
            "/apis",
        ):
            self.fake.requests.append(
                (self.command, urlsplit(self.path).path, int(status))
            )
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, rtype: st.ResourceType, ns: str | None, params: dict) -> None:
        """Stream events as chunked JSON lines until the timeout or shutdown."""
        store = self.fake.store
        selectors = st.Selectors.parse(
            params.get("labelSelector", ""), params.get("fieldSelector", "")
        )
        timeout_s = float(params.get("timeoutSeconds") or 300)
        start = params.get("resourceVersion") or "0"
        with store.changed:
            if start == "0":
                listing = store.list(rtype, ns, selectors)["items"]
                first = [{"type": "ADDED", "object": o} for o in listing]
                since = store.revision
            elif int(start) < store.compacted_revision:
                first, since = [_expired(start)], None
            else:
                first, since = [], int(start)

        self.fake.requests.append(("GET", urlsplit(self.path).path, 200))
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for event in first:
                self._chunk(event)
            if since is not None:
                self._stream(rtype, ns, selectors, since, time.monotonic() + timeout_s)
            self.wfile.write(b"0\r\n\r\n")

    def _stream(self, rtype, ns, selectors, since: int, deadline: float) -> None:
        store = self.fake.store
        while not self.fake.stopping and time.monotonic() < deadline:
            with store.changed:
                pending = [e for e in store.events if e.resource_version > since]
                if not pending:
                    store.changed.wait(
                        timeout=min(0.2, max(deadline - time.monotonic(), 0))
                    )
                    continue
            since = pending[-1].resource_version
            for event in pending:
                if _watched(event, rtype, ns, selectors):
                    obj = dict(event.obj, apiVersion=rtype.api_version)
                    self._chunk({"type": event.type, "object": obj})

    def _chunk(self, event: dict) -> None:
        data = json.dumps(event).encode("utf-8") + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


def store_has(
    store: st.Store, rtype: st.ResourceType, ns: str | None, name: str
) -> bool:
    try:
        store.get(rtype, ns, name)
    except st.ApiError:
        return False
    return True


def _watched(event: st.Event, rtype, ns, selectors: st.Selectors) -> bool:
    if (event.group, event.plural) != (rtype.group, rtype.plural):
        return False
    if ns is not None and event.obj["metadata"].get("namespace") != ns:
        return False
    return selectors.match(event.obj)


def _expired(start: str) -> dict:
    status = st.ApiError(410, "Expired", f"too old resource version: {start}").status()
    return {"type": "ERROR", "object": status}


def _selected_name(params: dict) -> str | None:
    """The name a list or watch selects with ``metadata.name=``, which RBAC's
    ``resourceNames`` authorise as a request for that one object."""
    for term in (params.get("fieldSelector") or "").split(","):
        key, _, value = term.partition("=")
        if key.strip() == "metadata.name":
            return value.lstrip("=").strip()  # "=" and "==" both select
    return None


def _verb(method: str, name: str | None, watch: bool) -> str:
    if method == "GET":
        return "watch" if watch else ("get" if name else "list")
    if method == "POST" and name is None:
        return "create"
    verbs = {"PUT": "update", "PATCH": "patch", "DELETE": "delete"}
    if name is None or method not in verbs:
        raise st.ApiError(405, "MethodNotAllowed", f"{method} is not allowed here")
    return verbs[method]


def _dry_run(params: dict) -> bool:
    return params.get("dryRun") == "All"


def _json(body: bytes) -> Any:
    try:
        return json.loads(body or b"null")
    except ValueError as exc:
        raise st.ApiError(400, "BadRequest", f"the body is not JSON: {exc}") from exc


def _yaml(body: bytes) -> Any:
    try:
        return yaml.safe_load(body or b"")
    except yaml.YAMLError as exc:
        raise st.ApiError(400, "BadRequest", f"the body is not YAML: {exc}") from exc


def _groups(types: Iterable[st.ResourceType]) -> list[dict]:
    """``APIGroup`` entries; ``v1`` is preferred where a group serves it."""
    versions: dict[str, list[str]] = {}
    for rtype in types:
        if rtype.group and rtype.version not in versions.setdefault(rtype.group, []):
            versions[rtype.group].append(rtype.version)
    return [
        {
            "name": group,
            "versions": [
                {"groupVersion": f"{group}/{v}", "version": v} for v in listed
            ],
            "preferredVersion": {"groupVersion": f"{group}/{best}", "version": best},
        }
        for group, listed in versions.items()
        for best in ["v1" if "v1" in listed else listed[0]]
    ]
