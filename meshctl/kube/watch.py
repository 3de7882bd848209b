"""Watching one object on the API server, event by event as the server sends them.

``ObjectWatch.events(resource_version)`` opens a watch (``?watch=true``) on one
named object and yields each event as it arrives.  The stream ends when the
server closes it (``timeoutSeconds``) or ``close()`` is called from another
thread; a resource version the server has compacted away raises ``Expired``,
after which the caller reads the object again and watches from there.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import urllib3
from kubernetes import client as k8s_client

from meshctl.kube import errors
from meshctl.kube.client import Api, Resource

DEFAULT_WATCH_TIMEOUT_S = 240.0
# The client waits this much longer than the server's own watch timeout.
_READ_MARGIN_S = 15.0


class Expired(errors.KubeError):
    """410: the resource version to watch from is too old; read again first."""


@dataclass(frozen=True)
class WatchEvent:
    """One change: ``ADDED``, ``MODIFIED``, ``DELETED`` or ``BOOKMARK``."""

    type: str
    obj: dict

    @property
    def resource_version(self) -> str:
        return str(self.obj.get("metadata", {}).get("resourceVersion") or "")


class ObjectWatch:
    """A watch on the object ``name`` of ``resource`` in ``namespace``."""

    def __init__(
        self,
        api: Api,
        resource: Resource,
        namespace: str,
        name: str,
        *,
        timeout_s: float = DEFAULT_WATCH_TIMEOUT_S,
    ) -> None:
        self.api = api
        self.resource = resource
        self.namespace = namespace
        self.name = name
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._closed = False

    @property
    def target(self) -> errors.Target:
        return errors.Target("watch", self.resource.name, self.namespace, self.name)

    def events(self, resource_version: str | None) -> Iterator[WatchEvent]:
        """The events after ``resource_version``, until the server ends the stream."""
        response = self._open(resource_version)
        try:
            for line in _lines(response):
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    raise self._error(event.get("object") or {})
                yield WatchEvent(str(event.get("type")), event.get("object") or {})
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            if self._closed:
                return
            raise errors.Unreachable(
                f"{self.target}: the watch stream broke: {exc}", target=self.target
            ) from exc
        finally:
            with self._lock:
                self._response = None
            response.release_conn()

    def close(self) -> None:
        """End the stream now, from any thread; ``events`` then returns."""
        with self._lock:
            self._closed = True
            response = self._response
        if response is not None:
            response.shutdown()

    def _open(self, resource_version: str | None) -> urllib3.BaseHTTPResponse:
        query = [
            ("watch", "true"),
            ("fieldSelector", f"metadata.name={self.name}"),
            ("timeoutSeconds", str(int(self.timeout_s))),
            ("allowWatchBookmarks", "true"),
        ]
        if resource_version:
            query.append(("resourceVersion", resource_version))
        client = self.api.api_client
        serialized = client.param_serialize(
            "GET",
            self.resource.path(self.namespace),
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            answer = client.call_api(
                *serialized,
                _request_timeout=(self.api.timeout_s, self.timeout_s + _READ_MARGIN_S),
            )
        except (urllib3.exceptions.HTTPError, OSError, k8s_client.ApiException) as exc:
            raise errors.Unreachable(
                f"{self.target}: API server {self.api.server} unreachable: {exc}",
                target=self.target,
            ) from exc
        if answer.status != 200:
            raise errors.from_response(answer.status, answer.read(), self.target)
        with self._lock:
            self._response = answer.response
            if self._closed:
                answer.response.shutdown()
        return answer.response

    def _error(self, status: dict) -> errors.KubeError:
        code = int(status.get("code") or 0)
        if code == 410:
            return Expired(
                f"{self.target}: {status.get('message', 'resource version expired')}",
                target=self.target,
                status=410,
                reason=str(status.get("reason") or "Expired"),
            )
        return errors.from_response(code, json.dumps(status), self.target)


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """The stream's lines as they arrive, one JSON event each."""
    pending = b""
    chunks = (
        response.read_chunked(decode_content=True)
        if response.chunked
        else response.stream(4096)
    )
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line.strip())
    if pending.strip():
        yield pending
