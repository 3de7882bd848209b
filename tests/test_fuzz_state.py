"""Fuzzing the controller's state file and the demo's fault spec.

A state file is what a restarted controller trusts; a fault spec is typed by a
user.  Neither may crash its reader: every file loads or raises
``ControllerStateError`` naming the file, every spec parses or raises
``FaultSpecError`` naming the item.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from meshctl import faults, policies, protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller.cycle import Controller
from meshctl.controller.state import ControllerStateError, StateStore
from meshctl.types import ClientState, ClientTelemetry, SlotOutcome
from tests.fuzz_support import JUNK, fuzz, shaped

CLIENTS = [protocol.client_id(i) for i in range(4)]


class Steady:
    """The same telemetry every cycle."""

    def read(self, window_s: float) -> dict[str, ClientTelemetry]:
        return {
            c: ClientTelemetry(
                client=c, state=ClientState.OBSERVED, requests=5, latency_p95_ms=50.0
            )
            for c in CLIENTS
        }


def _saved_state(policy: str) -> dict:
    """A state file that a controller with ``policy`` wrote after two rounds."""
    with tempfile.TemporaryDirectory() as scratch:
        state_path = Path(scratch) / "state.json"
        controller = Controller(
            clients=CLIENTS,
            policy=policies.create(policy),
            telemetry=Steady(),
            backend=DirectoryBackend(Path(scratch) / "routing"),
            wait=lambda step: 0.0,
            ready=lambda: CLIENTS,
            state_path=state_path,
        )
        for server_round in (1, 2):
            armed = controller.arm(server_round, per_round=2)
            controller.record_feedback(
                server_round,
                [
                    SlotOutcome(server_round, slot, "ok", 1.0, 10, 0.5, 100.0)
                    for slot in armed.slots
                ],
            )
        return json.loads(state_path.read_text())


TEMPLATES = {name: _saved_state(name) for name in ("oort", "mesh")}


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


def _load(scratch: Path, text: str) -> None:
    path = scratch / "state.json"
    path.write_text(text)
    try:
        StateStore(path).load()
    except ControllerStateError as exc:
        assert str(path) in str(exc)


@fuzz(60)  # a real state file is large: make fuzz runs thousands
@given(document=st.sampled_from(list(TEMPLATES.values())).flatmap(shaped))
def test_a_state_file_shaped_like_a_real_one_loads_or_names_the_field(
    scratch, document
) -> None:
    _load(scratch, json.dumps(document))


@fuzz(40)
@given(
    policy=st.sampled_from(list(TEMPLATES)),
    data=st.data(),
)
def test_a_controller_restarted_on_any_such_file_refuses_it_or_arms(
    scratch, policy, data
) -> None:
    document = data.draw(shaped(TEMPLATES[policy]))
    path = scratch / "restart" / "state.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(document))
    try:
        controller = Controller(
            clients=CLIENTS,
            policy=policies.create(policy),
            telemetry=Steady(),
            backend=DirectoryBackend(scratch / "restart" / "routing"),
            wait=lambda step: 0.0,
            ready=lambda: CLIENTS,
            state_path=path,
        )
    except ControllerStateError as exc:
        assert str(path) in str(exc)
        return

    armed = controller.arm(3, per_round=2)

    assert len(armed.slots) == 2


@fuzz(150)
@given(text=st.one_of(st.text(max_size=200), JUNK.map(json.dumps)))
@example(text='{"kind": "meshctl-controller-state", "version": 1')
def test_any_text_as_a_state_file_loads_or_names_the_file(scratch, text) -> None:
    _load(scratch, text)


@fuzz(300)
@given(
    spec=st.one_of(
        st.text(max_size=40),
        st.lists(
            st.builds(
                "{}{}{}@{}{}".format,
                st.sampled_from([*faults.KINDS, "", "melt"]),
                st.sampled_from(["", ":c-01", ":c-09", ":", ":c-00:c-01"]),
                st.sampled_from(["", "x2", "x0.5", "x", "x1e9", "x-1"]),
                st.sampled_from(["1", "0", "3", "99999999999999999999", "", "-1"]),
                st.sampled_from(["", "+1", "+0", "+", "+99"]),
            ),
            max_size=4,
        ).map(",".join),
    )
)
@example(spec="crash:c-01@1+99999999999999999999999")
def test_any_fault_spec_parses_or_names_the_item(spec) -> None:
    try:
        parsed = faults.parse(spec, CLIENTS, rounds=3)
    except faults.FaultSpecError as exc:
        assert "--faults item" in str(exc)
    else:
        for fault in parsed:
            assert 1 <= fault.server_round <= 3
            assert fault.client is None or fault.client in CLIENTS
