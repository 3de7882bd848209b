"""Translate Istio VirtualService and DestinationRule objects to Envoy v3 resources.

The functions here are pure: they read plain dicts (as parsed from YAML) and return
plain dicts in Envoy's JSON form, ready to be written as xDS files.  They follow what
istiod generates for a sidecar where Envoy has an equivalent, so that what runs on one
machine behaves like what runs in a cluster:

- one cluster per subset, named ``outbound|<port>|<subset>|<host>``, plus the
  subset-less ``outbound|<port>||<host>`` over every workload;
- one route configuration with one virtual host; one Envoy route per match block of
  every http route, in order;
- Istio's defaults where the object is silent: no route timeout, two retries on
  connect failures and 503, least-request balancing, unlimited circuit breakers.

Left out on purpose: ``tls`` (the local mesh speaks plain HTTP on loopback; mTLS is
the sidecars' job in a cluster), mirrors and CORS policies (they never change which
client answers).  Fields that would change who answers but have no local equivalent
(redirects, delegation, source matches) raise :class:`TranslationError`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any, NoReturn

from meshctl import protocol
from meshctl.types import Workload

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_CONFIGURATION_TYPE = (
    "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
)
FAULT_FILTER = "envoy.filters.http.fault"
FAULT_TYPE = "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"
HTTP_OPTIONS_EXTENSION = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS_TYPE = "type.googleapis.com/" + HTTP_OPTIONS_EXTENSION

# The listener's HTTP connection manager asks RDS for this route configuration.
ROUTE_CONFIG_NAME = protocol.SERVICE_HOST

# Route configurations carry their routing version in this metadata namespace, so
# that a new version with unchanged routes is still a change Envoy reports.
VERSION_METADATA_NAMESPACE = "meshctl.io"

# Istio's defaults for what a VirtualService or DestinationRule leaves unset.
ISTIO_CONNECT_TIMEOUT = "10s"
ISTIO_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled"
ISTIO_RETRY_ATTEMPTS = 2
_UNLIMITED = 4294967295
_LB_POLICIES = {
    "ROUND_ROBIN": "ROUND_ROBIN",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",
    "RANDOM": "RANDOM",
}
_PREVIOUS_HOSTS = {
    "name": "envoy.retry_host_predicates.previous_hosts",
    "typed_config": {
        "@type": "type.googleapis.com/"
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
    },
}

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS_NS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


class TranslationError(ValueError):
    """An Istio object that the local mesh cannot translate to Envoy configuration.

    ``object_ref`` names the object (``VirtualService fl/fl-clients``), ``path`` the
    field (``spec.http[2].route[0].destination.subset``).
    """

    def __init__(self, object_ref: str, path: str, problem: str) -> None:
        self.object_ref = object_ref
        self.path = path
        self.problem = problem
        super().__init__(
            f"{object_ref}: {path}: {problem} "
            "(not translated; the mesh keeps serving its current configuration)"
        )


# --------------------------------------------------------------------------- names


def cluster_name(host: str, subset: str = "", port: int = protocol.SERVICE_PORT) -> str:
    """The Envoy cluster that Istio builds for ``subset`` of ``host``."""
    return f"outbound|{port}|{subset}|{host}"


def routing_version(obj: Mapping[str, Any]) -> str:
    """The object's routing-version annotation, or a hash of its spec if it has none."""
    metadata = obj.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, Mapping) else {}
    annotations = annotations if isinstance(annotations, Mapping) else {}
    version = annotations.get(protocol.ROUTING_VERSION_ANNOTATION)
    if version:
        return str(version)
    spec = json.dumps(obj.get("spec"), sort_keys=True, default=str)
    return "sha256-" + hashlib.sha256(spec.encode()).hexdigest()[:12]


# ------------------------------------------------------------------------ durations


def parse_duration(text: str) -> float:
    """Seconds in an Istio duration such as ``10s``, ``500ms``, ``1m`` or ``1.5s``.

    Raises ValueError for anything else, negative durations included.
    """
    return float(Fraction(_duration_ns(text), 10**9))


