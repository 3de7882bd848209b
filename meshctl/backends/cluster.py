"""Routing objects in a cluster: the VirtualService and DestinationRule on the API.

The same interface as the directory backend (``read``, ``write``,
``apply_plan``), on a real API server.  Writes are server-side apply under the
field manager ``meshctl`` and send only the fields meshctl owns:

- VirtualService: ``spec.http`` (a list the Istio CRD makes atomic, so meshctl
  sends it whole, with the user's routes kept in their place), the label
  ``app.kubernetes.io/managed-by`` and the annotation ``meshctl.io/routing-version``;
- DestinationRule: ``spec.subsets`` (atomic too, the user's subsets kept), the
  same label, and the annotations ``meshctl.io/routing-version`` and
  ``meshctl.io/owned-subsets``.

Every apply carries the ``resourceVersion`` the object was rendered from, so a
write based on a stale read gets 409 and changes nothing.  meshctl then
re-reads the object, moves its own routes or subsets onto the fresh one (the
other writer's change survives) and applies again, a bounded number of times.
Since the body is always based on the latest version, forcing the ownership of
those fields loses nobody's change.  An object that does not exist yet is
created whole (its traffic policy included), so later applies never drop a
field meshctl does not own.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from meshctl import protocol
from meshctl.kube import client as kube
from meshctl.kube import errors
from meshctl.routing import plan, render, validate
from meshctl.routing.errors import RoutingError
from meshctl.routing.plan import Step

log = logging.getLogger(__name__)

FIELD_MANAGER = "meshctl"
DEFAULT_MAX_ATTEMPTS = 5
_API_VERSION = render.API_VERSION
_OWNED_ANNOTATIONS = {
    validate.VIRTUAL_SERVICE: (protocol.ROUTING_VERSION_ANNOTATION,),
    validate.DESTINATION_RULE: (
        protocol.ROUTING_VERSION_ANNOTATION,
        render.OWNED_SUBSETS_ANNOTATION,
    ),
}
_OWNED_SPEC = {validate.VIRTUAL_SERVICE: "http", validate.DESTINATION_RULE: "subsets"}


class ClusterBackendError(RoutingError):
    """A routing write failed on the API server; ``kube_error`` says how."""

    def __init__(self, message: str, kube_error: errors.KubeError | None = None):
        super().__init__(message)
        self.kube_error = kube_error


class ClusterBackend:
    """Reads and writes the routing objects of one namespace on an API server."""

    def __init__(
        self,
        api: kube.Api,
        *,
        namespace: str = "fl",
        name: str = protocol.SERVICE_HOST,
        field_manager: str = FIELD_MANAGER,
        schemas: Mapping[validate.SchemaKey, dict] | None = None,
        budget_bytes: int = render.DEFAULT_SIZE_BUDGET_BYTES,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.field_manager = field_manager
        self._schemas = schemas
        self._budget_bytes = budget_bytes
        self.max_attempts = max_attempts

    # --- reading ----------------------------------------------------------------

    def read(self) -> tuple[dict | None, dict | None]:
        """The live VirtualService and DestinationRule; ``None`` for a missing one."""
        try:
            return (
                self._get(validate.VIRTUAL_SERVICE),
                self._get(validate.DESTINATION_RULE),
            )
        except errors.KubeError as exc:
            raise ClusterBackendError(f"cannot read the routes: {exc}", exc) from exc

    def ready_clients(self, app: str = protocol.APP_VALUE) -> set[str]:
        """Names of the client pods whose Ready condition is true."""
        return {name for name, ready in self.client_pods(app).items() if ready}

    def client_pods(self, app: str = protocol.APP_VALUE) -> dict[str, bool]:
        """Every client pod's name and whether its Ready condition is true."""
        pods = self.api.resource("v1", "Pod")
        target = errors.Target("list", pods.name, self.namespace)
        listing = self.api.request(
            "GET",
            pods.path(self.namespace),
            target,
            query=[("labelSelector", f"{protocol.APP_LABEL}={app}")],
        )
        return {
            pod["metadata"]["name"]: _is_ready(pod) for pod in listing.get("items", [])
        }

    def _get(self, kind: str) -> dict | None:
        resource = self.api.resource(_API_VERSION, kind)
        target = errors.Target("get", resource.name, self.namespace, self.name)
        try:
            return self.api.request(
                "GET", resource.path(self.namespace, self.name), target
            )
        except errors.NotFound:
            return None

    # --- writing ----------------------------------------------------------------

    def write(self, obj: dict) -> dict:
        """Validate, then apply meshctl's fields; the object the server stored.

        A 409 re-reads the object and applies meshctl's fields onto the fresh
        version, at most ``max_attempts`` times in all.
        """
        intended = _plain_copy(obj)
        kind = str(intended.get("kind"))
        if kind not in _OWNED_SPEC:
            raise RoutingError(
                f"{kind!r}: the cluster backend writes only {', '.join(_OWNED_SPEC)}"
            )
        self._check(intended)
        for attempt in range(1, self.max_attempts + 1):
            try:
                stored = self._send(intended)
            except errors.Conflict as exc:
                if attempt == self.max_attempts:
                    raise ClusterBackendError(
                        f"{validate.object_label(intended)}: still in conflict after "
                        f"{attempt} attempts ({exc}); the live object is unchanged",
                        exc,
                    ) from exc
                log.info(
                    "%s: %s; re-reading and applying again (attempt %d of %d)",
                    validate.object_label(intended),
                    exc.reason or "conflict",
                    attempt + 1,
                    self.max_attempts,
                )
                intended = self._rebased(intended)
            except errors.KubeError as exc:
                raise ClusterBackendError(str(exc), exc) from exc
            else:
                log.info(
                    "applied %s (routing version %s, resourceVersion %s)",
                    validate.object_label(stored),
                    _annotation(stored, protocol.ROUTING_VERSION_ANNOTATION),
                    stored["metadata"].get("resourceVersion"),
                )
                return stored
        raise AssertionError("unreachable")  # pragma: no cover

    def apply_plan(
        self, steps: Sequence[Step], wait: Callable[[Step], float]
    ) -> list[float]:
        """Write the steps in order, waiting after each; the seconds each wait took.

        On a failure the cluster keeps the state of the last step that
        succeeded, and the error names the step that failed.
        """
        try:
            return plan.apply_steps(steps, self.write, wait, "the cluster")
        except plan.StepFailed as exc:
            cause = exc.__cause__
            kube_error = (
                cause.kube_error if isinstance(cause, ClusterBackendError) else None
            )
            raise ClusterBackendError(str(exc), kube_error) from cause

    def _send(self, intended: dict) -> dict:
        """Create the object whole, or apply meshctl's fields of it."""
        resource = self.api.resource(_API_VERSION, intended["kind"])
        version = intended["metadata"].get("resourceVersion")
        query = [("fieldManager", self.field_manager)]
        if not version:
            target = errors.Target("create", resource.name, self.namespace, self.name)
            return self.api.request(
                "POST",
                resource.path(self.namespace),
                target,
                query=query,
                body=_without_server_fields(intended),
            )
        target = errors.Target("patch", resource.name, self.namespace, self.name)
        return self.api.request(
            "PATCH",
            resource.path(self.namespace, self.name),
            target,
            query=[*query, ("force", "true")],
            body=owned_fields(intended),
            content_type=kube.APPLY_PATCH,
        )

    def _rebased(self, intended: dict) -> dict:
        """meshctl's part of ``intended`` moved onto the freshly read object."""
        live_vs, live_dr = self.read()
        if intended["kind"] == validate.VIRTUAL_SERVICE:
            rebased = rebase_virtual_service(intended, live_vs)
        else:
            rebased = rebase_destination_rule(intended, live_dr, live_vs)
        self._check(rebased)
        return rebased

    def _check(self, obj: dict) -> None:
        """meshctl's rules and the CRD schema, then the size budget."""
        problems = validate.validate_objects(
            [obj], source="cluster", schemas=self._schemas
        )
        if problems:
            listed = "\n  ".join(str(p) for p in problems)
            raise RoutingError(
                f"{validate.object_label(obj)}: refused, nothing written:\n  {listed}"
            )
        render.check_size(obj, self._budget_bytes)


