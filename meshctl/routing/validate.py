"""Checks a VirtualService and DestinationRule pass before anything writes them.

Two kinds of check, both collecting every problem rather than stopping at the
first:

- meshctl's own rules, the Istio facts a CRD schema does not express: DNS-1123
  names (subset names are labels, object names subdomains), lower-case header
  keys, regexes of at most 1024 characters, integer weights >= 0, weights with a
  positive sum whenever a route has more than one destination (several
  destinations and no weight at all is refused, not read as an even split),
  every route ending in a destination, a redirect, a direct response or a
  delegate, unique route names, at least one route per VirtualService, and every
  subset a route references defined by the DestinationRule for that host when
  that DestinationRule is in the same batch;
- the CRD's ``openAPIV3Schema``, converted to JSON Schema by
  :func:`load_crd_schemas` and checked with ``jsonschema``, including its CEL
  rules (``x-kubernetes-validations``), which ``cel-python`` evaluates on the
  field they sit on, as the API server does on create.  A rule the library
  cannot compile is skipped, and a warning says so once per rule; transition
  rules (those reading ``oldSelf``) only apply to updates and are not run.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from meshctl import protocol
from meshctl.routing.errors import RoutingError

log = logging.getLogger(__name__)

VIRTUAL_SERVICE = "VirtualService"
DESTINATION_RULE = "DestinationRule"
MAX_REGEX_CHARS = 1024

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_MESSAGE_CHARS = 200
_TERMINAL_ACTIONS = ("route", "redirect", "directResponse", "delegate")
_CEL_KEYWORD = "x-kubernetes-validations"

SchemaKey = tuple[str, str, str]


@dataclass(frozen=True)
class Problem:
    """One reason an object cannot be written, and where it sits."""

    source: str
    object: str
    path: str
    message: str

    def __str__(self) -> str:
        return (
            f"{self.source}: {self.object}: {self.path or '(object)'}: {self.message}"
        )


# --- loading -----------------------------------------------------------------


def load_yaml_documents(path: str | Path) -> list[dict]:
    """Every non-empty document of a multi-document YAML file.

    Raises ``RoutingError`` naming the file and line on a syntax error, and the
    document number when a document is not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        docs = list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    except OSError as err:
        raise RoutingError(f"{path}: cannot read: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise RoutingError(
            f"{path}: not UTF-8 text (byte {err.start}: {err.reason})"
        ) from err
    except yaml.YAMLError as err:
        raise RoutingError(_yaml_error_message(path, err)) from err
    return _mappings_only(path, docs)


def _yaml_error_message(path: Path, err: yaml.YAMLError) -> str:
    """``file:line:column: YAML syntax error: what`` from a PyYAML error."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    problem = getattr(err, "problem", None) or str(err)
    return f"{where}: YAML syntax error: {problem}"


def _mappings_only(path: Path, docs: list[Any]) -> list[dict]:
    """Drop empty documents; refuse documents that are not mappings."""
    result = []
    for number, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            kind = type(doc).__name__
            raise RoutingError(f"{path}: document {number} is a {kind}, not a mapping")
        result.append(doc)
    return result


def load_crd_schemas(
    path: str | Path, *, reject_unknown_fields: bool = True
) -> dict[SchemaKey, dict]:
    """JSON Schemas for every served version of every CRD in a YAML file.

    Keys are ``(group, kind, version)``.  ``nullable`` becomes a ``null`` type,
    ``x-kubernetes-int-or-string`` an integer-or-string, and objects without
    ``x-kubernetes-preserve-unknown-fields`` refuse unknown fields when
    ``reject_unknown_fields`` is true, as ``kubectl apply`` with strict field
    validation does.  Each schema also describes ``apiVersion``, ``kind`` and
    the common ``metadata`` fields.
    """
    schemas = {}
    for crd in load_yaml_documents(path):
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec.get("versions", []):
            raw = version.get("schema", {}).get("openAPIV3Schema", {})
            key = (spec["group"], spec["names"]["kind"], version["name"])
            schemas[key] = _object_schema(raw, key, reject_unknown_fields)
    for rule in sorted(set(_cel_rules(schemas.values()))):
        _cel_program(rule)  # compile now: a rule that cannot be is reported once
    return schemas


def _cel_rules(nodes: Iterable[Any]) -> Iterator[str]:
    """Every CEL rule text in converted schemas."""
    for node in nodes:
        if isinstance(node, dict):
            for rule in node.get(_CEL_KEYWORD, ()):
                yield str(rule.get("rule", ""))
            yield from _cel_rules(node.values())
        elif isinstance(node, list):
            yield from _cel_rules(node)


def _object_schema(raw: dict, key: SchemaKey, strict: bool) -> dict:
    """The whole-object schema: the CRD's body plus the Kubernetes envelope."""
    group, kind, version = key
    schema = _convert(raw, strict)
    schema.setdefault("properties", {}).update(
        apiVersion={"const": f"{group}/{version}"},
        kind={"const": kind},
        metadata=_METADATA_SCHEMA,
    )
    schema["type"] = "object"
    schema["required"] = ["apiVersion", "kind", "metadata"]
    return schema