def _duration_ns(text: str) -> int:
    """Nanoseconds in an Istio (Go-style) duration string."""
    if not isinstance(text, str):
        raise ValueError(f"a duration is a string like '10s', not {text!r}")
    text = text.strip()
    if text == "0":
        return 0
    total = Fraction(0)
    position = 0
    for part in _DURATION_PART.finditer(text):
        if part.start() != position:
            break
        total += Fraction(part.group(1)) * _DURATION_UNITS_NS[part.group(2)]
        position = part.end()
    if position == 0 or position != len(text):
        raise ValueError(f"{text!r} is not a duration like '10s', '500ms' or '1m'")
    return round(total)


def _envoy_duration(nanoseconds: int) -> str:
    """An Envoy (protobuf JSON) duration string."""
    seconds, nanos = divmod(nanoseconds, 10**9)
    return f"{seconds}.{nanos:09d}s" if nanos else f"{seconds}s"


# --------------------------------------------------------------------- field walker


class _Fields:
    """Reads one Istio object's fields; a bad one raises naming its path."""

    def __init__(self, obj: Any, kind: str) -> None:
        metadata = obj.get("metadata") if isinstance(obj, Mapping) else None
        metadata = metadata if isinstance(metadata, Mapping) else {}
        namespace = metadata.get("namespace", "default")
        self.ref = f"{kind} {namespace}/{metadata.get('name', '<unnamed>')}"
        if not isinstance(obj, Mapping):
            self.fail("<root>", f"expected a mapping, got {type(obj).__name__}")

    def fail(self, path: str, problem: str) -> NoReturn:
        """Raise a TranslationError for ``path``."""
        raise TranslationError(self.ref, path, problem)

    def mapping(self, value: Any, path: str, *, required: bool = False) -> Mapping:
        """``value`` as a mapping; missing means empty unless ``required``."""
        if value is None and not required:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, f"expected a mapping, got {_kind_of(value)}")
        return value

    def sequence(self, value: Any, path: str) -> Sequence:
        """``value`` as a list; missing means empty."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(path, f"expected a list, got {_kind_of(value)}")
        return value

    def string(self, value: Any, path: str) -> str:
        """``value`` as a non-empty string."""
        if not isinstance(value, str) or not value:
            self.fail(path, f"expected a non-empty string, got {_kind_of(value)}")
        return value

    def integer(
        self, value: Any, path: str, low: int = 0, high: int = _UNLIMITED
    ) -> int:
        """``value`` as an integer in ``[low, high]``."""
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"expected an integer, got {_kind_of(value)}")
        if not low <= value <= high:
            self.fail(path, f"{value} is outside [{low}, {high}]")
        return value

    def duration(self, value: Any, path: str) -> str:
        """``value`` (an Istio duration) as an Envoy duration string."""
        try:
            return _envoy_duration(_duration_ns(value))
        except ValueError as error:
            raise TranslationError(self.ref, path, str(error)) from error

    def percentage(self, holder: Mapping, path: str) -> dict:
        """An Istio ``percentage: {value}`` (or legacy ``percent``) as a fraction."""
        if "percentage" in holder:
            percentage = self.mapping(holder["percentage"], f"{path}.percentage")
            value = percentage.get("value", 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(f"{path}.percentage.value", "expected a number")
            if not 0 <= value <= 100:
                self.fail(f"{path}.percentage.value", f"{value} is outside [0, 100]")
        else:
            value = self.integer(holder.get("percent", 100), f"{path}.percent", 0, 100)
        return {"numerator": round(value * 10_000), "denominator": "MILLION"}


def _kind_of(value: Any) -> str:
    """A short description of a value's type for error messages."""
    return "nothing" if value is None else type(value).__name__


# ---------------------------------------------------------------- DestinationRule


