"""One connection to the API server, and plain-dict requests over it.

``connect`` reads a kubeconfig (``--kubeconfig``, ``$KUBECONFIG``, then
``~/.kube/config``) or, inside a pod, the service account.  Its client never
retries on its own (urllib3 would otherwise try every request four times and
log each retry): a command fails at once with "unreachable", and the
controller retries on its own schedule, with back-off.  ``Api`` sends
requests with the official client's transport and returns plain dicts; every
failure becomes a ``meshctl.kube.errors`` class.  ``Api.resource`` finds the
plural and scope of a kind through discovery, as kubectl does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from meshctl.kube import errors

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Resource:
    """A served resource type: where its objects live on the API."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def name(self) -> str:
        """``virtualservices.networking.istio.io``, as RBAC and errors name it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        """The URL path of the collection, or of one object."""
        base = f"/apis/{self.group}/{self.version}" if self.group else "/api/v1"
        if self.namespaced and namespace:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base


def connect(
    kubeconfig: str | Path | None = None, context: str | None = None
) -> k8s_client.ApiClient:
    """An API client from a kubeconfig, or from the pod's service account."""
    path = kubeconfig or os.environ.get("KUBECONFIG")
    default = Path.home() / ".kube" / "config"
    config = k8s_client.Configuration()
    try:
        if path is None and not default.exists():
            k8s_config.load_incluster_config(client_configuration=config)
        else:
            k8s_config.load_kube_config(
                config_file=str(path) if path else None,
                context=context,
                client_configuration=config,
            )
    except (ConfigException, OSError) as exc:
        where = path or default
        raise errors.Unreachable(
            f"no usable kubeconfig ({where}) and not inside a pod: {exc}"
        ) from exc
    config.retries = urllib3.util.Retry(total=0)
    return k8s_client.ApiClient(configuration=config)


def default_namespace(
    kubeconfig: str | Path | None = None, context: str | None = None
) -> str | None:
    """The namespace the kubeconfig's context names, if any."""
    try:
        contexts, active = k8s_config.list_kube_config_contexts(
            config_file=str(kubeconfig) if kubeconfig else None
        )
    except (ConfigException, OSError):
        return None
    chosen = next((c for c in contexts if c["name"] == context), active)
    return (chosen or {}).get("context", {}).get("namespace")


class Api:
    """Plain-dict requests to one API server."""

    def __init__(
        self, api_client: k8s_client.ApiClient, *, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        self.api_client = api_client
        self.timeout_s = timeout_s
        self._resources: dict[tuple[str, str], Resource] = {}

    @property
    def server(self) -> str:
        return self.api_client.configuration.host

    def request(
        self,
        method: str,
        path: str,
        target: errors.Target,
        *,
        query: Iterable[tuple[str, Any]] = (),
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict:
        """Send one request; the answer's JSON, or a ``KubeError``."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        serialized = self.api_client.param_serialize(
            method,
            path,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self.api_client.call_api(
                *serialized, _request_timeout=self.timeout_s
            )
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise errors.Unreachable(
                f"{target}: API server {self.server} unreachable: {_reason(exc)}",
                target=target,
            ) from exc
        except k8s_client.ApiException as exc:
            raise errors.Unreachable(
                f"{target}: API server {self.server}: {exc.reason}", target=target
            ) from exc
        if not 200 <= response.status < 300:
            raise errors.from_response(response.status, data, target)
        return json.loads(data or b"{}")

    def resource(self, api_version: str, kind: str) -> Resource:
        """The resource serving ``kind`` in ``api_version``, from discovery."""
        key = (api_version, kind)
        if key not in self._resources:
            self._discover(api_version)
        if key not in self._resources:
            raise errors.NotFound(
                f"the API server {self.server} serves no {kind} in {api_version}; "
                "install its CustomResourceDefinition first",
                target=errors.Target("discover", api_version),
                status=404,
            )
        return self._resources[key]

    def _discover(self, api_version: str) -> None:
        group, _, version = api_version.rpartition("/")
        path = f"/apis/{group}/{version}" if group else f"/api/{version}"
        target = errors.Target("discover", api_version)
        try:
            listing = self.request("GET", path, target)
        except errors.NotFound:
            return
        for entry in listing.get("resources", []):
            if "/" in entry["name"]:
                continue  # a subresource such as status
            resource = Resource(
                group, version, entry["name"], entry["kind"], entry["namespaced"]
            )
            self._resources[(api_version, entry["kind"])] = resource


def _reason(exc: Exception) -> Exception:
    """What went wrong, without urllib3's "Max retries exceeded" wrapper."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return exc.reason
    return exc
