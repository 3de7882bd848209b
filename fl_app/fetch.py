"""Fetch the public datasets, or import a local copy, with checksums verified.

This is the code behind ``meshctl data fetch``. Every file the loaders read is
listed once in :data:`DATASETS`, with its public URL (a raw-file URL of a public
mirror at a pinned commit) and its SHA-256. A file lands at its final path only
after its sum matched: it is written to a temporary file beside the target,
verified, then renamed, so an interrupted or corrupted transfer leaves nothing
behind that a loader could mistake for data.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

TON_IOT_COMMIT = "2439518f9f473848be71084633c14005651c569f"
NSL_KDD_COMMIT = "0804644cbc0a8af940ac8d9da4a90889f61b4d57"
TON_IOT_URL = (
    "https://raw.githubusercontent.com/gubertoli/iot-nids-chapter/"
    f"{TON_IOT_COMMIT}/dataset/toniot.csv.gz"
)
NSL_KDD_BASE_URL = (
    f"https://raw.githubusercontent.com/JunLuo-BIT/NSL-KDD-Data-Set/{NSL_KDD_COMMIT}"
)
DEFAULT_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20


class FetchError(Exception):
    """A file could not be downloaded, imported or verified."""


class ChecksumError(FetchError):
    """A file's SHA-256 differs from the one pinned in :data:`DATASETS`."""


@dataclass(frozen=True)
class RemoteFile:
    """One data file: where it lives under the data directory and where from.

    ``url`` is None when no public copy of this exact file exists; such a file
    can only be imported from a local directory.
    """

    relative_path: str
    sha256: str
    url: str | None


@dataclass(frozen=True)
class DatasetSource:
    """A dataset's files and a one-line description of its public origin."""

    name: str
    origin: str
    files: tuple[RemoteFile, ...]


DATASETS: dict[str, DatasetSource] = {
    "ton_iot": DatasetSource(
        name="ton_iot",
        origin=(
            "TON_IoT Train_Test_Network, UNSW Canberra (Moustafa 2021), "
            "public mirror gubertoli/iot-nids-chapter"
        ),
        files=(
            RemoteFile(
                "ton_iot_network/toniot.csv.gz",
                "726249e9b953b4a460696685ae6c6e495f12b983842aef657673704ac8a02fde",
                TON_IOT_URL,
            ),
        ),
    ),
    "nsl_kdd": DatasetSource(
        name="nsl_kdd",
        origin=(
            "NSL-KDD, University of New Brunswick / CIC (Tavallaee et al. 2009), "
            "public mirror JunLuo-BIT/NSL-KDD-Data-Set"
        ),
        files=(
            RemoteFile(
                "nsl_kdd/KDDTrain+_20Percent.txt",
                "7ea86479faab5ca2190b7f18b4982fb058ce5bf2b46e0e1017d0d9ef90f9c16e",
                f"{NSL_KDD_BASE_URL}/KDDTrain+_20Percent.txt",
            ),
            RemoteFile(
                "nsl_kdd/KDDTest+.txt",
                "fa46b0935342616aa83b7c2578db355b6a7aaabbc492248172c7a1e8b7ab8f84",
                f"{NSL_KDD_BASE_URL}/KDDTest+.txt",
            ),
            RemoteFile(
                "nsl_kdd/KDDTest-21.txt",
                "746993ac9e25868827cacf09eab450050a2a1056e1ce48a1ad39f5dc801d531d",
                f"{NSL_KDD_BASE_URL}/KDDTest-21.txt",
            ),
        ),
    ),
    "fedscale": DatasetSource(
        name="fedscale",
        origin=(
            "FedScale device capacity trace (SymbioticLab), exported to CSV from "
            "the observation dumps in the public PyramidFL repository"
        ),
        files=(
            RemoteFile(
                "fedscale/client_device_capacity.csv",
                "94c7cc9dd8fbed0dcff9506287eadcba4f5cd5df3d973bb29a2d9a2e66eb7731",
                None,
            ),
        ),
    ),
}


