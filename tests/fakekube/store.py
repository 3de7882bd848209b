"""The fake API server's state: resource types, objects, versions, watch events.

Everything the HTTP layer needs, without HTTP: every operation takes plain
values and returns the object the server would answer with, or raises
``ApiError`` carrying the ``Status`` object and code the real server sends.
"""

from __future__ import annotations

import copy
import datetime
import itertools
import json
import threading
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema

from meshctl.routing import validate
from tests.fakekube import fields

APPLY = "Apply"
UPDATE = "Update"
EVENT_LOG_SIZE = 10_000


@dataclass(frozen=True)
class ResourceType:
    """One served resource in one version: what discovery lists."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    builtin: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """``virtualservices.networking.istio.io``, or ``pods`` for the core group."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def discovery(self) -> dict:
        """The ``APIResource`` entry of this type."""
        return {
            "name": self.plural,
            "singularName": self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        }


BUILTIN_TYPES = (
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False),
    ResourceType("", "v1", "pods", "Pod"),
    ResourceType("", "v1", "services", "Service"),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount"),
    ResourceType("", "v1", "configmaps", "ConfigMap"),
    ResourceType("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim"),
    ResourceType("", "v1", "events", "Event"),
    ResourceType("apps", "v1", "deployments", "Deployment"),
    ResourceType("apps", "v1", "statefulsets", "StatefulSet"),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ResourceType("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget"),
)


def crd_types(crd_path: str | Path) -> list[ResourceType]:
    """Every served version of every CustomResourceDefinition in a YAML file."""
    types = []
    for crd in validate.load_yaml_documents(crd_path):
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served", True):
                types.append(
                    ResourceType(
                        spec["group"],
                        version["name"],
                        spec["names"]["plural"],
                        spec["names"]["kind"],
                        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                        builtin=False,
                    )
                )
    return types


class ApiError(Exception):
    """An answer other than success, as the real server shapes it."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict | None = None
    ):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> dict:
        """The ``Status`` object sent as the response body."""
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }


def _details(rtype: ResourceType, name: str | None) -> dict:
    details = {"group": rtype.group, "kind": rtype.plural}
    if name:
        details["name"] = name
    return details


def not_found(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{rtype.group_resource} "{name}" not found',
        _details(rtype, name),
    )


def stale(rtype: ResourceType, name: str) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rtype.group_resource} "{name}": the '
        "object has been modified; please apply your changes to the latest version "
        "and try again",
        _details(rtype, name),
    )


def invalid(rtype: ResourceType, name: str, causes: list[tuple[str, str]]) -> ApiError:
    listed = ", ".join(f"{f}: {m}" for f, m in causes)
    details = _details(rtype, name)
    details["kind"] = rtype.kind
    details["causes"] = [
        {"reason": "FieldValueInvalid", "message": m, "field": f} for f, m in causes
    ]
    return ApiError(
        422,
        "Invalid",
        f'{rtype.kind}.{rtype.group or "core"} "{name}" is invalid: {listed}',
        details,
    )


def forbidden(
    rtype: ResourceType, name: str | None, verb: str, ns: str | None, user: str
):
    subject = f'{rtype.group_resource} "{name}"' if name else rtype.group_resource
    where = f' in the namespace "{ns}"' if ns else " at the cluster scope"
    return ApiError(
        403,
        "Forbidden",
        f'{subject} is forbidden: User "{user}" cannot {verb} resource '
        f'"{rtype.plural}" in API group "{rtype.group}"{where}',
        _details(rtype, name),
    )


@dataclass
class StoredObject:
    """One object and who owns which of its fields."""

    rtype: ResourceType
    body: dict
    managers: dict[tuple[str, str], set[fields.Path]] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    """One watch event, kept in the server's event log."""

    resource_version: int
    type: str
    group: str
    plural: str
    obj: dict


@dataclass(frozen=True)
class WriteOptions:
    """The query parameters every write takes."""

    field_manager: str
    dry_run: bool = False
    force: bool = False
    strict_fields: bool = False