# --- what meshctl owns ---------------------------------------------------------


def owned_fields(obj: Mapping[str, Any]) -> dict:
    """The apply body: identity, resource version, and only meshctl's fields."""
    kind = obj["kind"]
    meta = obj["metadata"]
    annotations = meta.get("annotations") or {}
    body = {
        "apiVersion": obj["apiVersion"],
        "kind": kind,
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": {protocol.MANAGED_BY_LABEL: protocol.MANAGED_BY_VALUE},
            "annotations": {
                key: annotations.get(key, "") for key in _OWNED_ANNOTATIONS[kind]
            },
        },
        "spec": {_OWNED_SPEC[kind]: copy.deepcopy(obj["spec"].get(_OWNED_SPEC[kind]))},
    }
    if meta.get("resourceVersion"):
        body["metadata"]["resourceVersion"] = meta["resourceVersion"]
    return body


def rebase_virtual_service(intended: dict, live: dict | None) -> dict:
    """meshctl's routes from ``intended`` around the user's routes of ``live``.

    Owned routes that preceded the first user route stay first, the others
    (the fallback) stay last, dropped when the live user routes end in a
    catch-all of their own.
    """
    if live is None:
        return _without_server_fields(intended)
    routes = intended["spec"].get("http") or []
    first_user = next(
        (i for i, r in enumerate(routes) if not validate.is_owned_route(r)), None
    )
    head = [r for r in routes[:first_user] if validate.is_owned_route(r)]
    tail = [
        r
        for r in (routes[first_user:] if first_user is not None else [])
        if validate.is_owned_route(r)
    ]
    if first_user is None:
        head = [r for r in routes if r.get("name") != protocol.FALLBACK_ROUTE_NAME]
        tail = [r for r in routes if r.get("name") == protocol.FALLBACK_ROUTE_NAME]
    user = [r for r in live["spec"].get("http") or [] if not validate.is_owned_route(r)]
    if any(_is_catch_all(r) for r in user):
        tail = [r for r in tail if r.get("name") != protocol.FALLBACK_ROUTE_NAME]

    rebased = _take_metadata(intended, live)
    rebased["spec"]["http"] = copy.deepcopy([*head, *user, *tail])
    hosts = rebased["spec"].setdefault("hosts", [])
    for host in intended["spec"].get("hosts") or []:
        if host not in hosts:
            hosts.append(host)
    return rebased


