"""The VirtualService and DestinationRule that route slots to the chosen clients.

meshctl shares both objects with their users and owns only parts of them:

- **routes**: an HTTP route is meshctl's when its name starts with ``meshctl-``.
  Its slot routes (or its weighted route) go first, since they are the most
  specific; the user's routes follow in their own order; the fallback route
  ``meshctl-no-slot`` (a direct 421 response) goes last, and is left out when the
  user has a catch-all route (one with no match) of their own, which then
  answers every request the slot routes do not take.
- **subsets**: a DestinationRule subset is meshctl's when its name is listed in
  the DestinationRule's annotation ``meshctl.io/owned-subsets`` (comma-separated).
  meshctl writes its subsets as ``{name: <client>, labels: {<client label>:
  <client>}}``.  A user subset with a client's name is reused as it is when it
  selects exactly that client's pod, and refused otherwise; meshctl never takes
  such a subset over nor prunes it.  An owned subset stays while any route, the
  user's included, references it.

Everything else (user routes, user subsets, hosts, the traffic policy, labels,
annotations and fields meshctl does not know) is deep-copied unchanged.  The
default traffic policy applies only when there is no live DestinationRule.

Client ids are subset names, so each must be a DNS-1123 label.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshctl import protocol
from meshctl.routing import validate
from meshctl.routing.errors import RoutingError

API_VERSION = "networking.istio.io/v1"
OWNED_SUBSETS_ANNOTATION = "meshctl.io/owned-subsets"
WEIGHTED_ROUTE_NAME = protocol.OWNED_ROUTE_PREFIX + "weighted"
NO_SLOT_BODY = "no client is armed for this slot"
DEFAULT_SIZE_BUDGET_BYTES = 256 * 1024

# The slot header of a weighted route: any slot number.
_ANY_SLOT_REGEX = "[0-9]+"


def default_traffic_policy() -> dict:
    """Mutual TLS and outlier detection that ejects a failing client's pod."""
    return {
        "tls": {"mode": "ISTIO_MUTUAL"},
        "outlierDetection": {
            "consecutive5xxErrors": 5,
            "interval": "10s",
            "baseEjectionTime": "30s",
            "maxEjectionPercent": 100,
        },
    }


# --- public renderers --------------------------------------------------------


def render_exact(
    assignment: Mapping[int, str],
    *,
    routing_version: str,
    live_vs: dict | None = None,
    live_dr: dict | None = None,
    name: str = "fl-clients",
    namespace: str = "fl",
    host: str = protocol.SERVICE_HOST,
    extra_subsets: Iterable[str] = (),
    budget_bytes: int = DEFAULT_SIZE_BUDGET_BYTES,
) -> tuple[dict, dict]:
    """The desired VS and DR for exact mode: one route per slot, one client each.

    ``assignment`` maps a slot (an integer >= 1) to a client id.  The objects are
    merged into ``live_vs`` and ``live_dr`` (left untouched): only meshctl's
    routes and subsets change.  ``extra_subsets`` adds owned subsets no route
    references yet (to warm them up for a later round).  Either object over
    ``budget_bytes`` of JSON raises ``RoutingError``.
    """
    _check_version(routing_version)
    slots = _slots(assignment)
    routes = [_slot_route(slot, client, host) for slot, client in slots]
    clients = [client for _, client in slots]
    place = _Placement(name, namespace, host, routing_version, budget_bytes)
    return _render(routes, clients, extra_subsets, live_vs, live_dr, place)


def render_weighted(
    weights: Mapping[str, int],
    *,
    routing_version: str,
    live_vs: dict | None = None,
    live_dr: dict | None = None,
    name: str = "fl-clients",
    namespace: str = "fl",
    host: str = protocol.SERVICE_HOST,
    extra_subsets: Iterable[str] = (),
    budget_bytes: int = DEFAULT_SIZE_BUDGET_BYTES,
) -> tuple[dict, dict]:
    """The desired VS and DR for weighted mode: one route, weighted destinations.

    Weights are integers >= 0; clients of weight 0 are dropped (istiod would drop
    them too), and at least one weight must be positive.  Destinations are sorted
    by client id so that equal inputs give equal objects.
    """
    _check_version(routing_version)
    positive = _positive_weights(weights)
    route = _weighted_route(positive, host)
    place = _Placement(name, namespace, host, routing_version, budget_bytes)
    return _render([route], sorted(positive), extra_subsets, live_vs, live_dr, place)