class Store:
    """Objects by (group, plural, namespace, name), with one resource version
    counter for the whole server, as etcd's revision."""

    def __init__(self, types: Iterable[ResourceType], schemas: Mapping | None = None):
        self.types = list(types)
        self._schemas = dict(schemas or {})
        self._strict_schemas: dict = {}
        self._objects: dict[tuple[str, str, str, str], StoredObject] = {}
        self._revision = itertools.count(1)
        self.revision = 0
        self.compacted_revision = 0
        self.events: list[Event] = []
        self.changed = threading.Condition()

    def compact(self) -> None:
        """Forget every event so far, as etcd's compaction does: old watches get 410."""
        with self.changed:
            self.compacted_revision = self.revision
            self.events.clear()

    # --- lookup ---------------------------------------------------------------

    def find_type(self, group: str, version: str, plural: str) -> ResourceType | None:
        for rtype in self.types:
            if (rtype.group, rtype.version, rtype.plural) == (group, version, plural):
                return rtype
        return None

    def _key(self, rtype: ResourceType, ns: str | None, name: str) -> tuple:
        return (rtype.group, rtype.plural, ns or "", name)

    def _stored(self, rtype: ResourceType, ns: str | None, name: str) -> StoredObject:
        stored = self._objects.get(self._key(rtype, ns, name))
        if stored is None:
            raise not_found(rtype, name)
        return stored

    def get(self, rtype: ResourceType, ns: str | None, name: str) -> dict:
        with self.changed:
            return self._render(rtype, self._stored(rtype, ns, name))

    def list(self, rtype: ResourceType, ns: str | None, selectors: Selectors) -> dict:
        with self.changed:
            items = [
                self._render(rtype, s)
                for key, s in sorted(self._objects.items())
                if key[:2] == (rtype.group, rtype.plural)
                and (ns is None or key[2] == ns)
                and selectors.match(s.body)
            ]
            revision = self.revision
        return {
            "apiVersion": rtype.api_version,
            "kind": f"{rtype.kind}List",
            "metadata": {"resourceVersion": str(revision)},
            "items": items,
        }

    def _render(self, rtype: ResourceType, stored: StoredObject) -> dict:
        """The object as the server returns it, in the version asked for."""
        obj = copy.deepcopy(stored.body)
        obj["apiVersion"] = rtype.api_version
        managed = [
            {
                "manager": manager,
                "operation": operation,
                "apiVersion": rtype.api_version,
                "fieldsType": "FieldsV1",
                "fieldsV1": fields.to_fields_v1(paths),
            }
            for (manager, operation), paths in sorted(stored.managers.items())
            if paths
        ]
        obj["metadata"]["managedFields"] = managed
        return obj

    # --- writes ---------------------------------------------------------------

    def create(
        self, rtype: ResourceType, ns: str | None, body: dict, opts: WriteOptions
    ) -> dict:
        name = (body.get("metadata") or {}).get("name") or ""
        with self.changed:
            self._check_body(rtype, ns, name, body)
            if self._key(rtype, ns, name) in self._objects:
                raise ApiError(
                    409,
                    "AlreadyExists",
                    f'{rtype.group_resource} "{name}" already exists',
                    _details(rtype, name),
                )
            return self._commit(rtype, ns, None, body, opts)

    def replace(
        self,
        rtype: ResourceType,
        ns: str | None,
        name: str,
        body: dict,
        opts: WriteOptions,
    ) -> dict:
        with self.changed:
            self._check_body(rtype, ns, name, body)
            stored = self._stored(rtype, ns, name)
            self._check_version(stored, body, name)
            return self._commit(rtype, ns, stored, body, opts)

    def patch(
        self,
        rtype: ResourceType,
        ns: str | None,
        name: str,
        patch_type: str,
        patch: Any,
        opts: WriteOptions,
    ) -> dict:
        with self.changed:
            if patch_type == "apply":
                return self._apply(rtype, ns, name, patch, opts)
            stored = self._stored(rtype, ns, name)
            current = copy.deepcopy(stored.body)
            new = self._patched(rtype, name, current, patch_type, patch)
            self._check_body(rtype, ns, name, new)
            self._check_version(stored, new, name)
            return self._commit(rtype, ns, stored, new, opts)

    def delete(self, rtype: ResourceType, ns: str | None, name: str, dry_run: bool):
        with self.changed:
            stored = self._stored(rtype, ns, name)
            last = self._render(rtype, stored)
            if not dry_run:
                del self._objects[self._key(rtype, ns, name)]
                self._record("DELETED", rtype, last)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {**_details(rtype, name), "uid": last["metadata"]["uid"]},
        }

    def _patched(
        self, rtype: ResourceType, name: str, current: dict, patch_type: str, patch: Any
    ) -> dict:
        """The current object with a merge, strategic or JSON patch applied."""
        if patch_type == "json":
            try:
                return jsonpatch.apply_patch(current, patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise ApiError(422, "Invalid", str(e), _details(rtype, name)) from e
        if patch_type == "strategic" and not rtype.builtin:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media "
                "types include: application/json-patch+json, "
                "application/merge-patch+json, application/apply-patch+yaml",
            )
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "a merge patch must be a JSON object")
        return merge_patch(current, patch)

    def _apply(
        self,
        rtype: ResourceType,
        ns: str | None,
        name: str,
        body: Any,
        opts: WriteOptions,
    ) -> dict:
        """Server-side apply: merge the applier's fields, track their ownership."""
        if not opts.field_manager:
            raise ApiError(
                422,
                "Invalid",
                'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required '
                "value: is required for apply patch",
            )
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "an apply patch must be an object")
        self._check_body(rtype, ns, name, body)
        applier = (opts.field_manager, APPLY)
        applied = fields.leaf_paths(body)
        stored = self._objects.get(self._key(rtype, ns, name))
        if stored is None:
            return self._commit(rtype, ns, None, body, opts, {applier: applied})
        self._check_version(stored, body, name)

        managers = copy.deepcopy(stored.managers)
        conflicts = _conflicts(stored.body, body, applied, managers, applier)
        if conflicts and not opts.force:
            raise _conflict_error(rtype, name, conflicts)
        for owner, path in conflicts:
            managers[owner] = {
                p for p in managers[owner] if not fields.overlaps(p, path)
            }

        new = fields.deep_merge(stored.body, body)
        others = [p for owner, ps in managers.items() if owner != applier for p in ps]
        for path in managers.get(applier, set()) - applied:
            if not any(fields.overlaps(path, p) for p in others):
                fields.delete_path(new, path)
        managers[applier] = applied
        return self._commit(rtype, ns, stored, new, opts, managers)

    def _commit(
        self,
        rtype: ResourceType,
        ns: str | None,
        previous: StoredObject | None,
        new: dict,
        opts: WriteOptions,
        managers: dict | None = None,
    ) -> dict:
        """Store the new body with fresh server metadata; record the event.

        ``managers`` is the new ownership after an apply; ``None`` means an
        update, which takes the fields it changed.  A write that changes
        nothing keeps the resource version and sends no event.
        """
        old = previous.body if previous is not None else None
        new = copy.deepcopy(new)
        new["apiVersion"], new["kind"] = rtype.api_version, rtype.kind
        meta = new.setdefault("metadata", {})
        meta.pop("managedFields", None)
        self._validate(rtype, new, meta.get("name", ""), opts.strict_fields)

        if managers is None:
            managers = copy.deepcopy(previous.managers) if previous else {}
            _take_changed(managers, old, new, (opts.field_manager, UPDATE))
        managers = {owner: paths for owner, paths in managers.items() if paths}
        if previous is not None and _same(old, new) and managers == previous.managers:
            return self._render(rtype, previous)

        self._set_server_metadata(meta, old, new, ns)
        result = StoredObject(rtype, new, managers)
        if not opts.dry_run:
            self._objects[self._key(rtype, ns, meta["name"])] = result
            self._record("ADDED" if old is None else "MODIFIED", rtype, result)
        return self._render(rtype, result)

    def _set_server_metadata(self, meta: dict, old: dict | None, new: dict, ns) -> None:
        old_meta = (old or {}).get("metadata", {})
        if ns:
            meta["namespace"] = ns
        meta["uid"] = old_meta.get("uid") or str(uuid.uuid4())
        meta["creationTimestamp"] = old_meta.get("creationTimestamp") or _now()
        generation = old_meta.get("generation", 0)
        if old is None or _spec(old) != _spec(new):
            generation += 1
        meta["generation"] = generation
        self.revision = next(self._revision)
        meta["resourceVersion"] = str(self.revision)

    def _record(self, kind: str, rtype: ResourceType, obj: StoredObject | dict) -> None:
        rendered = obj if isinstance(obj, dict) else self._render(rtype, obj)
        if kind == "DELETED":
            self.revision = next(self._revision)
            rendered["metadata"]["resourceVersion"] = str(self.revision)
        event = Event(self.revision, kind, rtype.group, rtype.plural, rendered)
        self.events.append(event)
        if len(self.events) > EVENT_LOG_SIZE:
            self.compacted_revision = self.events[0].resource_version
            del self.events[:-EVENT_LOG_SIZE]
        self.changed.notify_all()

    # --- checks ---------------------------------------------------------------

    def _check_body(self, rtype: ResourceType, ns: str | None, name: str, body: Any):
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body is not an object")
        meta = body.get("metadata") or {}
        if body.get("kind") not in (None, rtype.kind):
            raise ApiError(
                400,
                "BadRequest",
                f"the body's kind {body.get('kind')!r} is not {rtype.kind}",
            )
        if name and meta.get("name") not in (None, name):
            raise ApiError(
                400,
                "BadRequest",
                f"the name of the object ({meta.get('name')}) does not match the "
                f"name on the URL ({name})",
            )
        if not (meta.get("name") or name):
            raise invalid(rtype, "", [("metadata.name", "Required value: name")])
        if meta.get("namespace") not in (None, ns or None):
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace "
                "sent on the request",
            )
        if rtype.namespaced and ns and not self._namespace_exists(ns):
            raise ApiError(
                404,
                "NotFound",
                f'namespaces "{ns}" not found',
                {"name": ns, "kind": "namespaces"},
            )

    def _namespace_exists(self, ns: str) -> bool:
        return ("", "namespaces", "", ns) in self._objects

    def _check_version(self, stored: StoredObject, body: dict, name: str) -> None:
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != stored.body["metadata"]["resourceVersion"]:
            raise stale(stored.rtype, name)

    def _validate(self, rtype: ResourceType, obj: dict, name: str, strict: bool):
        """Custom resources against their CRD schema; 422 on the first errors."""
        key = (rtype.group, rtype.kind, rtype.version)
        schemas = self._strict_schemas if strict else self._schemas
        schema = schemas.get(key)
        if schema is None:
            return
        checked = copy.deepcopy(obj)
        checked["metadata"] = {
            k: v
            for k, v in checked["metadata"].items()
            if k in ("name", "namespace", "labels", "annotations")
        }
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(checked),
            key=lambda e: list(map(str, e.absolute_path)),
        )
        if errors:
            causes = [
                (".".join(map(str, e.absolute_path)), e.message[:200])
                for e in errors[:5]
            ]
            raise invalid(rtype, name, causes)

    def set_strict_schemas(self, schemas: Mapping) -> None:
        self._strict_schemas = dict(schemas)


