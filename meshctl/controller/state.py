"""The controller's state file: what a restarted controller needs to go on.

After each armed round and each round's feedback the controller writes one
JSON document, atomically (a temporary file in the same directory, fsync, then
a rename), so a restart finds either the previous state or the new one, never
half of each.  The document holds:

- ``kind`` (``meshctl-controller-state``) and ``version`` (:data:`VERSION`);
- ``saved_at_unix``: when it was written (wall clock, seconds);
- ``history``: per client, the last ``history_limit`` feedback outcomes
  (oldest first), the fields of :class:`~meshctl.types.SlotOutcome`;
- ``slots``: the slot-to-client map of the most recent rounds, by round;
- ``rounds``: a compact record of the same rounds (selected clients, routing
  version, weights, note), oldest first;
- ``hysteresis``: the live selection, its weights and its age in seconds;
- ``rng``: the state of the controller's random generator;
- ``policy``: the policy's name and its ``memory``, the instance attributes it
  learns (Oort's arms, exploration and pacer; the mesh policy's smoothed
  estimates), settings left out: the settings of the restarted policy apply.

Non-finite numbers (a NaN training loss) are written as ``NaN`` and
``Infinity``, as Python's ``json`` reads them back.  A file that cannot be
read, is not JSON, is of another kind or version, or has a malformed field
raises :class:`ControllerStateError` naming the file and the field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import json
import math
import os
import random
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meshctl.files import atomic_write
from meshctl.routing.hysteresis import HysteresisState
from meshctl.types import ClientFeedback, SlotOutcome

KIND = "meshctl-controller-state"
VERSION = 1
# Feedback outcomes kept per client: the policies fold each outcome into what
# they learn once (their memory is saved too) and read back only the latest.
DEFAULT_HISTORY_LIMIT = 64
# Rounds whose slot map and record are kept: the round in flight is the last.
DEFAULT_ROUNDS_KEPT = 64
# Policy memory may hold instances of dataclasses from these packages only.
_TRUSTED_MODULES = ("meshctl.policies", "meshctl.types")
_TYPE = "$type"
# Values that are their own JSON: no subclass, which could be an enum.
_PLAIN = frozenset({str, int, float, bool, type(None)})
# The arrays policy memory may hold, by dtype, and what each of their items is.
_ARRAY_DTYPES: dict[str, type | tuple[type, ...]] = {"<f8": (float, int), "<i8": int}


class ControllerStateError(RuntimeError):
    """The state file cannot be read, is of another version, or is malformed."""

    def __init__(self, path: Path, field_name: str, problem: str) -> None:
        super().__init__(f"controller state file {path}: {field_name}: {problem}")
        self.path = path
        self.field = field_name


class PolicyMemoryMismatch(ValueError):
    """Saved policy memory that does not fit the policy of this run."""


@dataclass(frozen=True)
class RoundSummary:
    """What a saved round keeps of its :class:`RoundRecord`."""

    server_round: int
    selected: tuple[str, ...]
    routing_version: str
    weights: Mapping[str, int] = field(default_factory=dict)
    routing_note: str = ""


@dataclass(frozen=True)
class ControllerState:
    """Everything the state file holds, parsed (policy memory still encoded)."""

    history: Mapping[str, Sequence[ClientFeedback]]
    slots: Mapping[int, Mapping[int, str]]
    rounds: Sequence[RoundSummary]
    hysteresis: HysteresisState
    rng_state: tuple
    policy_name: str
    policy_memory: Mapping[str, Any] | None
    saved_at_unix: float


class StateStore:
    """Reads and writes the controller's state file at ``path``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def check_writable(self) -> None:
        """Raise :class:`ControllerStateError` unless a state can be saved here.

        Checked at start: a volume mounted at the wrong path would otherwise
        only show as a failed save after every round.
        """
        directory = self.path.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):
                pass
        except OSError as exc:
            raise ControllerStateError(
                self.path, "(directory)", f"cannot write in {directory}: {exc}"
            ) from exc

    def load(self) -> ControllerState | None:
        """The saved state, or None when there is no file yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ControllerStateError(
                self.path, "(file)", f"cannot read: {exc}"
            ) from exc
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ControllerStateError(
                self.path, "(file)", f"not JSON (truncated or corrupted?): {exc}"
            ) from exc
        return _Parser(self.path).state(document)

    def save(self, state: ControllerState) -> None:
        """Write ``state`` atomically; raises OSError when the write fails."""
        document = {
            "kind": KIND,
            "version": VERSION,
            "saved_at_unix": state.saved_at_unix,
            "history": {
                client: [_outcome_json(f.outcome) for f in feedback]
                for client, feedback in state.history.items()
            },
            "slots": {
                str(server_round): {str(s): c for s, c in sorted(slots.items())}
                for server_round, slots in state.slots.items()
            },
            "rounds": [dataclasses.asdict(r) for r in state.rounds],
            "hysteresis": {
                "live": list(state.hysteresis.live)
                if state.hysteresis.live is not None
                else None,
                "live_weights": state.hysteresis.live_weights,
                "age_s": state.hysteresis.age_s,
            },
            "rng": _rng_json(state.rng_state),
            "policy": {"name": state.policy_name, "memory": state.policy_memory},
        }
        atomic_write(
            self.path, json.dumps(document, separators=(",", ":")).encode("utf-8")
        )

    def set_aside(self) -> Path:
        """Rename a rejected file out of the way (kept for inspection)."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.rejected-{stamp}")
        os.replace(self.path, target)
        return target