_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}

# Keywords that carry meaning in JSON Schema; descriptions, formats and the
# ``x-kubernetes-*`` extensions are dropped after their meaning is translated.
_KEPT = {
    "type",
    "enum",
    "required",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "pattern",
    "uniqueItems",
}


def _convert(node: Any, strict: bool) -> Any:
    """One OpenAPI v3 schema node as JSON Schema, recursively."""
    if not isinstance(node, dict):
        return node
    out = {key: value for key, value in node.items() if key in _KEPT}
    _convert_children(node, out, strict)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable"):
        _allow_null(out)
    if strict and _is_closed_object(node):
        out["additionalProperties"] = False
    rules = [r for r in node.get(_CEL_KEYWORD) or [] if isinstance(r, dict)]
    if rules:
        out[_CEL_KEYWORD] = rules
    return out


def _convert_children(node: dict, out: dict, strict: bool) -> None:
    """Convert the keywords that hold sub-schemas."""
    if "properties" in node:
        out["properties"] = {
            name: _convert(sub, strict) for name, sub in node["properties"].items()
        }
    for key in ("items", "not"):
        if key in node:
            out[key] = _convert(node[key], strict)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _convert(node["additionalProperties"], strict)
    for key in ("allOf", "anyOf", "oneOf"):
        if key in node:
            out[key] = [_convert(sub, strict) for sub in node[key]]


def _allow_null(out: dict) -> None:
    """Let a converted node accept ``null`` as well."""
    if "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    elif "anyOf" in out:
        out["anyOf"] = [*out["anyOf"], {"type": "null"}]


def _is_closed_object(node: dict) -> bool:
    """True for an object node whose unknown fields the API server would prune."""
    return (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    )


# --- naming ------------------------------------------------------------------


def object_label(obj: Mapping[str, Any], index: int = 0) -> str:
    """``VirtualService fl/fl-clients``: how problems and errors name an object."""
    kind = obj.get("kind") or "object"
    meta = obj.get("metadata") or {}
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not name:
        return f"{kind} #{index + 1}"
    namespace = meta.get("namespace")
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


def short_host(host: str, namespace: str | None) -> str:
    """A host without the namespace and cluster suffixes that name the same service."""
    if namespace:
        for suffix in (f".{namespace}.svc.cluster.local", f".{namespace}.svc"):
            if host.endswith(suffix):
                return host[: -len(suffix)]
    return host


def route_destinations(route: Mapping[str, Any]) -> list[dict]:
    """The ``destination`` mappings of one HTTP route."""
    entries = route.get("route") or []
    if not isinstance(entries, list):
        return []
    return [
        e["destination"]
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("destination"), Mapping)
    ]


def referenced_subsets(vs: Mapping[str, Any], *, owned_only: bool = False) -> set[str]:
    """Subset names the VirtualService's HTTP routes send traffic to."""
    names = set()
    for route in (vs.get("spec") or {}).get("http") or []:
        if owned_only and not is_owned_route(route):
            continue
        for dest in route_destinations(route):
            if dest.get("subset"):
                names.add(dest["subset"])
    return names


def is_owned_route(route: Mapping[str, Any]) -> bool:
    """True for a route meshctl wrote: its name carries the owned prefix."""
    return str(route.get("name", "")).startswith(protocol.OWNED_ROUTE_PREFIX)