def routed_clients(vs: Mapping | None) -> tuple[dict[int, str], dict[str, int]]:
    """What a live VirtualService routes: its slot routes' clients (exact mode)
    and its weighted route's weights (weighted mode)."""
    prefix = protocol.slot_route_name(0)[:-1]
    slots: dict[int, str] = {}
    weights: dict[str, int] = {}
    for route in ((vs or {}).get("spec") or {}).get("http") or []:
        if not isinstance(route, Mapping):
            continue
        name = str(route.get("name") or "")
        destinations = validate.route_destinations(route)
        if name.startswith(prefix) and name[len(prefix) :].isdigit():
            if destinations:
                slots[int(name[len(prefix) :])] = _routed_client(destinations[0])
        elif name == WEIGHTED_ROUTE_NAME and isinstance(route.get("route"), list):
            for item in route["route"]:
                if isinstance(item, Mapping):
                    weights[_routed_client(item)] = int(item.get("weight") or 0)
    return slots, weights


def _routed_client(entry: Mapping) -> str:
    inner = entry.get("destination", entry)
    return str(inner.get("subset") or inner.get("host"))


def weights_from_scores(
    scores: Mapping[str, float], total: int = 100
) -> dict[str, int]:
    """Integer weights summing to ``total``, proportional to the scores.

    Largest-remainder rounding: each client gets the floor of its share, and the
    units left go to the largest remainders (ties to the smaller client id).
    Scores must be finite and >= 0, with a positive sum.
    """
    if not isinstance(total, int) or isinstance(total, bool) or total < 1:
        raise RoutingError(f"weights: total must be an integer >= 1, got {total!r}")
    for client, score in scores.items():
        if not isinstance(score, int | float) or not math.isfinite(score) or score < 0:
            raise RoutingError(
                f"weights: client {client}: score {score!r} is not a finite number >= 0"
            )
    score_sum = math.fsum(scores.values())
    if score_sum <= 0:
        raise RoutingError("weights: no client has a positive score")
    return _largest_remainder(scores, score_sum, total)


def weights_for_clients(
    scores: Mapping[str, float], total: int = 100
) -> dict[str, int]:
    """Route weights for the chosen clients from the policy's raw scores.

    No data is not zero: a client whose score is missing or not finite (NaN for
    "unobserved") gets the mean of the positive finite scores, so it is neither
    rewarded nor punished.  Clients scoring 0 get weight 0.  When no client has
    a positive finite score there is nothing to split by, and ``RoutingError``
    names every score: the caller keeps the live routes.
    """
    finite = {
        c: float(s)
        for c, s in scores.items()
        if isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s)
    }
    positive = [s for s in finite.values() if s > 0]
    if not positive:
        listed = ", ".join(f"{c}: {scores[c]!r}" for c in sorted(scores)) or "none"
        raise RoutingError(
            "weights: no client has a positive, finite score "
            f"({listed}); a route whose weights sum to 0 is never written"
        )
    if any(s < 0 for s in finite.values()):
        bad = sorted(c for c, s in finite.items() if s < 0)
        raise RoutingError(f"weights: negative score for client(s) {', '.join(bad)}")
    neutral = math.fsum(positive) / len(positive)
    filled = {c: finite.get(c, neutral) for c in scores}
    return weights_from_scores(filled, total)


def _largest_remainder(
    scores: Mapping[str, float], score_sum: float, total: int
) -> dict[str, int]:
    """Floors of the exact shares, plus one unit each for the largest remainders."""
    shares = {client: score * total / score_sum for client, score in scores.items()}
    weights = {client: math.floor(share) for client, share in shares.items()}
    left = total - sum(weights.values())
    by_remainder = sorted(shares, key=lambda c: (-(shares[c] - weights[c]), c))
    for client in by_remainder[:left]:
        weights[client] += 1
    return weights


def check_size(
    obj: Mapping[str, Any], budget_bytes: int = DEFAULT_SIZE_BUDGET_BYTES
) -> int:
    """The object's serialised JSON size in bytes; ``RoutingError`` over budget."""
    size = len(json.dumps(obj, separators=(",", ":")).encode("utf-8"))
    if size > budget_bytes:
        spec = obj.get("spec") or {}
        counts = (
            f"{len(spec.get('http') or [])} routes, "
            f"{len(spec.get('subsets') or [])} subsets"
        )
        raise RoutingError(
            f"{validate.object_label(obj)}: {size} bytes is over the budget of "
            f"{budget_bytes} bytes ({counts})"
        )
    return size


# --- owned routes ------------------------------------------------------------