def required_files(name: str) -> tuple[str, ...]:
    """Return the paths, relative to the data directory, that ``name`` needs."""
    return tuple(remote.relative_path for remote in dataset_source(name).files)


def dataset_source(name: str) -> DatasetSource:
    """Return the catalogue entry of dataset ``name``."""
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; known: {known}") from None


def sha256_of(path: Path) -> str:
    """Return the hex SHA-256 of the file at ``path``."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: Path, expected_sha256: str, *, label: str | None = None) -> None:
    """Raise :class:`ChecksumError` unless ``path`` has the expected SHA-256."""
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise ChecksumError(
            f"checksum mismatch for {label or path}: expected {expected_sha256}, "
            f"got {actual}; the file was not installed"
        )


def fetch_dataset(
    name: str,
    dest_dir: Path,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    client: httpx.Client | None = None,
) -> list[Path]:
    """Download every file of dataset ``name`` into ``dest_dir``, verified.

    Files already present with the right sum are kept as they are. Returns the
    final paths. A file without a public URL raises :class:`FetchError` telling
    the operator to import it with ``meshctl data fetch --from DIR``.
    """
    source = dataset_source(name)
    with _http_client(client, timeout_s) as http:
        return [_fetch_file(http, remote, Path(dest_dir)) for remote in source.files]


def download_file(
    url: str,
    dest: Path,
    expected_sha256: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    client: httpx.Client | None = None,
) -> Path:
    """Download ``url`` to ``dest`` if its SHA-256 matches; return ``dest``."""
    with _http_client(client, timeout_s) as http:
        return _download(http, url, Path(dest), expected_sha256)


def import_from(
    src_dir: Path, dest_dir: Path, names: tuple[str, ...] | None = None
) -> list[Path]:
    """Copy the data files of ``names`` (default: all) from a local directory.

    ``src_dir`` is laid out like the data directory. Every file is verified
    against its pinned sum before it is installed; returns the final paths.
    """
    src_dir, dest_dir = Path(src_dir), Path(dest_dir)
    installed = []
    for remote in _files_of(names or tuple(DATASETS)):
        source_path = src_dir / remote.relative_path
        if not source_path.is_file():
            raise FetchError(f"{source_path} is missing; nothing was imported for it")
        dest = dest_dir / remote.relative_path
        with _staging(dest) as staged:
            shutil.copyfile(source_path, staged)
            verify(staged, remote.sha256, label=source_path)
        installed.append(dest)
    return installed


def _fetch_file(http: httpx.Client, remote: RemoteFile, dest_dir: Path) -> Path:
    dest = dest_dir / remote.relative_path
    if dest.is_file() and sha256_of(dest) == remote.sha256:
        logger.info("%s already present and verified", dest)
        return dest
    if remote.url is None:
        raise FetchError(
            f"{remote.relative_path} has no public download; import a copy with "
            "`meshctl data fetch --from DIR`"
        )
    return _download(http, remote.url, dest, remote.sha256)


def _download(http: httpx.Client, url: str, dest: Path, expected_sha256: str) -> Path:
    logger.info("downloading %s to %s", url, dest)
    with _staging(dest) as staged:
        try:
            with http.stream("GET", url) as response:
                response.raise_for_status()
                with staged.open("wb") as stream:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        stream.write(chunk)
        except httpx.HTTPError as exc:
            raise FetchError(f"could not download {url}: {exc}") from exc
        verify(staged, expected_sha256, label=url)
    return dest


def _files_of(names: tuple[str, ...]) -> Iterator[RemoteFile]:
    for name in names:
        yield from dataset_source(name).files


@contextlib.contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; rename it to ``dest`` only on success."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=".part", dir=dest.parent
    )
    os.close(handle)
    staged = Path(name)
    try:
        yield staged
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, dest)


@contextlib.contextmanager
def _http_client(
    client: httpx.Client | None, timeout_s: float
) -> Iterator[httpx.Client]:
    """Use the caller's client as is, or open (and close) a fresh one."""
    if client is not None:
        yield client
        return
    with httpx.Client(timeout=timeout_s, follow_redirects=True) as owned:
        yield owned
