"""Routing objects as YAML files in a directory: the local mesh's API server.

The directory holds ``virtualservice.yaml`` and ``destinationrule.yaml``, one
object per file, each what ``kubectl apply -f`` would accept.  Every write is
validated first (meshctl's rules against the other live object, plus the CRD
schema when one is given), checked against the size budget, written atomically
(a temporary file in the same directory, then a rename), and read back.  Only
then does ``on_change`` run, which the local mesh uses to push the translation
to Envoy and wait for it; if it fails, the previous file is put back.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from meshctl.files import atomic_write
from meshctl.routing import plan, render, validate
from meshctl.routing.errors import RoutingError
from meshctl.routing.plan import Step

log = logging.getLogger(__name__)

FILENAMES = {
    validate.VIRTUAL_SERVICE: "virtualservice.yaml",
    validate.DESTINATION_RULE: "destinationrule.yaml",
}


class DirectoryBackend:
    """Reads and writes the VirtualService and DestinationRule as YAML files."""

    def __init__(
        self,
        routing_dir: str | Path,
        on_change: Callable[[str, dict], None] | None = None,
        *,
        schemas: Mapping[validate.SchemaKey, dict] | None = None,
        budget_bytes: int = render.DEFAULT_SIZE_BUDGET_BYTES,
    ) -> None:
        self.routing_dir = Path(routing_dir)
        self._on_change = on_change
        self._schemas = schemas
        self._budget_bytes = budget_bytes
        # Parsed files by (path, inode, size, mtime): every write renames a new
        # file into place, so a changed file never matches an old key.
        self._parsed: dict[Path, tuple[tuple[int, int, int], dict]] = {}

    def path_for(self, kind: str) -> Path:
        """The file that holds the object of ``kind``."""
        if kind not in FILENAMES:
            raise RoutingError(
                f"{kind!r}: the directory backend writes only {', '.join(FILENAMES)}"
            )
        return self.routing_dir / FILENAMES[kind]

    def read(self) -> tuple[dict | None, dict | None]:
        """The live VirtualService and DestinationRule; ``None`` for a missing file."""
        return (
            self._read_kind(validate.VIRTUAL_SERVICE),
            self._read_kind(validate.DESTINATION_RULE),
        )

    def write(self, obj: dict) -> None:
        """Validate, write atomically, read back, then tell ``on_change``.

        Raises ``RoutingError`` with nothing written when the object is invalid,
        and with the previous file restored when the read-back or ``on_change``
        fails.
        """
        intended = _plain_copy(obj)
        kind = str(intended.get("kind"))
        path = self.path_for(kind)
        self._check(intended, kind, path)
        previous = path.read_bytes() if path.exists() else None

        atomic_write(path, _dump(intended))
        try:
            self._verify(path, intended)
            if self._on_change is not None:
                self._on_change(kind, intended)
        except Exception as err:
            _restore(path, previous)
            raise RoutingError(
                f"{path}: {validate.object_label(intended)} not applied: {err}; "
                "the previous file is restored"
            ) from err
        log.debug("wrote %s to %s", validate.object_label(intended), path)

    def apply_plan(
        self, steps: Sequence[Step], wait: Callable[[Step], float]
    ) -> list[float]:
        """Write the steps in order, waiting after each; the seconds each wait took.

        On a failure the directory keeps the state of the last step that
        succeeded, and the error names the step that failed.
        """
        return plan.apply_steps(steps, self.write, wait, "the directory")

    def _read_kind(self, kind: str) -> dict | None:
        """One file's object, or ``None`` when the file does not exist."""
        path = self.path_for(kind)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == key:
            return copy.deepcopy(cached[1])
        docs = validate.load_yaml_documents(path)
        if len(docs) != 1 or docs[0].get("kind") != kind:
            raise RoutingError(
                f"{path}: expected one {kind}, found {len(docs)} document(s)"
            )
        self._parsed[path] = (key, copy.deepcopy(docs[0]))
        return docs[0]

    def _check(self, obj: dict, kind: str, path: Path) -> None:
        """Refuse an object with new problems, or one over the size budget.

        The other live object is validated alongside, so a VirtualService that
        references a missing subset, or a DestinationRule that drops a subset
        the live routes use, is refused.  Problems the live pair already had do
        not block a write.
        """
        other_kind = next(k for k in FILENAMES if k != kind)
        other = self._read_kind(other_kind)
        current = self._read_kind(kind)
        source = str(path)
        new = _problems([obj, other], source, self._schemas)
        old = set(map(str, _problems([current, other], source, self._schemas)))
        added = [p for p in new if str(p) not in old]
        if added:
            listed = "\n  ".join(str(p) for p in added)
            raise RoutingError(f"{path}: refused, nothing written:\n  {listed}")
        render.check_size(obj, self._budget_bytes)

    def _verify(self, path: Path, intended: dict) -> None:
        """The file must hold exactly the intended object."""
        self._parsed.pop(path, None)
        if self._read_kind(str(intended.get("kind"))) != intended:
            raise RoutingError(f"{path}: read back a different object than was written")


def _problems(
    objs: list[dict | None], source: str, schemas: Mapping[Any, dict] | None
) -> list[validate.Problem]:
    """Problems of the objects that exist."""
    present = [o for o in objs if o is not None]
    return validate.validate_objects(present, source=source, schemas=schemas)


def _plain_copy(obj: Mapping[str, Any]) -> dict:
    """A deep copy made of JSON types only; refuses anything YAML could not hold."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise RoutingError(
            f"{validate.object_label(obj)}: not plain JSON data: {err}"
        ) from err


def _dump(obj: dict) -> bytes:
    """Block-style YAML with the fields in the object's own order."""
    text = yaml.dump(
        obj, Dumper=yaml.CSafeDumper, sort_keys=False, default_flow_style=False
    )
    return text.encode("utf-8")


def _restore(path: Path, previous: bytes | None) -> None:
    """Put the previous file back, or remove the file if there was none."""
    if previous is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    else:
        atomic_write(path, previous)
