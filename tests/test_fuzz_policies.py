"""Fuzzing ``SelectionPolicy`` documents: any bytes, any YAML, any structure.

Whatever a policy file holds, loading it gives a policy or a
:class:`PolicyDocumentError` that names the file; never another exception.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from meshctl import policies
from meshctl.policies import documents
from tests.fuzz_support import JUNK, fuzz, shaped

POLICY_DIR = Path(__file__).resolve().parents[1] / "policies"
TEMPLATES = [
    yaml.safe_load(path.read_text()) for path in sorted(POLICY_DIR.glob("*.yaml"))
]
DOCUMENTS = st.one_of(*[shaped(template) for template in TEMPLATES])


@pytest.fixture(scope="module")
def scratch() -> Path:
    """One file the examples overwrite (a function fixture would be shared)."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder) / "policy.yaml"


def _load(path: Path, data: bytes) -> None:
    """Load ``data`` as a policy file and build its policy; errors must name it."""
    path.write_bytes(data)
    try:
        policies.create_from_document(documents.load_file(path))
    except documents.PolicyDocumentError as exc:
        assert exc.problems
        assert all(p.startswith(f"{path}:") for p in exc.problems), exc.problems
    problems = documents.file_problems(path)
    assert all(p.startswith(f"{path}:") for p in problems), problems


@fuzz(150)
@given(data=st.binary(max_size=200))
@example(data=b"\xff\xfe")  # not UTF-8
@example(data=b"? [a, b]\n: 1\n")  # a key YAML cannot hash
@example(data=b"&a [*a]")  # a list holding itself
@example(data=b"spec: !!python/object:os.system {}\n")  # an unknown tag
@example(data=b"[" * 1000 + b"]" * 1000)  # nested deeper than the stack
@example(data=b"kind: SelectionPolicy\nspec: &a {x: *a}\n")  # holds itself
def test_any_bytes_load_as_a_policy_or_an_error_naming_the_file(scratch, data) -> None:
    _load(scratch, data)


@fuzz(300)
@given(document=DOCUMENTS)
@example(document={**TEMPLATES[0], "spec": {"algorithm": "mesh", 1: 2}})
@example(document={**TEMPLATES[0], "spec": {"algorithm": ["mesh"]}})
@example(document={**TEMPLATES[0], "spec": {"algorithm": "oort", "overcommit": 1e308}})
def test_documents_shaped_like_a_policy_load_or_name_the_field(
    scratch, document
) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    _load(scratch, text.encode())


@fuzz(200)
@given(document=st.one_of(DOCUMENTS, JUNK))
def test_from_mapping_accepts_a_policy_or_raises_its_own_error(document) -> None:
    try:
        loaded = documents.from_mapping(document)
    except documents.PolicyDocumentError as exc:
        assert all(p.startswith("<memory>:") for p in exc.problems), exc.problems
    else:
        policies.create_from_document(loaded)