def _check_version(routing_version: str) -> None:
    """A routing version is a non-empty string that fits in an annotation."""
    if not isinstance(routing_version, str) or not routing_version.strip():
        raise RoutingError(f"routing version {routing_version!r} is empty")


def _check_client(client: Any) -> str:
    """A client id is a subset name: a DNS-1123 label."""
    if not isinstance(client, str) or not protocol.is_dns1123_label(client):
        raise RoutingError(f"client id {client!r} is not a DNS-1123 label")
    return client


def _slots(assignment: Mapping[int, str]) -> list[tuple[int, str]]:
    """Checked (slot, client) pairs in slot order; a client serves one slot only."""
    seen: dict[str, int] = {}
    for slot, client in assignment.items():
        if not isinstance(slot, int) or isinstance(slot, bool) or slot < 1:
            raise RoutingError(f"slot {slot!r} is not an integer >= 1")
        _check_client(client)
        if client in seen:
            raise RoutingError(
                f"client {client} is assigned to slots {seen[client]} and {slot}"
            )
        seen[client] = slot
    return sorted(assignment.items())


def _positive_weights(weights: Mapping[str, int]) -> dict[str, int]:
    """The clients with a positive weight; refuses bad weights and an empty result."""
    for client, weight in weights.items():
        _check_client(client)
        if not validate.is_weight(weight):
            raise RoutingError(
                f"client {client}: weight {weight!r} is not an integer >= 0"
            )
    positive = {client: w for client, w in weights.items() if w > 0}
    if not positive:
        raise RoutingError(
            "weighted routes need at least one client of positive weight"
        )
    return positive


def _destination(host: str, client: str) -> dict:
    """A route destination: the client's subset of the service host."""
    return {"host": host, "subset": client}


def _slot_route(slot: int, client: str, host: str) -> dict:
    """The route that sends one slot's requests to one client."""
    return {
        "name": protocol.slot_route_name(slot),
        "match": [{"headers": {protocol.SLOT_HEADER: {"exact": str(slot)}}}],
        "route": [{"destination": _destination(host, client)}],
    }


def _weighted_route(weights: Mapping[str, int], host: str) -> dict:
    """The one route that spreads slot requests over clients by weight."""
    return {
        "name": WEIGHTED_ROUTE_NAME,
        "match": [{"headers": {protocol.SLOT_HEADER: {"regex": _ANY_SLOT_REGEX}}}],
        "route": [
            {"destination": _destination(host, client), "weight": weights[client]}
            for client in sorted(weights)
        ],
    }


def _fallback_route() -> dict:
    """The last route: requests no slot route took get a 421 from the mesh."""
    return {
        "name": protocol.FALLBACK_ROUTE_NAME,
        "directResponse": {
            "status": protocol.UNARMED_SLOT_STATUS,
            "body": {"string": NO_SLOT_BODY},
        },
    }


# --- merging into the live objects -------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """Where the objects live and which routing version they carry."""

    name: str
    namespace: str
    host: str
    routing_version: str
    budget_bytes: int


def _render(
    routes: list[dict],
    clients: list[str],
    extra_subsets: Iterable[str],
    live_vs: dict | None,
    live_dr: dict | None,
    place: _Placement,
) -> tuple[dict, dict]:
    """Merge owned routes and subsets into the live objects; check their size."""
    validate.check_live_shape(live_vs, validate.VIRTUAL_SERVICE)
    validate.check_live_shape(live_dr, validate.DESTINATION_RULE)
    wanted = [*clients, *(_check_client(c) for c in extra_subsets)]
    vs = _merge_vs(routes, live_vs, place)
    dr = _merge_dr(wanted, vs, live_dr, place)
    _check_valid(vs, dr, live_vs, live_dr)
    check_size(vs, place.budget_bytes)
    check_size(dr, place.budget_bytes)
    return vs, dr


def _check_valid(
    vs: dict, dr: dict, live_vs: dict | None, live_dr: dict | None
) -> None:
    """The renderer writes nothing invalid, not even what the user left invalid.

    A problem the live objects already had (a user route with several
    destinations and no weights, say) is carried over by the merge; it is
    refused too, and the message says it comes from the live object, so the
    user fixes it instead of meshctl reading it some way of its own.
    """
    problems = validate.validate_objects([vs, dr], source="render")
    if not problems:
        return
    live = [obj for obj in (live_vs, live_dr) if obj is not None]
    inherited = {
        (p.object, p.path, p.message)
        for p in validate.validate_objects(live, source="render")
    }
    lines = [
        f"{p.object}: {p.path or '(object)'}: {p.message}"
        + (
            " (already in the live object)"
            if (p.object, p.path, p.message) in inherited
            else ""
        )
        for p in problems
    ]
    raise RoutingError(
        "refusing to render invalid routes; the live routes stay:\n  "
        + "\n  ".join(lines)
    )