# --- live objects ------------------------------------------------------------


def check_live_shape(obj: Any, kind: str) -> None:
    """Raise ``RoutingError`` unless ``obj`` has the shape meshctl merges into.

    A live object (read from a cluster or the routing directory) may hold
    anything; the fields meshctl reads (metadata, hosts, routes and their
    destinations, subsets) must be of the right type before it touches them.
    The message names the object and the field.
    """
    if obj is None:
        return
    label = object_label(obj) if isinstance(obj, Mapping) else f"live {kind}"
    for path, problem in _live_shape_problems(obj, kind):
        raise RoutingError(f"{label}: {path or '(object)'}: {problem}")


def _live_shape_problems(obj: Any, kind: str) -> Iterator[tuple[str, str]]:
    if not isinstance(obj, Mapping):
        yield "", f"is a {type(obj).__name__}, not a mapping"
        return
    if obj.get("kind", kind) != kind:
        yield "kind", f"is {obj['kind']!r}, expected {kind}"
    api_version = obj.get("apiVersion", "networking.istio.io/")
    if not isinstance(api_version, str) or not api_version.startswith(
        "networking.istio.io/"
    ):
        yield "apiVersion", f"{api_version!r} is not a networking.istio.io version"
    meta = obj.get("metadata", {})
    if not isinstance(meta, Mapping):
        yield "metadata", "is not a mapping"
        return
    for key in ("name", "namespace"):
        if key in meta and not isinstance(meta[key], str):
            yield f"metadata.{key}", "is not a string"
    for key in ("labels", "annotations"):
        if key in meta and not _is_string_map(meta[key]):
            yield f"metadata.{key}", "is not a mapping of strings"
    spec = obj.get("spec", {})
    if not isinstance(spec, Mapping):
        yield "spec", "is not a mapping"
    elif kind == VIRTUAL_SERVICE:
        yield from _live_vs_problems(spec)
    else:
        yield from _live_dr_problems(spec)


