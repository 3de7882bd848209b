"""Downloading and importing the datasets, checksums first."""

from __future__ import annotations

import functools
import hashlib
import re
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fl_app import fetch

GOOD_BYTES = b"duration,label\n0.5,0\n"
NEVER_CHECKED_SHA256 = "0" * 64


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Keep test output clean."""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTP server on 127.0.0.1 serving a fresh directory."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()
    server.server_close()
    thread.join()


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.is_file())


def use_catalogue(
    monkeypatch: pytest.MonkeyPatch, files: tuple[fetch.RemoteFile, ...]
) -> None:
    source = fetch.DatasetSource(name="tiny", origin="a test server", files=files)
    monkeypatch.setattr(fetch, "DATASETS", {"tiny": source})


# Download


def test_a_download_with_the_right_sum_lands_at_its_path(
    served: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = served
    (root / "flows.csv").write_bytes(GOOD_BYTES)
    dest = tmp_path / "out" / "flows.csv"

    fetch.download_file(f"{url}/flows.csv", dest, sha256(GOOD_BYTES))

    assert dest.read_bytes() == GOOD_BYTES
    assert leftovers(dest.parent) == ["flows.csv"]


def test_a_checksum_mismatch_names_file_and_both_sums_and_leaves_nothing(
    served: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = served
    (root / "flows.csv").write_bytes(b"tampered\n")
    dest = tmp_path / "out" / "flows.csv"

    with pytest.raises(fetch.ChecksumError) as caught:
        fetch.download_file(f"{url}/flows.csv", dest, sha256(GOOD_BYTES))

    message = str(caught.value)
    assert "flows.csv" in message
    assert sha256(GOOD_BYTES) in message
    assert sha256(b"tampered\n") in message
    assert leftovers(dest.parent) == []


def test_a_failed_download_leaves_nothing_at_the_final_path(
    served: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = served
    dest = tmp_path / "out" / "absent.csv"

    with pytest.raises(fetch.FetchError, match="404"):
        fetch.download_file(f"{url}/absent.csv", dest, sha256(GOOD_BYTES))

    assert leftovers(dest.parent) == []


def test_a_failed_download_keeps_a_good_file_already_there(
    served: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = served
    (root / "flows.csv").write_bytes(b"tampered\n")
    dest = tmp_path / "flows.csv"
    dest.write_bytes(GOOD_BYTES)

    with pytest.raises(fetch.ChecksumError):
        fetch.download_file(f"{url}/flows.csv", dest, sha256(GOOD_BYTES))

    assert dest.read_bytes() == GOOD_BYTES


def test_fetching_a_dataset_downloads_each_file_once(
    served: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, root = served
    (root / "a.csv").write_bytes(GOOD_BYTES)
    remote = fetch.RemoteFile("tiny/a.csv", sha256(GOOD_BYTES), f"{url}/a.csv")
    use_catalogue(monkeypatch, (remote,))

    first = fetch.fetch_dataset("tiny", tmp_path / "data", timeout_s=5.0)
    (root / "a.csv").unlink()
    again = fetch.fetch_dataset("tiny", tmp_path / "data", timeout_s=5.0)

    assert first == again == [tmp_path / "data" / "tiny" / "a.csv"]
    assert again[0].read_bytes() == GOOD_BYTES


def test_a_file_without_public_url_asks_for_an_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_catalogue(
        monkeypatch, (fetch.RemoteFile("tiny/a.csv", NEVER_CHECKED_SHA256, None),)
    )

    with pytest.raises(fetch.FetchError, match="--from DIR"):
        fetch.fetch_dataset("tiny", tmp_path)


# Import from a local copy


def test_an_import_copies_verified_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "src" / "tiny").mkdir(parents=True)
    (tmp_path / "src" / "tiny" / "a.csv").write_bytes(GOOD_BYTES)
    use_catalogue(
        monkeypatch, (fetch.RemoteFile("tiny/a.csv", sha256(GOOD_BYTES), None),)
    )

    installed = fetch.import_from(tmp_path / "src", tmp_path / "dest")

    assert installed == [tmp_path / "dest" / "tiny" / "a.csv"]
    assert installed[0].read_bytes() == GOOD_BYTES


def test_an_import_with_a_wrong_sum_installs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "src" / "tiny").mkdir(parents=True)
    (tmp_path / "src" / "tiny" / "a.csv").write_bytes(b"tampered\n")
    use_catalogue(
        monkeypatch, (fetch.RemoteFile("tiny/a.csv", sha256(GOOD_BYTES), None),)
    )

    with pytest.raises(fetch.ChecksumError, match="a.csv"):
        fetch.import_from(tmp_path / "src", tmp_path / "dest")

    assert leftovers(tmp_path / "dest") == []


def test_an_import_of_a_missing_file_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_catalogue(
        monkeypatch, (fetch.RemoteFile("tiny/a.csv", NEVER_CHECKED_SHA256, None),)
    )

    with pytest.raises(fetch.FetchError, match=re.escape(str(tmp_path / "tiny"))):
        fetch.import_from(tmp_path, tmp_path / "dest")


# Catalogue


def test_every_public_url_is_pinned_to_a_commit() -> None:
    urls = [f.url for s in fetch.DATASETS.values() for f in s.files if f.url]

    assert urls
    assert all(re.search(r"/[0-9a-f]{40}/", url) for url in urls)


def test_an_unknown_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown dataset"):
        fetch.required_files("mnist")


@pytest.mark.data
def test_the_pinned_sums_match_the_shipped_sha256sums(data_dir: Path) -> None:
    shipped = {}
    for sums in data_dir.glob("*/SHA256SUMS"):
        for line in sums.read_text().splitlines():
            digest, _, name = line.partition("  ")
            shipped[f"{sums.parent.name}/{name}"] = digest

    pinned = {
        f.relative_path: f.sha256 for s in fetch.DATASETS.values() for f in s.files
    }

    assert pinned == {path: shipped[path] for path in pinned}


@pytest.mark.data
def test_an_import_of_the_real_data_passes_every_checksum(
    data_dir: Path, tmp_path: Path
) -> None:
    installed = fetch.import_from(data_dir, tmp_path)

    expected = [f.relative_path for s in fetch.DATASETS.values() for f in s.files]
    assert [p.relative_to(tmp_path).as_posix() for p in installed] == expected