def translate_destination_rule(
    dr: Mapping[str, Any], workloads: Sequence[Workload]
) -> list[dict]:
    """Envoy clusters for a DestinationRule: the host's, then one per subset.

    Every given workload belongs to the rule's host; a subset selects the workloads
    whose labels contain all of its labels.  A subset that selects none still gets a
    cluster, with no endpoints: a route to it answers 503 (UH).
    """
    fields = _Fields(dr, "DestinationRule")
    spec = fields.mapping(dr.get("spec"), "spec", required=True)
    host = fields.string(spec.get("host"), "spec.host")
    top = _policy_parts(fields, spec.get("trafficPolicy"), "spec.trafficPolicy")
    clusters = [_cluster(cluster_name(host), workloads, top)]

    seen: set[str] = set()
    for index, raw in enumerate(fields.sequence(spec.get("subsets"), "spec.subsets")):
        path = f"spec.subsets[{index}]"
        subset = fields.mapping(raw, path, required=True)
        name = _subset_name(fields, subset.get("name"), f"{path}.name", seen)
        labels = _labels(fields, subset.get("labels"), f"{path}.labels")
        own = _policy_parts(
            fields, subset.get("trafficPolicy"), f"{path}.trafficPolicy"
        )
        selected = [w for w in workloads if _selects(labels, w)]
        clusters.append(_cluster(cluster_name(host, name), selected, {**top, **own}))
    return clusters


def _subset_name(fields: _Fields, value: Any, path: str, seen: set[str]) -> str:
    """A subset's name, checked to be a unique DNS-1123 label."""
    name = fields.string(value, path)
    if not protocol.is_dns1123_label(name):
        fields.fail(path, f"{name!r} is not a DNS-1123 label")
    if name in seen:
        fields.fail(path, f"subset {name!r} is defined twice")
    seen.add(name)
    return name


def _labels(fields: _Fields, value: Any, path: str) -> dict[str, str]:
    """A label selector as a dict of strings."""
    labels = fields.mapping(value, path)
    for key, label in labels.items():
        if not isinstance(label, str):
            fields.fail(f"{path}.{key}", f"expected a string, got {_kind_of(label)}")
    return dict(labels)


def _selects(labels: Mapping[str, str], workload: Workload) -> bool:
    """True when every selector label is on the workload."""
    return all(workload.labels.get(key) == value for key, value in labels.items())


def _cluster(name: str, workloads: Sequence[Workload], parts: Mapping) -> dict:
    """One STATIC cluster over ``workloads`` with the translated traffic policy."""
    cluster: dict[str, Any] = {
        "@type": CLUSTER_TYPE,
        "name": name,
        "type": "STATIC",
        "connect_timeout": ISTIO_CONNECT_TIMEOUT,
        "lb_policy": "LEAST_REQUEST",
        "circuit_breakers": {"thresholds": [_unlimited_thresholds()]},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [_endpoint(w) for w in workloads]}],
        },
    }
    for part in parts.values():
        _merge_into(cluster, copy.deepcopy(part))
    return cluster


def _unlimited_thresholds() -> dict:
    """Istio's circuit breakers: no limits unless the connection pool sets them."""
    return {
        "max_connections": _UNLIMITED,
        "max_pending_requests": _UNLIMITED,
        "max_requests": _UNLIMITED,
        "max_retries": _UNLIMITED,
    }


def _endpoint(workload: Workload) -> dict:
    """An Envoy LbEndpoint for one workload."""
    address = {"address": workload.address, "port_value": workload.port}
    return {"endpoint": {"address": {"socket_address": address}}}