# --- policy memory ----------------------------------------------------------------


def policy_memory(policy: object) -> dict[str, Any]:
    """The policy's learnt attributes, encoded as JSON data.

    Frozen dataclasses (the policy's settings) are left out.  Raises
    :class:`PolicyMemoryMismatch` when an attribute holds something the state
    file cannot carry.
    """
    learnt = {
        name: value
        for name, value in vars(policy).items()
        if not _is_frozen_dataclass(value)
    }
    return {name: _encode(value, name) for name, value in learnt.items()}


def restore_policy_memory(
    policy: object, memory: Mapping[str, Any], path: Path
) -> None:
    """Put saved memory back into a new policy of the same kind.

    Raises :class:`PolicyMemoryMismatch` (nothing restored) when the memory
    names attributes the policy does not have or values of another type, and
    :class:`ControllerStateError` when the memory is malformed.
    """
    current = vars(policy)
    decoded = {}
    for name, encoded in memory.items():
        value = _decode(encoded, f"policy.memory.{name}", path)
        if name not in current:
            raise PolicyMemoryMismatch(f"the policy has no attribute {name!r}")
        old = current[name]
        if old is not None and value is not None and type(old) is not type(value):
            raise PolicyMemoryMismatch(
                f"attribute {name!r} is a {type(old).__name__}, "
                f"saved as a {type(value).__name__}"
            )
        decoded[name] = value
    for name, value in decoded.items():
        setattr(policy, name, value)


def _is_frozen_dataclass(value: object) -> bool:
    return (
        dataclasses.is_dataclass(value)
        and not isinstance(value, type)
        and type(value).__dataclass_params__.frozen
    )


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _trusted(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in _TRUSTED_MODULES)


