"""SelectionPolicy documents, and how a policy's per-client settings reach a slot."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from typer.testing import CliRunner

from meshctl import cli, exitcodes, policies
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller
from meshctl.controller.roundapi import RoundAPIClient, RoundAPIServer
from meshctl.flower import grid
from meshctl.policies import documents
from meshctl.policies.base import Selection, SelectionInput
from meshctl.policies.meshaware import MeshSettings
from meshctl.policies.oort import OortSettings
from meshctl.types import ArmedRound

POLICY_DIR = Path(__file__).resolve().parent.parent / "policies"
SHIPPED = sorted(POLICY_DIR.glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# -- the shipped documents ----------------------------------------------------


def test_one_document_per_algorithm_is_shipped() -> None:
    assert sorted(p.stem for p in SHIPPED) == sorted(policies.NAMES)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_document_is_valid_and_makes_its_policy(path: Path) -> None:
    policy, document = policies.resolve(str(path))

    assert documents.file_problems(path) == []
    assert policy.name == document.algorithm == path.stem
    assert document.clients_per_round == 5


def test_the_shipped_oort_document_states_fedscales_defaults() -> None:
    policy, _ = policies.resolve(str(POLICY_DIR / "oort.yaml"))
    assert policy.settings == OortSettings()


def test_the_shipped_mesh_document_states_the_code_defaults() -> None:
    policy, _ = policies.resolve(str(POLICY_DIR / "mesh.yaml"))
    assert policy.settings == MeshSettings()


def test_a_minimal_document_gets_the_documented_defaults(tmp_path) -> None:
    path = _write(
        tmp_path,
        """
        apiVersion: meshctl.io/v1alpha1
        kind: SelectionPolicy
        metadata: {name: quick-oort}
        spec:
          algorithm: pyramidfl
          adaptation: {beta: 0.5}
        """,
    )

    policy, document = policies.resolve(str(path))

    assert document.spec["adaptation"] == {"beta": 0.5, "maxExtraFactor": 10.0}
    assert policy.adaptation.beta == 0.5
    assert policy.settings == OortSettings()
    assert document.clients_per_round is None


# -- bad documents: file, line and field ---------------------------------------

BAD = """
apiVersion: meshctl.io/v1alpha1
kind: SelectionPolicy
metadata:
  name: oort
spec:
  algorithm: oort
  exploration:
    initial: 0.9
    decay: 1.5
  hysteresis:
    stickiness: 0.1