def _live_vs_problems(spec: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    hosts = spec.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        yield "spec.hosts", "is not a list of strings"
    routes = spec.get("http", [])
    if not isinstance(routes, list):
        yield "spec.http", "is not a list"
        return
    for i, route in enumerate(routes):
        path = f"spec.http[{i}]"
        if not isinstance(route, Mapping):
            yield path, "is not a mapping"
            continue
        if "name" in route and not isinstance(route["name"], str):
            yield f"{path}.name", "is not a string"
        entries = route.get("route", [])
        if not isinstance(entries, list):
            yield f"{path}.route", "is not a list"
            continue
        for j, entry in enumerate(entries):
            dest = entry.get("destination", {}) if isinstance(entry, Mapping) else {}
            where = f"{path}.route[{j}].destination"
            if not isinstance(dest, Mapping):
                yield where, "is not a mapping"
                continue
            for key in ("host", "subset"):
                if key in dest and not isinstance(dest[key], str):
                    yield f"{where}.{key}", "is not a string"


def _live_dr_problems(spec: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    if "host" in spec and not isinstance(spec["host"], str):
        yield "spec.host", "is not a string"
    subsets = spec.get("subsets", [])
    if not isinstance(subsets, list):
        yield "spec.subsets", "is not a list"
        return
    for i, subset in enumerate(subsets):
        if not isinstance(subset, Mapping):
            yield f"spec.subsets[{i}]", "is not a mapping"
        elif not isinstance(subset.get("name"), str):
            yield f"spec.subsets[{i}].name", "is missing or not a string"


def _is_string_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    )


# --- validation --------------------------------------------------------------


def validate_objects(
    objs: Iterable[dict],
    *,
    source: str = "<memory>",
    schemas: Mapping[SchemaKey, dict] | None = None,
    context: Iterable[dict] = (),
) -> list[Problem]:
    """Every problem found in the objects, in document order.

    meshctl's rules always run; the CRD schema check runs when ``schemas``
    (from :func:`load_crd_schemas`) is given.  ``context`` holds objects checked
    elsewhere (another file) that references may point to, such as the
    DestinationRule whose subsets a VirtualService in ``objs`` routes to.
    """
    objs = list(objs)
    batch = objs + [o for o in context if isinstance(o, Mapping)]
    problems = []
    for index, obj in enumerate(objs):
        label = (
            object_label(obj, index) if isinstance(obj, Mapping) else f"#{index + 1}"
        )
        found = _object_problems(obj, batch, schemas)
        problems.extend(Problem(source, label, path, msg) for path, msg in found)
    return problems


def _object_problems(
    obj: Any, batch: list[dict], schemas: Mapping[SchemaKey, dict] | None
) -> Iterator[tuple[str, str]]:
    """(path, message) pairs for one object."""
    if not isinstance(obj, Mapping):
        yield "", f"is a {type(obj).__name__}, not a mapping"
        return
    yield from _metadata_problems(obj)
    if obj.get("kind") == VIRTUAL_SERVICE:
        yield from _virtual_service_problems(obj, batch)
    elif obj.get("kind") == DESTINATION_RULE:
        yield from _destination_rule_problems(obj)
    if schemas is not None:
        yield from _schema_problems(obj, schemas)


def _metadata_problems(obj: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Object name a DNS-1123 subdomain, namespace a DNS-1123 label."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        yield "metadata", "is missing"
        return
    name = meta.get("name")
    if not isinstance(name, str) or not _is_dns1123_subdomain(name):
        yield "metadata.name", f"{name!r} is not a DNS-1123 subdomain"
    namespace = meta.get("namespace")
    if namespace is not None and not _is_label(namespace):
        yield "metadata.namespace", f"{namespace!r} is not a DNS-1123 label"


def _is_dns1123_subdomain(name: str) -> bool:
    """True when ``name`` can name a Kubernetes object."""
    return len(name) <= 253 and bool(_DNS1123_SUBDOMAIN.match(name))


def _is_label(value: Any) -> bool:
    """True for a string that is a DNS-1123 label."""
    return isinstance(value, str) and protocol.is_dns1123_label(value)


def _virtual_service_problems(
    vs: Mapping[str, Any], batch: list[dict]
) -> Iterator[tuple[str, str]]:
    """meshctl's rules for a VirtualService."""
    spec = vs.get("spec")
    if not isinstance(spec, Mapping):
        yield "spec", "is missing"
        return
    routes = spec.get("http") or []
    if not any(spec.get(key) for key in ("http", "tcp", "tls")):
        yield "spec", "has no route (http, tcp or tls)"
    if not isinstance(routes, list):
        yield "spec.http", f"is a {type(routes).__name__}, not a list"
        return
    yield from _route_name_problems(routes)
    subsets_by_host = _subsets_by_host(batch)
    namespace = _namespace_of(vs)
    for i, route in enumerate(routes):
        if not isinstance(route, Mapping):
            yield f"spec.http[{i}]", "is not a mapping"
            continue
        yield from _route_problems(route, f"spec.http[{i}]")
        yield from _reference_problems(
            route, f"spec.http[{i}]", subsets_by_host, namespace
        )


def _route_name_problems(routes: list[Any]) -> Iterator[tuple[str, str]]:
    """Route names are unique within a VirtualService."""
    seen: dict[str, int] = {}
    for i, route in enumerate(routes):
        name = route.get("name") if isinstance(route, Mapping) else None
        if name is None:
            continue
        if not isinstance(name, str):
            yield f"spec.http[{i}].name", f"must be a string, not {name!r}"
        elif name in seen:
            yield f"spec.http[{i}].name", f"{name!r} repeats spec.http[{seen[name]}]"
        else:
            seen[name] = i


def _route_problems(route: Mapping[str, Any], path: str) -> Iterator[tuple[str, str]]:
    """One HTTP route: terminal action, matches, destinations and weights."""
    if not any(route.get(key) for key in _TERMINAL_ACTIONS):
        yield path, "has no destination, redirect, direct response or delegate"
    matches, entries = route.get("match") or [], route.get("route") or []
    for key, value in (("match", matches), ("route", entries)):
        if not isinstance(value, list):
            yield f"{path}.{key}", f"is a {type(value).__name__}, not a list"
            return
    for j, match in enumerate(matches):
        yield from _match_problems(match, f"{path}.match[{j}]")
    for k, entry in enumerate(entries):
        yield from _destination_problems(entry, f"{path}.route[{k}]")
    yield from _weight_sum_problems(entries, f"{path}.route")


def _match_problems(match: Any, path: str) -> Iterator[tuple[str, str]]:
    """Header keys in lower case; no regex over the length limit."""
    if not isinstance(match, Mapping):
        return
    for field in ("headers", "withoutHeaders"):
        headers = match.get(field) or {}
        if not isinstance(headers, Mapping):
            yield f"{path}.{field}", f"is a {type(headers).__name__}, not a mapping"
            continue
        for key in headers:
            if not isinstance(key, str) or key != key.lower():
                yield f"{path}.{field}.{key}", "header names must be lower case"
    for sub_path, regex in _regexes(match, path):
        if len(regex) > MAX_REGEX_CHARS:
            yield sub_path, f"regex has {len(regex)} chars, over {MAX_REGEX_CHARS}"


def _regexes(node: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every ``regex`` string value under a match, with its path."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "regex" and isinstance(value, str):
                yield f"{path}.regex", value
            else:
                yield from _regexes(value, f"{path}.{key}")


def _destination_problems(entry: Any, path: str) -> Iterator[tuple[str, str]]:
    """A route destination: a host, a DNS-1123 subset, an integer weight >= 0."""
    if not isinstance(entry, Mapping) or not isinstance(
        entry.get("destination"), Mapping
    ):
        yield path, "has no destination"
        return
    dest = entry["destination"]
    if not dest.get("host"):
        yield f"{path}.destination.host", "is missing"
    subset = dest.get("subset")
    if subset is not None and not _is_label(subset):
        yield f"{path}.destination.subset", f"{subset!r} is not a DNS-1123 label"
    if "weight" in entry and not is_weight(entry["weight"]):
        yield f"{path}.weight", f"{entry['weight']!r} is not an integer >= 0"


def is_weight(value: Any) -> bool:
    """True for an integer (not a bool) that is zero or more: a valid route weight."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _weight_sum_problems(entries: list[Any], path: str) -> Iterator[tuple[str, str]]:
    """With several destinations, weights must be given and sum to more than 0."""
    if len(entries) < 2:
        return
    weights = [e.get("weight") for e in entries if isinstance(e, Mapping)]
    given = [w for w in weights if w is not None]
    if not given:
        yield path, f"{len(entries)} destinations and no weights"
    elif all(is_weight(w) for w in given) and sum(given) == 0:
        yield path, "weights sum to 0"


def _namespace_of(obj: Mapping[str, Any]) -> str | None:
    """The object's namespace when it names one as a string, else None."""
    meta = obj.get("metadata")
    namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
    return namespace if isinstance(namespace, str) else None


def _subsets_by_host(batch: list[dict]) -> dict[tuple[str | None, str], set[str]]:
    """Subset names per (namespace, short host) of the DestinationRules in a batch."""
    found: dict[tuple[str | None, str], set[str]] = {}
    for obj in batch:
        if not isinstance(obj, Mapping) or obj.get("kind") != DESTINATION_RULE:
            continue
        namespace = _namespace_of(obj)
        spec = obj.get("spec")
        spec = spec if isinstance(spec, Mapping) else {}
        host = short_host(str(spec.get("host", "")), namespace)
        subsets = spec.get("subsets")
        subsets = subsets if isinstance(subsets, list) else []
        names = {s.get("name") for s in subsets if isinstance(s, Mapping)}
        found.setdefault((namespace, host), set()).update(names)
    return found


def _reference_problems(
    route: Mapping[str, Any],
    path: str,
    subsets_by_host: dict[tuple[str | None, str], set[str]],
    namespace: str | None,
) -> Iterator[tuple[str, str]]:
    """Subsets a route references exist in the batch's DestinationRule for the host."""
    for k, dest in enumerate(route_destinations(route)):
        subset = dest.get("subset")
        host = short_host(str(dest.get("host", "")), namespace)
        known = subsets_by_host.get((namespace, host))
        if not isinstance(subset, str):
            continue
        if subset and known is not None and subset not in known:
            yield (
                f"{path}.route[{k}].destination.subset",
                f"subset {subset!r} is not defined by the DestinationRule for {host}",
            )


def _destination_rule_problems(dr: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """meshctl's rules for a DestinationRule: a host, unique DNS-1123 subset names."""
    spec = dr.get("spec")
    if not isinstance(spec, Mapping):
        yield "spec", "is missing"
        return
    if not spec.get("host"):
        yield "spec.host", "is missing"
    subsets = spec.get("subsets") or []
    if not isinstance(subsets, list):
        yield "spec.subsets", f"is a {type(subsets).__name__}, not a list"
        return
    seen = set()
    for i, subset in enumerate(subsets):
        name = subset.get("name") if isinstance(subset, Mapping) else None
        if not _is_label(name):
            yield f"spec.subsets[{i}].name", f"{name!r} is not a DNS-1123 label"
        elif name in seen:
            yield f"spec.subsets[{i}].name", f"{name!r} is defined twice"
        seen.add(name)


def _schema_problems(
    obj: Mapping[str, Any], schemas: Mapping[SchemaKey, dict]
) -> Iterator[tuple[str, str]]:
    """Every error the CRD schema finds in the object."""
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    key = (group, str(obj.get("kind", "")), version)
    schema = schemas.get(key)
    if schema is None:
        yield "apiVersion", f"no CRD schema for {group}/{version} {key[1]}"
        return
    validator = _SchemaValidator(schema)
    for error in sorted(validator.iter_errors(obj), key=_error_sort_key):
        yield _json_path(error.absolute_path), _schema_message(error)


def _error_sort_key(error: jsonschema.ValidationError) -> tuple[str, str]:
    """Document order of schema errors, by path then message."""
    return (_json_path(error.absolute_path), error.message)


def _json_path(parts: Iterable[Any]) -> str:
    """``spec.http[1].route[0].weight`` from jsonschema's path parts."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _schema_message(error: jsonschema.ValidationError) -> str:
    """A schema error's message, trimmed so a large instance does not flood logs."""
    if error.validator == _CEL_KEYWORD:
        return f"CEL: {error.message}"
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = set(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - known)
        return f"unknown field(s) {', '.join(map(repr, extra))}"
    message = error.message
    if len(message) > _MESSAGE_CHARS:
        message = message[: _MESSAGE_CHARS - 3] + "..."
    return f"schema: {message}"


# --- CEL rules ---------------------------------------------------------------


@functools.cache
def _cel_program(rule: str) -> Any:
    """The compiled program of one CEL rule; None when it is not run.

    The reason a rule is not run is logged once: ``cel-python`` missing, a
    rule it cannot compile, or a transition rule (``oldSelf``).
    """
    if "oldSelf" in rule:
        return None
    try:
        import celpy
    except ImportError:
        log.warning(
            "cel-python is not installed: CEL rule %r and the CRDs' other CEL "
            "rules are not evaluated",
            rule,
        )
        return None
    try:
        environment = celpy.Environment()
        return environment.program(environment.compile(rule))
    except Exception as err:  # the library's parse and compile errors vary
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        log.warning(
            "CEL rule %r cannot be compiled by cel-python (%s: %s); it is skipped",
            rule,
            type(err).__name__,
            first_line,
        )
        return None


def _cel_check(
    validator: Any, rules: list[dict], instance: Any, schema: dict
) -> Iterator[jsonschema.ValidationError]:
    """The ``x-kubernetes-validations`` keyword: each rule on this field's value."""
    for rule in rules:
        text = str(rule.get("rule", ""))
        program = _cel_program(text)
        if program is None:
            continue
        failure = _cel_failure(program, instance)
        if failure is not None:
            message = rule.get("message") or f"failed rule {text}"
            yield jsonschema.ValidationError(f"{message} (rule {text}{failure})")


def _cel_failure(program: Any, instance: Any) -> str | None:
    """None when the rule holds, else what went wrong ("" for plain false)."""
    import celpy

    try:
        result = program.evaluate({"self": celpy.json_to_cel(instance)})
    except Exception as err:  # an evaluation error fails the rule, as in Kubernetes
        return f"; cannot be evaluated: {type(err).__name__}"
    if isinstance(result, celpy.CELEvalError):
        return "; cannot be evaluated"
    return None if bool(result) else ""


_SchemaValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {_CEL_KEYWORD: _cel_check}
)
