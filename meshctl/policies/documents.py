"""Selection policies as documents: ``SelectionPolicy`` YAML, its schema, a loader.

A policy file holds one document::

    apiVersion: meshctl.io/v1alpha1
    kind: SelectionPolicy
    metadata:
      name: oort
    spec:
      algorithm: oort
      clientsPerRound: 5
      exploration: {initial: 0.9, decay: 0.98, min: 0.3}

Every section is optional and every field has a default (see :data:`DEFAULTS`);
which sections an algorithm accepts is in :data:`SECTIONS`.  A bad document is
reported with the file, the line and the field of each problem
(``policies/oort.yaml:7: spec.exploration.decay: 1.5 is greater than the
maximum of 1``): the loader keeps YAML's node marks and maps each schema error's
JSON path to the line of the node it names.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

API_VERSION = "meshctl.io/v1alpha1"
KIND = "SelectionPolicy"

_NUMBER = {"type": "number"}
_SHARE = {"type": "number", "minimum": 0, "maximum": 1}
_POSITIVE = {"type": "number", "exclusiveMinimum": 0}
_NON_NEGATIVE = {"type": "number", "minimum": 0}
_COUNT = {"type": "integer", "minimum": 1}
_OPTIONAL_COUNT = {"type": ["integer", "null"], "minimum": 1}


def _section(description: str, **fields: dict) -> dict:
    return {
        "type": "object",
        "description": description,
        "additionalProperties": False,
        "properties": fields,
    }


_OORT_SECTIONS = {
    "overcommit": {
        "type": "number",
        "minimum": 1,
        "description": "clients chosen per slot asked for; each gets a slot",
    },
    "exploration": _section(
        "epsilon-greedy exploration of clients never played",
        initial=_SHARE,
        decay=_SHARE,
        min=_SHARE,
        sampleWindow={"type": "number", "minimum": 1},
    ),
    "deadline": _section(
        "the preferred round duration T and the pacer that moves it",
        percentile={"type": "number", "minimum": 0, "maximum": 100},
        penalty=_NON_NEGATIVE,
        pacerStep=_COUNT,
        pacerDelta=_NON_NEGATIVE,
    ),
    "weights": _section(
        "statistical utility: clipping, cut-off and staleness bonus",
        clipBound=_SHARE,
        cutOff=_SHARE,
        staleness=_NON_NEGATIVE,
    ),
    "fairness": _section(
        "rest the clients that took part more than blocklistRounds times",
        blocklistRounds={"type": ["integer", "null"], "minimum": 0},
        blocklistMaxShare=_SHARE,
    ),
}

SECTIONS: dict[str, dict[str, dict]] = {
    "random": {},
    "oort": _OORT_SECTIONS,
    "pyramidfl": {
        **_OORT_SECTIONS,
        "adaptation": _section(
            "extra local steps for clients faster than the straggler",
            beta=_NON_NEGATIVE,
            maxExtraFactor=_NON_NEGATIVE,
        ),
    },
    "power-of-choice": {
        "candidates": _section(
            "the candidate set: d clients, or dFactor times clientsPerRound",
            d=_OPTIONAL_COUNT,
            dFactor={"type": "number", "minimum": 1},
        ),
    },
    "mesh": {
        "exploration": _section(
            "the share of slots for clients never measured", share=_SHARE
        ),
        "smoothing": _section(
            "Holt smoothing of latency and error ratio", level=_SHARE, trend=_SHARE
        ),
        "weights": _section(
            "exponents of the score's factors",
            utility=_NON_NEGATIVE,
            latencyPenalty=_NON_NEGATIVE,
            staleness=_NON_NEGATIVE,
            reliability=_NON_NEGATIVE,
        ),
        "filters": _section(
            "clients left out while another can take the slot",
            maxErrorRatio=_SHARE,
            excludeEjected={"type": "boolean"},
            ejectionCooldownRounds={"type": "integer", "minimum": 0},
            deadlineMs={"type": ["number", "null"], "exclusiveMinimum": 0},
        ),
        "fairness": _section(
            "a participation floor and a cap on any client's share of rounds",
            maxIdleRounds=_OPTIONAL_COUNT,
            maxShare=_SHARE,
            shareWindowRounds=_COUNT,
        ),
        "hysteresis": _section(
            "a score bonus for the last round's clients", stickiness=_NON_NEGATIVE
        ),
    },
}

ALGORITHMS = tuple(sorted(SECTIONS))

DEFAULTS: dict[str, dict[str, Any]] = {
    "random": {},
    "oort": {
        "overcommit": 1.3,
        "exploration": {"initial": 0.9, "decay": 0.98, "min": 0.3, "sampleWindow": 5.0},
        "deadline": {
            "percentile": 30,
            "penalty": 2.0,
            "pacerStep": 20,
            "pacerDelta": 5,
        },
        "weights": {"clipBound": 0.9, "cutOff": 0.95, "staleness": 0.1},
        "fairness": {"blocklistRounds": None, "blocklistMaxShare": 0.3},
    },
    "power-of-choice": {"candidates": {"d": None, "dFactor": 2.0}},
    "mesh": {
        "exploration": {"share": 0.2},
        "smoothing": {"level": 0.5, "trend": 0.3},
        "weights": {
            "utility": 1.0,
            "latencyPenalty": 2.0,
            "reliability": 2.0,
            "staleness": 0.1,
        },
        "filters": {
            "maxErrorRatio": 0.5,
            "excludeEjected": True,
            "ejectionCooldownRounds": 2,
            "deadlineMs": None,
        },
        "fairness": {"maxIdleRounds": 10, "maxShare": 0.5, "shareWindowRounds": 4},
        "hysteresis": {"stickiness": 0.15},
    },
}
DEFAULTS["pyramidfl"] = {
    **copy.deepcopy(DEFAULTS["oort"]),
    "adaptation": {"beta": 1.0, "maxExtraFactor": 10.0},
}

_COMMON = {
    "algorithm": {"enum": list(ALGORITHMS)},
    "clientsPerRound": {
        **_COUNT,
        "description": "K, when the command that runs the policy does not say",
    },
    "window": _section(
        "how far back the controller reads telemetry",
        telemetrySeconds=_POSITIVE,
    ),
}


def _spec_schema(algorithm: str) -> dict:
    return {
        "if": {"properties": {"algorithm": {"const": algorithm}}},
        "then": {
            "properties": {**_COMMON, **SECTIONS[algorithm]},
            "additionalProperties": False,
        },
    }


SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": KIND,
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": KIND},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {
                    "type": "string",
                    "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                    "maxLength": 63,
                },
                "annotations": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                },
                "labels": {
                    "type": "object",
                    "additionalProperties": {"type": "string"},
                },
            },
        },
        "spec": {
            "type": "object",
            "required": ["algorithm"],
            "properties": _COMMON,
            "allOf": [_spec_schema(a) for a in ALGORITHMS],
        },
    },
}
"""The JSON schema (draft 2020-12) a ``SelectionPolicy`` document must pass."""


class PolicyDocumentError(Exception):
    """A policy file that cannot be read or does not pass the schema.

    ``problems`` lists each one as ``path:line: field: message``.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PolicyDocument:
    """A valid ``SelectionPolicy``, its spec completed with the defaults."""

    name: str
    algorithm: str
    spec: Mapping[str, Any]
    source: str = "<memory>"

    @property
    def clients_per_round(self) -> int | None:
        return self.spec.get("clientsPerRound")

    @property
    def telemetry_window_s(self) -> float | None:
        return self.spec.get("window", {}).get("telemetrySeconds")