def _merge_into(target: dict, update: Mapping) -> None:
    """Merge ``update`` into ``target``: mappings recursively, lists item by item."""
    for key, value in update.items():
        current = target.get(key)
        if isinstance(current, dict) and isinstance(value, Mapping):
            _merge_into(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            for index, item in enumerate(value):
                if index < len(current) and isinstance(current[index], dict):
                    _merge_into(current[index], item)
                else:
                    current.append(item)
        else:
            target[key] = value


def _policy_parts(fields: _Fields, value: Any, path: str) -> dict[str, dict]:
    """A traffic policy as cluster fragments keyed by Istio field.

    Keys let a subset's policy override the top level field by field, as istiod
    does; port-level settings for the service port override the policy's own.
    """
    policy = fields.mapping(value, path)
    parts = _policy_fields(fields, policy, path)
    levels = fields.sequence(
        policy.get("portLevelSettings"), f"{path}.portLevelSettings"
    )
    for index, raw in enumerate(levels):
        level_path = f"{path}.portLevelSettings[{index}]"
        level = fields.mapping(raw, level_path, required=True)
        port = fields.mapping(level.get("port"), f"{level_path}.port")
        if port.get("number") == protocol.SERVICE_PORT:
            parts.update(_policy_fields(fields, level, level_path))
    return parts


def _policy_fields(fields: _Fields, policy: Mapping, path: str) -> dict[str, dict]:
    """Cluster fragments for the fields of one policy level (tls is ignored)."""
    parts: dict[str, dict] = {}
    if "connectionPool" in policy:
        pool_path = f"{path}.connectionPool"
        parts["connectionPool"] = _connection_pool(
            fields, policy["connectionPool"], pool_path
        )
    if "outlierDetection" in policy:
        outlier_path = f"{path}.outlierDetection"
        parts["outlierDetection"] = _outlier(
            fields, policy["outlierDetection"], outlier_path
        )
    if "loadBalancer" in policy:
        lb_path = f"{path}.loadBalancer"
        parts["loadBalancer"] = _load_balancer(fields, policy["loadBalancer"], lb_path)
    return parts


def _connection_pool(fields: _Fields, value: Any, path: str) -> dict:
    """Circuit breakers, connect timeout and per-connection limits."""
    pool = fields.mapping(value, path)
    tcp = fields.mapping(pool.get("tcp"), f"{path}.tcp")
    http = fields.mapping(pool.get("http"), f"{path}.http")
    thresholds: dict[str, int] = {}
    fragment: dict[str, Any] = {}

    limits = [
        (tcp, "tcp", "maxConnections", "max_connections"),
        (http, "http", "http1MaxPendingRequests", "max_pending_requests"),
        (http, "http", "http2MaxRequests", "max_requests"),
        (http, "http", "maxRetries", "max_retries"),
    ]
    for source, group, istio_name, envoy_name in limits:
        if istio_name in source:
            field_path = f"{path}.{group}.{istio_name}"
            thresholds[envoy_name] = fields.integer(source[istio_name], field_path)
    if thresholds:
        fragment["circuit_breakers"] = {"thresholds": [thresholds]}
    if "connectTimeout" in tcp:
        connect_path = f"{path}.tcp.connectTimeout"
        fragment["connect_timeout"] = fields.duration(
            tcp["connectTimeout"], connect_path
        )

    common = _common_http_options(fields, http, f"{path}.http")
    if common:
        options = {
            "@type": HTTP_OPTIONS_TYPE,
            "common_http_protocol_options": common,
            "explicit_http_config": {"http_protocol_options": {}},
        }
        fragment["typed_extension_protocol_options"] = {HTTP_OPTIONS_EXTENSION: options}
    return fragment


def _common_http_options(fields: _Fields, http: Mapping, path: str) -> dict:
    """Envoy's common HTTP protocol options from Istio's http connection pool."""
    common: dict[str, Any] = {}
    per_connection = http.get("maxRequestsPerConnection", 0)
    per_connection = fields.integer(per_connection, f"{path}.maxRequestsPerConnection")
    if per_connection > 0:
        common["max_requests_per_connection"] = per_connection
    if "idleTimeout" in http:
        common["idle_timeout"] = fields.duration(
            http["idleTimeout"], f"{path}.idleTimeout"
        )
    return common


def _outlier(fields: _Fields, value: Any, path: str) -> dict:
    """Outlier detection; like istiod, panic mode is off unless minHealthPercent."""
    outlier = fields.mapping(value, path)
    detection: dict[str, Any] = {"enforcing_success_rate": 0}
    consecutive = [
        ("consecutive5xxErrors", "consecutive_5xx", "enforcing_consecutive_5xx"),
        (
            "consecutiveGatewayErrors",
            "consecutive_gateway_failure",
            "enforcing_consecutive_gateway_failure",
        ),
        (
            "consecutiveLocalOriginFailures",
            "consecutive_local_origin_failure",
            "enforcing_consecutive_local_origin_failure",
        ),
    ]
    for istio_name, envoy_name, enforcing in consecutive:
        if istio_name in outlier:
            count = fields.integer(outlier[istio_name], f"{path}.{istio_name}")
            detection[envoy_name] = count
            detection[enforcing] = 100 if count > 0 else 0
    for istio_name, envoy_name in [
        ("interval", "interval"),
        ("baseEjectionTime", "base_ejection_time"),
    ]:
        if istio_name in outlier:
            detection[envoy_name] = fields.duration(
                outlier[istio_name], f"{path}.{istio_name}"
            )
    if "maxEjectionPercent" in outlier:
        percent = outlier["maxEjectionPercent"]
        percent_path = f"{path}.maxEjectionPercent"
        detection["max_ejection_percent"] = fields.integer(
            percent, percent_path, 0, 100
        )
    if outlier.get("splitExternalLocalOriginErrors"):
        detection["split_external_local_origin_errors"] = True

    health = fields.integer(
        outlier.get("minHealthPercent", 0), f"{path}.minHealthPercent", 0, 100
    )
    panic = {"healthy_panic_threshold": {"value": float(health)}}
    return {"outlier_detection": detection, "common_lb_config": panic}


def _load_balancer(fields: _Fields, value: Any, path: str) -> dict:
    """The simple load-balancing algorithm (other settings have no local effect)."""
    balancer = fields.mapping(value, path)
    if "simple" not in balancer:
        return {}
    simple = fields.string(balancer["simple"], f"{path}.simple")
    if simple not in _LB_POLICIES:
        fields.fail(f"{path}.simple", f"{simple!r} is not supported by the local mesh")
    return {"lb_policy": _LB_POLICIES[simple]}


# ------------------------------------------------------------------ VirtualService


def translate_virtual_service(
    vs: Mapping[str, Any], route_config_name: str = ROUTE_CONFIG_NAME
) -> dict:
    """One Envoy RouteConfiguration for a VirtualService.

    One virtual host answers the VirtualService's hosts (with any port) and every
    other authority; each match block of each http route becomes one Envoy route
    named like the http route, in order.  The routing version is kept in the route
    configuration's metadata.
    """
    fields = _Fields(vs, "VirtualService")
    spec = fields.mapping(vs.get("spec"), "spec", required=True)
    hosts = [
        fields.string(host, f"spec.hosts[{index}]")
        for index, host in enumerate(fields.sequence(spec.get("hosts"), "spec.hosts"))
    ]
    if not hosts:
        fields.fail("spec.hosts", "a VirtualService needs at least one host")

    routes: list[dict] = []
    for index, raw in enumerate(fields.sequence(spec.get("http"), "spec.http")):
        routes.extend(_http_route(fields, raw, f"spec.http[{index}]"))
    domains = list(dict.fromkeys([d for h in hosts for d in (h, f"{h}:*")] + ["*"]))
    virtual_host = {"name": hosts[0], "domains": domains, "routes": routes}
    version = {VERSION_METADATA_NAMESPACE: {"routing_version": routing_version(vs)}}
    return {
        "@type": ROUTE_CONFIGURATION_TYPE,
        "name": route_config_name,
        "metadata": {"filter_metadata": version},
        "virtual_hosts": [virtual_host],
    }


def unarmed_route_configuration(
    version: str, route_config_name: str = ROUTE_CONFIG_NAME
) -> dict:
    """A route configuration that answers every request as an unarmed slot."""
    vs = {
        "metadata": {
            "name": route_config_name,
            "annotations": {protocol.ROUTING_VERSION_ANNOTATION: version},
        },
        "spec": {
            "hosts": [protocol.SERVICE_HOST],
            "http": [
                {
                    "name": protocol.FALLBACK_ROUTE_NAME,
                    "directResponse": {
                        "status": protocol.UNARMED_SLOT_STATUS,
                        "body": {"string": "no client is armed for this slot"},
                    },
                }
            ],
        },
    }
    return translate_virtual_service(vs, route_config_name)


_UNSUPPORTED_HTTP_FIELDS = ("redirect", "delegate", "uriRegexRewrite")
_UNSUPPORTED_MATCH_FIELDS = (
    "port",
    "sourceLabels",
    "sourceNamespace",
    "gateways",
    "scheme",
    "statPrefix",
)


def _http_route(fields: _Fields, value: Any, path: str) -> list[dict]:
    """The Envoy routes for one Istio http route: one per match block."""
    http = fields.mapping(value, path, required=True)
    for name in _UNSUPPORTED_HTTP_FIELDS:
        if name in http:
            fields.fail(f"{path}.{name}", "is not supported by the local mesh")
    action = _action(fields, http, path)
    if "name" in http:
        action["name"] = fields.string(http["name"], f"{path}.name")

    blocks = fields.sequence(http.get("match"), f"{path}.match") or [{}]
    routes = []
    for index, block in enumerate(blocks):
        match = _match(fields, block, f"{path}.match[{index}]")
        routes.append({"match": match, **copy.deepcopy(action)})
    return routes


def _action(fields: _Fields, http: Mapping, path: str) -> dict:
    """What an Envoy route does: a direct response, or a route to clusters."""
    if "directResponse" in http and "route" in http:
        fields.fail(path, "has both route and directResponse; keep one")
    if "directResponse" in http:
        action = {"direct_response": _direct(fields, http["directResponse"], path)}
    elif "route" in http:
        action = {"route": _route_action(fields, http, path)}
    else:
        fields.fail(path, "has neither route nor directResponse")

    if "fault" in http:
        fault = _fault(fields, http["fault"], f"{path}.fault")
        action["typed_per_filter_config"] = {FAULT_FILTER: fault}
    action.update(_header_operations(fields, http.get("headers"), f"{path}.headers"))
    return action


def _direct(fields: _Fields, value: Any, path: str) -> dict:
    """An Envoy direct response from Istio's directResponse."""
    path = f"{path}.directResponse"
    direct = fields.mapping(value, path, required=True)
    response: dict[str, Any] = {
        "status": fields.integer(direct.get("status"), f"{path}.status", 200, 599)
    }
    body = fields.mapping(direct.get("body"), f"{path}.body")
    if "string" in body:
        response["body"] = {"inline_string": str(body["string"])}
    elif "bytes" in body:
        response["body"] = {
            "inline_bytes": fields.string(body["bytes"], f"{path}.body")
        }
    return response


def _route_action(fields: _Fields, http: Mapping, path: str) -> dict:
    """Envoy's route action: clusters, timeout, retries and rewrites."""
    action = _destinations(fields, http["route"], f"{path}.route")
    timeout = http.get("timeout")
    action["timeout"] = (
        "0s" if timeout is None else fields.duration(timeout, f"{path}.timeout")
    )
    retry = _retry_policy(fields, http.get("retries"), f"{path}.retries")
    if retry is not None:
        action["retry_policy"] = retry

    rewrite = fields.mapping(http.get("rewrite"), f"{path}.rewrite")
    if "uri" in rewrite:
        action["prefix_rewrite"] = fields.string(rewrite["uri"], f"{path}.rewrite.uri")
    if "authority" in rewrite:
        authority = fields.string(rewrite["authority"], f"{path}.rewrite.authority")
        action["host_rewrite_literal"] = authority
    return action


def _destinations(fields: _Fields, value: Any, path: str) -> dict:
    """One cluster, or weighted clusters for several destinations.

    Like istiod: one destination takes all traffic whatever its weight; with several,
    a missing weight is 0, destinations of weight 0 are dropped, and the sum must be
    positive.
    """
    entries = fields.sequence(value, path)
    if not entries:
        fields.fail(path, "needs at least one destination")
    weighted = []
    for index, raw in enumerate(entries):
        entry = fields.mapping(raw, f"{path}[{index}]", required=True)
        name = _destination(fields, entry.get("destination"), f"{path}[{index}]")
        weight = fields.integer(entry.get("weight", 0), f"{path}[{index}].weight")
        weighted.append((name, weight))

    if len(weighted) == 1:
        return {"cluster": weighted[0][0]}
    kept = [{"name": name, "weight": weight} for name, weight in weighted if weight > 0]
    if not kept:
        fields.fail(path, "several destinations need weights that sum to more than 0")
    if len(kept) == 1:
        return {"cluster": kept[0]["name"]}
    return {"weighted_clusters": {"clusters": kept}}


def _destination(fields: _Fields, value: Any, path: str) -> str:
    """The cluster name for an Istio destination."""
    path = f"{path}.destination"
    destination = fields.mapping(value, path, required=True)
    host = fields.string(destination.get("host"), f"{path}.host")
    subset = ""
    if "subset" in destination:
        subset = fields.string(destination["subset"], f"{path}.subset")
        if not protocol.is_dns1123_label(subset):
            fields.fail(f"{path}.subset", f"{subset!r} is not a DNS-1123 label")
    port = fields.mapping(destination.get("port"), f"{path}.port")
    if port.get("number", protocol.SERVICE_PORT) != protocol.SERVICE_PORT:
        fields.fail(
            f"{path}.port.number",
            f"the local mesh serves port {protocol.SERVICE_PORT} only",
        )
    return cluster_name(host, subset)


def _retry_policy(fields: _Fields, value: Any, path: str) -> dict | None:
    """Envoy's retry policy; Istio's default (2 attempts) when retries is unset."""
    retries = fields.mapping(value, path)
    attempts = fields.integer(
        retries.get("attempts", ISTIO_RETRY_ATTEMPTS), f"{path}.attempts"
    )
    if attempts == 0:
        return None
    retry_on = retries.get("retryOn") or ISTIO_RETRY_ON + ",503"
    conditions = [
        c.strip() for c in fields.string(retry_on, f"{path}.retryOn").split(",")
    ]
    codes = [int(c) for c in conditions if c.isdigit()]
    names = [c for c in conditions if c and not c.isdigit()]
    if codes and "retriable-status-codes" not in names:
        names.append("retriable-status-codes")

    policy: dict[str, Any] = {
        "retry_on": ",".join(names),
        "num_retries": attempts,
        "retry_host_predicate": [copy.deepcopy(_PREVIOUS_HOSTS)],
        "host_selection_retry_max_attempts": 5,
    }
    if codes:
        policy["retriable_status_codes"] = codes
    if "perTryTimeout" in retries:
        per_try = fields.duration(retries["perTryTimeout"], f"{path}.perTryTimeout")
        policy["per_try_timeout"] = per_try
    return policy


def _fault(fields: _Fields, value: Any, path: str) -> dict:
    """The fault filter's per-route configuration: a fixed delay and/or an abort."""
    fault = fields.mapping(value, path, required=True)
    config: dict[str, Any] = {"@type": FAULT_TYPE}
    if "delay" in fault:
        delay_path = f"{path}.delay"
        delay = fields.mapping(fault["delay"], delay_path, required=True)
        if "fixedDelay" not in delay:
            fields.fail(f"{delay_path}.fixedDelay", "a delay needs a fixedDelay")
        config["delay"] = {
            "fixed_delay": fields.duration(
                delay["fixedDelay"], f"{delay_path}.fixedDelay"
            ),
            "percentage": fields.percentage(delay, delay_path),
        }
    if "abort" in fault:
        abort_path = f"{path}.abort"
        abort = fields.mapping(fault["abort"], abort_path, required=True)
        status = abort.get("httpStatus")
        config["abort"] = {
            "http_status": fields.integer(status, f"{abort_path}.httpStatus", 200, 599),
            "percentage": fields.percentage(abort, abort_path),
        }
    if len(config) == 1:
        fields.fail(path, "a fault needs a delay or an abort")
    return config


def _header_operations(fields: _Fields, value: Any, path: str) -> dict:
    """Request and response header set/add/remove operations."""
    headers = fields.mapping(value, path)
    operations: dict[str, Any] = {}
    for direction in ("request", "response"):
        side_path = f"{path}.{direction}"
        side = fields.mapping(headers.get(direction), side_path)
        to_add = []
        for op, action in [
            ("set", "OVERWRITE_IF_EXISTS_OR_ADD"),
            ("add", "APPEND_IF_EXISTS_OR_ADD"),
        ]:
            for key, header in fields.mapping(
                side.get(op), f"{side_path}.{op}"
            ).items():
                entry = {"header": {"key": key, "value": str(header)}}
                to_add.append({**entry, "append_action": action})
        removed = fields.sequence(side.get("remove"), f"{side_path}.remove")
        if to_add:
            operations[f"{direction}_headers_to_add"] = to_add
        if removed:
            operations[f"{direction}_headers_to_remove"] = [str(h) for h in removed]
    return operations


def _match(fields: _Fields, value: Any, path: str) -> dict:
    """An Envoy route match from one Istio match block."""
    block = fields.mapping(value, path)
    for name in _UNSUPPORTED_MATCH_FIELDS:
        if name in block:
            fields.fail(f"{path}.{name}", "is not supported by the local mesh")
    match: dict[str, Any] = {"prefix": "/"}
    if "uri" in block:
        match = _uri_match(fields, block["uri"], f"{path}.uri")
    if block.get("ignoreUriCase"):
        match["case_sensitive"] = False

    headers = []
    for key, condition in fields.mapping(
        block.get("headers"), f"{path}.headers"
    ).items():
        headers.append(_header(fields, key, condition, f"{path}.headers.{key}"))
    without = fields.mapping(block.get("withoutHeaders"), f"{path}.withoutHeaders")
    for key, condition in without.items():
        header = _header(fields, key, condition, f"{path}.withoutHeaders.{key}")
        headers.append({**header, "invert_match": True})
    for key, pseudo in [("method", ":method"), ("authority", ":authority")]:
        if key in block:
            headers.append(_header(fields, pseudo, block[key], f"{path}.{key}"))
    if headers:
        match["headers"] = headers

    params = fields.mapping(block.get("queryParams"), f"{path}.queryParams")
    if params:
        match["query_parameters"] = [
            {
                "name": key,
                "string_match": _string_match(fields, c, f"{path}.queryParams.{key}"),
            }
            for key, c in params.items()
        ]
    return match


def _uri_match(fields: _Fields, value: Any, path: str) -> dict:
    """An Envoy path specifier from an Istio uri StringMatch."""
    condition = _string_match(fields, value, path)
    if "exact" in condition:
        return {"path": condition["exact"]}
    if "prefix" in condition:
        return {"prefix": condition["prefix"]}
    return {"safe_regex": condition["safe_regex"]}


def _header(fields: _Fields, key: str, value: Any, path: str) -> dict:
    """An Envoy header matcher; header names are lower case."""
    if key != key.lower():
        fields.fail(path, f"header name {key!r} must be lower case")
    return {"name": key, "string_match": _string_match(fields, value, path)}


def _string_match(fields: _Fields, value: Any, path: str) -> dict:
    """An Envoy StringMatcher from an Istio StringMatch (exact, prefix or regex)."""
    condition = fields.mapping(value, path, required=True)
    kinds = [kind for kind in ("exact", "prefix", "regex") if kind in condition]
    if len(kinds) != 1:
        fields.fail(path, "needs exactly one of exact, prefix or regex")
    kind = kinds[0]
    text = condition[kind]
    if not isinstance(text, str):
        fields.fail(f"{path}.{kind}", f"expected a string, got {_kind_of(text)}")
    if kind == "regex":
        if len(text) > 1024:
            fields.fail(f"{path}.regex", "a regex is at most 1024 characters")
        return {"safe_regex": {"regex": text}}
    return {kind: text}
