"""Field ownership as the API server tracks it: field sets per manager.

A field set is a set of paths (tuples of map keys) to the leaves of an object:
a scalar, a list (every list is atomic here, as the lists of Istio's CRDs are),
or an empty map.  Server-side apply compares the applier's set with every other
manager's: a field both claim with different values is a conflict, and fields
the applier owned before but leaves out now are removed unless another manager
still owns them.  An update (create, put, merge or JSON patch) never conflicts:
it takes the fields whose values it changed from everyone else.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

Path = tuple[str, ...]
MISSING = object()

# Metadata the server keeps itself; nobody owns it.
_SERVER_METADATA = {
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
}


def leaf_paths(obj: Mapping[str, Any]) -> set[Path]:
    """The owned leaves of an object: everything but the server's own fields."""
    paths = set()
    for key, value in obj.items():
        if key in ("apiVersion", "kind", "status"):
            continue
        if key == "metadata" and isinstance(value, Mapping):
            for meta_key, meta_value in value.items():
                if meta_key not in _SERVER_METADATA:
                    paths.update(_walk(meta_value, ("metadata", meta_key)))
            continue
        paths.update(_walk(value, (key,)))
    return paths


def _walk(value: Any, path: Path) -> Iterator[Path]:
    """Leaf paths under one value."""
    if isinstance(value, Mapping) and value:
        for key, sub in value.items():
            yield from _walk(sub, (*path, key))
    else:
        yield path


def get_path(obj: Any, path: Path) -> Any:
    """The value at ``path``, or ``MISSING``."""
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return MISSING
        obj = obj[key]
    return obj


def delete_path(obj: dict, path: Path) -> None:
    """Remove the value at ``path`` and any map it leaves empty."""
    parents = []
    node = obj
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            return
        parents.append((node, key))
        node = node[key]
    node.pop(path[-1], None)
    for parent, key in reversed(parents):
        if parent[key] or (parent is obj and key in ("metadata", "spec")):
            break
        parent.pop(key)


def overlaps(a: Path, b: Path) -> bool:
    """True when one path is the other or lies under it."""
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def deep_merge(base: dict, patch: Mapping[str, Any]) -> dict:
    """Maps merge key by key; lists and scalars in ``patch`` replace."""
    merged = copy.deepcopy(base)
    for key, value in patch.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def changed_paths(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> set[Path]:
    """Leaves of ``new`` whose value differs from ``old``, and leaves ``new`` lost."""
    old_paths = leaf_paths(old) if old is not None else set()
    changed = {
        p
        for p in leaf_paths(new)
        if old is None or get_path(old, p) != get_path(new, p)
    }
    removed = {p for p in old_paths if get_path(new, p) is MISSING}
    return changed | removed


def to_fields_v1(paths: Iterable[Path]) -> dict:
    """A field set in the ``FieldsV1`` form of ``metadata.managedFields``."""
    tree: dict = {}
    for path in sorted(paths):
        node = tree
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return tree


def dotted(path: Path) -> str:
    """``.spec.http``: how the API server names a field in a conflict."""
    return "".join(f".{key}" for key in path)