# -- loading ------------------------------------------------------------------


def load_file(path: str | Path) -> PolicyDocument:
    """The one ``SelectionPolicy`` in ``path``; raise :class:`PolicyDocumentError`."""
    path = Path(path)
    text = _read(path)
    documents = _compose_all(path, text)
    if len(documents) != 1:
        raise PolicyDocumentError(
            [f"{path}:1: (file): holds {len(documents)} documents, expected one"]
        )
    node = documents[0]
    return from_mapping(_construct(path, node), source=str(path), node=node)


def file_problems(path: str | Path) -> list[str]:
    """Every problem of every ``SelectionPolicy`` in a (multi-document) file."""
    path = Path(path)
    try:
        nodes = _compose_all(path, _read(path))
    except PolicyDocumentError as exc:
        return exc.problems
    problems = []
    for node in nodes:
        try:
            obj = _construct(path, node)
        except PolicyDocumentError as exc:
            problems.extend(exc.problems)
            continue
        if isinstance(obj, dict) and obj.get("kind") == KIND:
            problems.extend(_problems(obj, str(path), node))
    return problems


def from_mapping(
    obj: Any, *, source: str = "<memory>", node: yaml.Node | None = None
) -> PolicyDocument:
    """Validate a parsed document and complete its spec with the defaults."""
    problems = _problems(obj, source, node)
    if problems:
        raise PolicyDocumentError(problems)
    spec = obj["spec"]
    algorithm = spec["algorithm"]
    return PolicyDocument(
        name=obj["metadata"]["name"],
        algorithm=algorithm,
        spec=_with_defaults(DEFAULTS[algorithm], spec),
        source=source,
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyDocumentError(
            [f"{path}:0: (file): cannot read: {exc.strerror}"]
        ) from exc
    except UnicodeDecodeError as exc:
        raise PolicyDocumentError(
            [f"{path}:0: (file): not UTF-8 text (byte {exc.start}: {exc.reason})"]
        ) from exc


def _compose_all(path: Path, text: str) -> list[yaml.Node]:
    try:
        return [n for n in yaml.compose_all(text, Loader=yaml.SafeLoader) if n]
    except yaml.YAMLError as exc:
        raise _yaml_problem(path, "YAML syntax error", exc) from exc
    except RecursionError as exc:
        raise PolicyDocumentError(
            [f"{path}:0: (file): YAML nested too deeply for a policy"]
        ) from exc


def _construct(path: Path, node: yaml.Node) -> Any:
    """The Python value of a composed document: unknown tags, unhashable keys
    and documents that hold themselves are problems of the file."""
    try:
        obj = yaml.safe_load(yaml.serialize(node))
    except yaml.YAMLError as exc:
        raise _yaml_problem(path, "YAML value error", exc) from exc
    except RecursionError as exc:
        line = node.start_mark.line + 1
        raise PolicyDocumentError(
            [f"{path}:{line}: (file): YAML nested too deeply for a policy"]
        ) from exc
    if _is_recursive(obj):
        line = node.start_mark.line + 1
        raise PolicyDocumentError(
            [f"{path}:{line}: (file): an anchor refers to its own value"]
        )
    return obj


def _is_recursive(obj: Any) -> bool:
    """True when a list or mapping holds itself (a depth-first walk that visits
    each shared value once, so that aliases cost no more than their anchors)."""
    gray, black = set(), set()
    stack = [iter([obj])]
    parents: list[int] = []
    while stack:
        child = next(stack[-1], _END)
        if child is _END:
            stack.pop()
            if parents:
                black.add(parents[-1])
                gray.discard(parents.pop())
            continue
        if not isinstance(child, dict | list) or id(child) in black:
            continue
        if id(child) in gray:
            return True
        gray.add(id(child))
        parents.append(id(child))
        stack.append(iter(child.values() if isinstance(child, dict) else child))
    return False


_END = object()


def _yaml_problem(path: Path, what: str, exc: yaml.YAMLError) -> PolicyDocumentError:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark else 0
    problem = getattr(exc, "problem", None) or str(exc)
    return PolicyDocumentError([f"{path}:{line}: (file): {what}: {problem}"])


def _with_defaults(defaults: Mapping[str, Any], spec: Mapping[str, Any]) -> dict:
    merged = copy.deepcopy(dict(defaults))
    for key, value in spec.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


# -- problems with lines ------------------------------------------------------


def _problems(obj: Any, source: str, node: yaml.Node | None) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    found = []
    for error in validator.iter_errors(obj):
        path = list(error.absolute_path)
        for leaf in _named_keys(error) or [None]:
            where = path + ([leaf] if leaf is not None else [])
            field = ".".join(str(p) for p in where) or "(document)"
            found.append((_line_of(node, where), field, _message(error, leaf)))
    # A field the common schema and an algorithm's section both describe is
    # reported once.
    return [
        f"{source}:{line}: {field}: {text}" for line, field, text in sorted(set(found))
    ]


def _named_keys(error: jsonschema.ValidationError) -> list[str]:
    """The keys an error is about when jsonschema reports it on the parent."""
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        return sorted(str(k) for k in error.instance if k not in allowed)
    if error.validator == "required" and "'" in error.message:
        return [error.message.split("'")[1]]
    return []


def _message(error: jsonschema.ValidationError, leaf: str | None) -> str:
    if error.validator == "additionalProperties" and leaf is not None:
        algorithm = error.instance.get("algorithm") if error.path else None
        if list(error.path) == ["spec"] and algorithm in SECTIONS:
            accepted = ", ".join(sorted({*_COMMON, *SECTIONS[algorithm]}))
            return f"not a field of algorithm {algorithm} (accepted: {accepted})"
        return "unknown field"
    if error.validator == "required" and leaf is not None:
        return "is required"
    if error.validator == "pattern" and list(error.path) == ["metadata", "name"]:
        return f"{error.instance!r} is not a DNS-1123 label (a-z, 0-9 and '-')"
    if list(error.path)[-1:] == ["algorithm"] and error.validator == "enum":
        return f"{error.instance!r} is not one of {', '.join(ALGORITHMS)}"
    return error.message


def _line_of(node: yaml.Node | None, path: list[Any]) -> int:
    """The 1-based line naming the field at ``path``, or its nearest ancestor."""
    if node is None:
        return 0
    line = node.start_mark.line + 1
    for step in path:
        if isinstance(node, yaml.MappingNode):
            pair = next((p for p in node.value if p[0].value == str(step)), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line + 1, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
            if not 0 <= step < len(node.value):
                break
            node = node.value[step]
            line = node.start_mark.line + 1
        else:
            break
    return line