def rebase_destination_rule(
    intended: dict, live: dict | None, live_vs: dict | None
) -> dict:
    """meshctl's subsets from ``intended`` after the user's subsets of ``live``.

    An owned subset that a live user route still references stays, as the
    renderer keeps it.  A user subset that took the name of one of meshctl's
    is refused unless it selects exactly that client.
    """
    if live is None:
        return _without_server_fields(intended)
    owned = render.owned_subset_names(intended)
    by_name = {s["name"]: s for s in intended["spec"].get("subsets") or []}
    live_owned = render.owned_subset_names(live)
    live_subsets = live["spec"].get("subsets") or []
    user = [s for s in live_subsets if s.get("name") not in live_owned]
    label = validate.object_label(live)
    for subset in user:
        name = subset.get("name")
        if name in owned:
            if subset != by_name.get(name):
                raise RoutingError(
                    f"{label}: spec.subsets: subset {name!r} was added by another "
                    "writer with a different selector; rename or remove it"
                )
            owned.discard(name)

    referenced = validate.referenced_subsets(live_vs) if live_vs else set()
    kept = {
        s["name"]: s
        for s in live_subsets
        if s.get("name") in live_owned - owned and s.get("name") in referenced
    }
    mine = {name: by_name[name] for name in owned} | kept

    rebased = _take_metadata(intended, live)
    rebased["spec"]["subsets"] = copy.deepcopy(
        [*user, *(mine[name] for name in sorted(mine))]
    )
    render.set_owned_subsets(rebased, mine)
    return rebased


def _take_metadata(intended: dict, live: dict) -> dict:
    """A copy of ``live`` carrying meshctl's label and annotations from ``intended``."""
    rebased = copy.deepcopy(live)
    meta = rebased["metadata"]
    meta.setdefault("labels", {})[protocol.MANAGED_BY_LABEL] = protocol.MANAGED_BY_VALUE
    annotations = meta.setdefault("annotations", {})
    for key in _OWNED_ANNOTATIONS[intended["kind"]]:
        value = _annotation(intended, key)
        if value is not None:
            annotations[key] = value
    return rebased


def _is_catch_all(route: Mapping[str, Any]) -> bool:
    matches = route.get("match")
    return not matches or any(not m for m in matches)


def _annotation(obj: Mapping[str, Any], key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(key)


def _without_server_fields(obj: dict) -> dict:
    """The object to create: no resource version, uid or managed fields."""
    created = copy.deepcopy(obj)
    for key in ("resourceVersion", "uid", "managedFields", "creationTimestamp"):
        created["metadata"].pop(key, None)
    created["metadata"].pop("generation", None)
    return created


def _is_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )


def _plain_copy(obj: Mapping[str, Any]) -> dict:
    """A deep copy made of JSON types only."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise RoutingError(
            f"{validate.object_label(obj)}: not plain JSON data: {exc}"
        ) from exc