"""


def test_a_bad_document_names_file_line_and_field_of_each_problem(tmp_path) -> None:
    path = _write(tmp_path, BAD)

    problems = documents.file_problems(path)

    assert problems[0] == (
        f"{path}:9: spec.exploration.decay: 1.5 is greater than the maximum of 1"
    )
    assert problems[1].startswith(
        f"{path}:10: spec.hysteresis: not a field of algorithm oort"
    )
    assert len(problems) == 2


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        pytest.param(
            "algorithm: greedy",
            ":6: spec.algorithm: 'greedy' is not one of mesh, oort",
            id="unknown-algorithm",
        ),
        pytest.param(
            "window: {telemetrySeconds: 5}",
            ":4: spec.algorithm: is required",
            id="no-algorithm",
        ),
        pytest.param(
            "algorithm: mesh\n  fairness: {maxShare: 2}",
            ":7: spec.fairness.maxShare: 2 is greater than the maximum of 1",
            id="share-above-one",
        ),
        pytest.param(
            "algorithm: power-of-choice\n  candidates:\n    d: 0",
            ":8: spec.candidates.d: 0 is less than the minimum of 1",
            id="d-zero",
        ),
    ],
)
def test_each_bad_field_is_reported_on_its_line(tmp_path, spec, expected) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "apiVersion: meshctl.io/v1alpha1\nkind: SelectionPolicy\n"
        f"metadata: {{name: p}}\nspec:\n  clientsPerRound: 3\n  {spec}\n"
    )

    with pytest.raises(documents.PolicyDocumentError) as caught:
        documents.load_file(path)

    assert caught.value.problems[0].startswith(f"{path}{expected}")


def test_a_bad_common_field_is_reported_once(tmp_path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        "apiVersion: meshctl.io/v1alpha1\nkind: SelectionPolicy\n"
        "metadata: {name: p}\nspec:\n  algorithm: mesh\n  clientsPerRound: -3\n"
    )

    with pytest.raises(documents.PolicyDocumentError) as caught:
        documents.load_file(path)

    assert caught.value.problems == [
        f"{path}:6: spec.clientsPerRound: -3 is less than the minimum of 1"
    ]


def test_a_yaml_syntax_error_names_its_line(tmp_path) -> None:
    path = _write(tmp_path, "spec:\n  algorithm: [oort\n  clientsPerRound: 3\n")

    with pytest.raises(documents.PolicyDocumentError, match=r"policy.yaml:\d+: "):
        documents.load_file(path)


def test_validate_accepts_policies_and_reports_bad_ones_with_lines(tmp_path) -> None:
    runner = CliRunner()
    good = runner.invoke(cli.app, ["validate", *map(str, SHIPPED)])
    bad = runner.invoke(cli.app, ["validate", str(_write(tmp_path, BAD))])

    assert good.exit_code == 0, good.output
    assert bad.exit_code == int(exitcodes.ExitCode.INVALID)
    assert "policy.yaml:9: spec.exploration.decay" in bad.output


def test_demo_refuses_a_bad_policy_file_before_starting_anything(tmp_path) -> None:
    result = CliRunner().invoke(
        cli.app, ["demo", "--policy", str(_write(tmp_path, BAD))]
    )

    assert result.exit_code == int(exitcodes.ExitCode.INVALID)
    assert "policy.yaml:9: spec.exploration.decay:" in result.output


# -- per-client training settings, from the policy to the message --------------


class _AskMoreOf:
    """Chooses the first K candidates and asks the first of them for more steps."""

    name = "ask-more"

    def select(self, given: SelectionInput, rng: random.Random) -> Selection:
        chosen = tuple(given.candidates[: given.per_round])
        return Selection(
            clients=chosen, client_config={chosen[0]: {"local-steps-factor": 2.5}}
        )


class _NoTelemetry:
    def read(self, window_s: float) -> dict:
        return {}


def test_a_policys_client_config_comes_back_per_slot_through_the_round_api(
    tmp_path,
) -> None:
    controller = Controller(
        clients=["c-00", "c-01", "c-02"],
        policy=_AskMoreOf(),
        telemetry=_NoTelemetry(),
        backend=DirectoryBackend(tmp_path / "routing"),
        wait=lambda step: 0.0,
        ready=lambda: ["c-00", "c-01", "c-02"],
    )
    server = RoundAPIServer(controller).start()
    client = RoundAPIClient(server.url, per_round=2)
    try:
        armed = client.arm(1)
    finally:
        client.close()
        server.stop()

    slot = next(s for s, c in controller.assignment(1).items() if c == "c-00")
    assert armed.slot_config == {slot: {"local-steps-factor": 2.5}}


def test_the_grid_merges_a_slots_settings_into_that_slots_training_config() -> None:
    armed = ArmedRound(1, (1, 2), "r1", slot_config={2: {"local-steps-factor": 2.5}})
    mesh_grid = grid.MeshGrid(
        mesh_url="http://127.0.0.1:9",
        arm=lambda r: armed,
        report=lambda r, o: None,
        deadline_s=1.0,
    )
    mesh_grid.get_node_ids()
    shared = RecordDict(
        {
            "arrays": ArrayRecord([np.ones(2, dtype=np.float32)]),
            "config": ConfigRecord({"local-steps": 100}),
        }
    )
    messages = [
        Message(content=shared, message_type=MessageType.TRAIN, dst_node_id=slot)
        for slot in (1, 2)
    ]

    first, second = (mesh_grid._with_slot_config(m) for m in messages)
    mesh_grid.close()

    assert dict(first.content["config"]) == {"local-steps": 100}
    assert dict(second.content["config"]) == {
        "local-steps": 100,
        "local-steps-factor": 2.5,
    }
    assert second.content["arrays"] is shared["arrays"]