def _encode(value: Any, where: str) -> Any:
    """JSON data for ``value``; containers other than lists carry a type tag."""
    if isinstance(value, enum.Enum):
        if not _trusted(type(value).__module__):
            raise PolicyMemoryMismatch(f"{where}: {type(value).__name__} is not saved")
        return {_TYPE: "enum", "class": _class_name(type(value)), "value": value.value}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.str not in _ARRAY_DTYPES:
            raise PolicyMemoryMismatch(f"{where}: a {value.dtype}{value.shape} array")
        return {_TYPE: "array", "dtype": value.dtype.str, "items": value.tolist()}
    if isinstance(value, list):
        if all(type(v) in _PLAIN for v in value):  # a client per item: many
            return list(value)
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple | set | frozenset | deque):
        items = list(value)
        if isinstance(value, set | frozenset):
            with contextlib.suppress(TypeError):
                items.sort()
        encoded = {
            _TYPE: type(value).__name__,
            "items": [_encode(v, f"{where}[{i}]") for i, v in enumerate(items)],
        }
        if isinstance(value, deque):
            encoded["maxlen"] = value.maxlen
        return encoded
    if isinstance(value, dict):
        return {
            _TYPE: "dict",
            "items": [
                [_encode(k, f"{where}.key"), _encode(v, f"{where}[{k!r}]")]
                for k, v in value.items()
            ],
        }
    if dataclasses.is_dataclass(value) and _trusted(type(value).__module__):
        return {
            _TYPE: "dataclass",
            "class": _class_name(type(value)),
            "fields": {
                f.name: _encode(getattr(value, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(value)
            },
        }
    raise PolicyMemoryMismatch(f"{where}: a {type(value).__name__} is not saved")


def _decode(value: Any, where: str, path: Path) -> Any:
    """The value :func:`_encode` encoded."""
    if isinstance(value, list):
        return [_decode(v, f"{where}[{i}]", path) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TYPE)
    if tag in (
        "tuple",
        "set",
        "frozenset",
        "deque",
        "dict",
        "array",
    ) and not isinstance(value.get("items"), list):
        article = "an" if tag[0] in "aeiou" else "a"
        raise ControllerStateError(
            path, where, f"{article} {tag} without an 'items' list"
        )
    if tag in ("tuple", "set", "frozenset"):
        items = [
            _decode(v, f"{where}[{i}]", path) for i, v in enumerate(value["items"])
        ]
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    if tag == "array":
        return _array(value, where, path)
    if tag == "deque":
        items = [
            _decode(v, f"{where}[{i}]", path) for i, v in enumerate(value["items"])
        ]
        return deque(items, maxlen=value.get("maxlen"))
    if tag == "dict":
        pairs = value["items"]
        if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise ControllerStateError(path, where, "dict items must be [key, value]")
        return {
            _decode(k, f"{where}.key", path): _decode(v, f"{where}[{k!r}]", path)
            for k, v in pairs
        }
    if tag == "dataclass":
        cls = _trusted_class(value.get("class"), where, path)
        fields = value.get("fields")
        if not dataclasses.is_dataclass(cls) or not isinstance(fields, dict):
            raise ControllerStateError(path, where, "a dataclass needs its fields")
        decoded = {k: _decode(v, f"{where}.{k}", path) for k, v in fields.items()}
        try:
            return cls(**decoded)
        except (TypeError, ValueError) as exc:
            raise PolicyMemoryMismatch(f"{where}: {exc}") from exc
    if tag == "enum":
        cls = _trusted_class(value.get("class"), where, path)
        try:
            return cls(value.get("value"))
        except (TypeError, ValueError) as exc:
            raise PolicyMemoryMismatch(f"{where}: {exc}") from exc
    raise ControllerStateError(path, where, f"unknown type tag {tag!r}")


def _array(value: dict, where: str, path: Path) -> np.ndarray:
    """The one-dimensional array of numbers :func:`_encode` encoded."""
    dtype = value.get("dtype")
    if dtype not in _ARRAY_DTYPES:
        raise ControllerStateError(path, where, f"an array of dtype {dtype!r}")
    items = value["items"]
    kind = _ARRAY_DTYPES[dtype]
    if not all(isinstance(v, kind) and not isinstance(v, bool) for v in items):
        raise ControllerStateError(
            path, where, f"an array of {dtype} holds {str(items)[:80]}"
        )
    try:
        return np.array(items, dtype=dtype)
    except OverflowError as exc:
        raise ControllerStateError(path, where, f"an array of {dtype}: {exc}") from exc


def _trusted_class(name: object, where: str, path: Path) -> type:
    """The class ``module:qualname`` names, from the trusted packages only."""
    if not isinstance(name, str) or ":" not in name:
        raise ControllerStateError(path, where, f"bad class name {name!r}")
    module_name, qualname = name.split(":", 1)
    if not _trusted(module_name):
        raise ControllerStateError(path, where, f"class {name} is not a policy's")
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise PolicyMemoryMismatch(f"{where}: class {name} no longer exists") from exc
    return found


# --- parsing ----------------------------------------------------------------------


class _Parser:
    """Reads a state document field by field; errors name the field."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, field_name: str, problem: str) -> ControllerStateError:
        return ControllerStateError(self.path, field_name, problem)

    def get(self, obj: Mapping, key: str, kind: type | tuple, where: str) -> Any:
        """``obj[key]``, which must be of ``kind``."""
        if key not in obj:
            raise self.fail(where, "missing")
        value = obj[key]
        if not isinstance(value, kind) or (
            isinstance(value, bool) and bool not in _kinds(kind)
        ):
            raise self.fail(where, f"expected {_kind_name(kind)}, found {value!r:.80}")
        return value

    def state(self, document: object) -> ControllerState:
        if not isinstance(document, dict):
            raise self.fail("(document)", "expected a JSON object")
        kind = self.get(document, "kind", str, "kind")
        if kind != KIND:
            raise self.fail("kind", f"expected {KIND!r}, found {kind!r}")
        version = self.get(document, "version", int, "version")
        if version != VERSION:
            raise self.fail(
                "version", f"this meshctl reads version {VERSION}, found {version}"
            )
        policy = self.get(document, "policy", dict, "policy")
        memory = self.get(policy, "memory", (dict, type(None)), "policy.memory")
        return ControllerState(
            history=self.history(self.get(document, "history", dict, "history")),
            slots=self.slots(self.get(document, "slots", dict, "slots")),
            rounds=self.rounds(self.get(document, "rounds", list, "rounds")),
            hysteresis=self.hysteresis(
                self.get(document, "hysteresis", dict, "hysteresis")
            ),
            rng_state=self.rng(self.get(document, "rng", list, "rng")),
            policy_name=self.get(policy, "name", str, "policy.name"),
            policy_memory=memory,
            saved_at_unix=float(
                self.get(document, "saved_at_unix", (int, float), "saved_at_unix")
            ),
        )

    def history(self, raw: dict) -> dict[str, list[ClientFeedback]]:
        history = {}
        for client, items in raw.items():
            where = f"history.{client}"
            if not isinstance(items, list):
                raise self.fail(where, "expected a list of outcomes")
            history[client] = [
                ClientFeedback(client, self.outcome(item, f"{where}[{i}]"))
                for i, item in enumerate(items)
            ]
        return history

    def outcome(self, item: object, where: str) -> SlotOutcome:
        if not isinstance(item, dict):
            raise self.fail(where, "expected an object")
        known = {f.name for f in dataclasses.fields(SlotOutcome)}
        unknown = sorted(set(item) - known)
        if unknown:
            raise self.fail(where, f"unknown fields {unknown}")
        self.get(item, "server_round", int, f"{where}.server_round")
        self.get(item, "slot", int, f"{where}.slot")
        self.get(item, "status", str, f"{where}.status")
        self.get(item, "duration_s", (int, float), f"{where}.duration_s")
        try:
            return SlotOutcome(**item)
        except TypeError as exc:
            raise self.fail(where, str(exc)) from exc

    def slots(self, raw: dict) -> dict[int, dict[int, str]]:
        slots = {}
        for server_round, assignment in raw.items():
            where = f"slots.{server_round}"
            if not isinstance(assignment, dict):
                raise self.fail(where, "expected an object of slot: client")
            slots[self.number(server_round, where)] = {
                self.number(slot, f"{where}.{slot}"): self.get(
                    assignment, slot, str, f"{where}.{slot}"
                )
                for slot in assignment
            }
        return slots

    def number(self, text: str, where: str) -> int:
        if not text.isdigit():
            raise self.fail(where, f"expected a positive integer key, found {text!r}")
        return int(text)

    def rounds(self, raw: list) -> list[RoundSummary]:
        rounds = []
        for i, item in enumerate(raw):
            where = f"rounds[{i}]"
            if not isinstance(item, dict):
                raise self.fail(where, "expected an object")
            selected = self.get(item, "selected", list, f"{where}.selected")
            weights = self.get(item, "weights", dict, f"{where}.weights")
            rounds.append(
                RoundSummary(
                    server_round=self.get(
                        item, "server_round", int, f"{where}.server_round"
                    ),
                    selected=tuple(self.strings(selected, f"{where}.selected")),
                    routing_version=self.get(
                        item, "routing_version", str, f"{where}.routing_version"
                    ),
                    weights=self.weights(weights, f"{where}.weights"),
                    routing_note=self.get(
                        item, "routing_note", str, f"{where}.routing_note"
                    ),
                )
            )
        return rounds

    def strings(self, items: list, where: str) -> list[str]:
        if not all(isinstance(item, str) for item in items):
            raise self.fail(where, "expected a list of client names")
        return items

    def weights(self, raw: dict, where: str) -> dict[str, int]:
        for client in raw:
            self.get(raw, client, int, f"{where}.{client}")
        return dict(raw)

    def hysteresis(self, raw: dict) -> HysteresisState:
        live = self.get(raw, "live", (list, type(None)), "hysteresis.live")
        weights = self.get(
            raw, "live_weights", (dict, type(None)), "hysteresis.live_weights"
        )
        age_s = self.get(raw, "age_s", (int, float, type(None)), "hysteresis.age_s")
        if age_s is not None and not math.isfinite(age_s):
            raise self.fail("hysteresis.age_s", f"expected seconds, found {age_s}")
        return HysteresisState(
            live=tuple(self.strings(live, "hysteresis.live"))
            if live is not None
            else None,
            live_weights=self.weights(weights, "hysteresis.live_weights")
            if weights is not None
            else None,
            age_s=float(age_s) if age_s is not None else None,
        )

    def rng(self, raw: list) -> tuple:
        """``random.getstate()`` from its JSON form; checked by a trial setstate."""
        if len(raw) != 3 or not isinstance(raw[1], list):
            raise self.fail("rng", "expected [version, [internal state], gauss_next]")
        state = (raw[0], tuple(raw[1]), raw[2])
        try:
            random.Random().setstate(state)
        except (TypeError, ValueError, OverflowError) as exc:
            raise self.fail("rng", f"not a random generator state: {exc}") from exc
        return state


def _kinds(kind: type | tuple) -> tuple:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }
    return " or ".join(names.get(k, k.__name__) for k in _kinds(kind))


def _outcome_json(outcome: SlotOutcome) -> dict:
    return dataclasses.asdict(outcome)


def _rng_json(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]