@dataclass(frozen=True)
class Selectors:
    """``labelSelector`` (equality only) and ``fieldSelector`` on the name."""

    labels: tuple[tuple[str, str], ...] = ()
    name: str | None = None
    namespace: str | None = None

    @classmethod
    def parse(cls, label_selector: str, field_selector: str) -> Selectors:
        labels = tuple(
            tuple(part.split("=", 1))
            for part in label_selector.split(",")
            if "=" in part
        )
        found: dict[str, str] = {}
        for part in field_selector.split(","):
            key, _, value = part.partition("=")
            found[key.strip()] = value.strip()
        return cls(
            labels,
            found.get("metadata.name"),
            found.get("metadata.namespace"),
        )

    def match(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        obj_labels = meta.get("labels") or {}
        if self.name is not None and meta.get("name") != self.name:
            return False
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        return all(obj_labels.get(k.strip("!")) == v for k, v in self.labels)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _conflicts(
    current: dict,
    body: dict,
    applied: set[fields.Path],
    managers: dict,
    applier: tuple[str, str],
) -> list[tuple[tuple[str, str], fields.Path]]:
    """(owner, path) pairs another manager owns with a different value."""
    found = []
    for owner, owned in sorted(managers.items()):
        if owner == applier:
            continue
        for path in sorted(applied):
            if fields.get_path(current, path) == fields.get_path(body, path):
                continue
            if any(fields.overlaps(path, other) for other in owned):
                found.append((owner, path))
    return found


def _conflict_error(rtype: ResourceType, name: str, conflicts: list) -> ApiError:
    causes = [
        {
            "reason": "FieldManagerConflict",
            "message": f'conflict with "{owner[0]}" using {rtype.api_version}',
            "field": fields.dotted(path),
        }
        for owner, path in conflicts
    ]
    listed = "\n".join(f"- {c['message']}: {c['field']}" for c in causes)
    details = {**_details(rtype, name), "causes": causes}
    return ApiError(
        409,
        "Conflict",
        f"Apply failed with {len(causes)} conflict(s): {listed}",
        details,
    )


def _take_changed(managers: dict, old: dict | None, new: dict, updater) -> None:
    """An update owns what it changed; others lose those fields."""
    changed = fields.changed_paths(old, new)
    for owner in list(managers):
        if owner != updater:
            managers[owner] = {
                p
                for p in managers[owner]
                if not any(fields.overlaps(p, c) for c in changed)
            }
    kept = {
        p
        for p in managers.get(updater, set())
        if fields.get_path(new, p) is not fields.MISSING
    }
    managers[updater] = kept | {
        p for p in changed if fields.get_path(new, p) is not fields.MISSING
    }


def _spec(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _same(old: dict, new: dict) -> bool:
    """Equal apart from what the server sets itself."""

    def strip(obj: dict) -> str:
        copied = copy.deepcopy(obj)
        meta = copied.get("metadata", {})
        for key in ("resourceVersion", "managedFields", "generation", "uid"):
            meta.pop(key, None)
        meta.pop("creationTimestamp", None)
        return json.dumps(copied, sort_keys=True)

    return strip(old) == strip(new)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