def _base_object(live: dict | None, kind: str, place: _Placement) -> dict:
    """A deep copy of the live object (or a new one), labelled and versioned."""
    obj = copy.deepcopy(live) if live is not None else {}
    obj.setdefault("apiVersion", API_VERSION)
    obj.setdefault("kind", kind)
    meta = obj.setdefault("metadata", {})
    meta.setdefault("name", place.name)
    meta.setdefault("namespace", place.namespace)
    meta.setdefault("labels", {})[protocol.MANAGED_BY_LABEL] = protocol.MANAGED_BY_VALUE
    annotations = meta.setdefault("annotations", {})
    annotations[protocol.ROUTING_VERSION_ANNOTATION] = place.routing_version
    obj.setdefault("spec", {})
    return obj


def _merge_vs(owned: list[dict], live_vs: dict | None, place: _Placement) -> dict:
    """Owned routes first, user routes in order, the fallback last when needed."""
    vs = _base_object(live_vs, validate.VIRTUAL_SERVICE, place)
    spec = vs["spec"]
    hosts = spec.setdefault("hosts", [])
    if place.host not in hosts:
        hosts.append(place.host)
    user_routes = [r for r in spec.get("http") or [] if not validate.is_owned_route(r)]
    fallback = [] if any(_is_catch_all(r) for r in user_routes) else [_fallback_route()]
    spec["http"] = [*owned, *user_routes, *fallback]
    return vs


def _is_catch_all(route: Mapping[str, Any]) -> bool:
    """True for a route that matches every request: no match, or an empty one."""
    matches = route.get("match")
    return not matches or any(not m for m in matches)


def _merge_dr(
    wanted: list[str], vs: dict, live_dr: dict | None, place: _Placement
) -> dict:
    """User subsets in order, then meshctl's subsets sorted by name."""
    dr = _base_object(live_dr, validate.DESTINATION_RULE, place)
    label = validate.object_label(dr)
    spec = dr["spec"]
    _check_dr_host(spec, place, label)
    if live_dr is None:
        spec.setdefault("trafficPolicy", default_traffic_policy())

    previously_owned = owned_subset_names(dr)
    subsets = spec.get("subsets") or []
    user = [s for s in subsets if s.get("name") not in previously_owned]
    user_by_name = {s.get("name"): s for s in user}

    # Owned subsets still referenced by a user route stay, or that route breaks.
    kept = previously_owned & validate.referenced_subsets(vs)
    owned = set()
    for client in {*wanted, *kept}:
        if client in user_by_name:
            _check_user_subset(user_by_name[client], client, label)
        else:
            owned.add(client)

    spec["subsets"] = [*user, *(_owned_subset(c) for c in sorted(owned))]
    set_owned_subsets(dr, owned)
    return dr


def _check_dr_host(spec: dict, place: _Placement, label: str) -> None:
    """The live DestinationRule must be for the service host meshctl routes to."""
    live_host = spec.setdefault("host", place.host)
    ns = place.namespace
    if validate.short_host(live_host, ns) != validate.short_host(place.host, ns):
        raise RoutingError(f"{label}: spec.host is {live_host!r}, not {place.host!r}")


def _owned_subset(client: str) -> dict:
    """meshctl's subset for a client: the client's pod, by its label."""
    return {"name": client, "labels": {protocol.CLIENT_LABEL: client}}


def _check_user_subset(subset: Mapping[str, Any], client: str, label: str) -> None:
    """A user subset with a client's name must select exactly that client's pod."""
    if dict(subset) != _owned_subset(client):
        raise RoutingError(
            f"{label}: spec.subsets: subset {client!r} is the user's (not in "
            f"{OWNED_SUBSETS_ANNOTATION}) and does not select only pod {client}; "
            "rename or remove it"
        )


def owned_subset_names(dr: Mapping[str, Any]) -> set[str]:
    """Subset names the DestinationRule's annotation marks as meshctl's."""
    annotations = (dr.get("metadata") or {}).get("annotations") or {}
    raw = annotations.get(OWNED_SUBSETS_ANNOTATION, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def set_owned_subsets(dr: dict, owned: Iterable[str]) -> None:
    """Record meshctl's subsets in the annotation, sorted."""
    annotations = dr["metadata"].setdefault("annotations", {})
    annotations[OWNED_SUBSETS_ANNOTATION] = ",".join(sorted(owned))
