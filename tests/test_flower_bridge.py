"""The Flower bridge over real HTTP: the client service and the mesh grid.

The grid posts to a client service directly here (no Envoy in between), which is
what it does through the mesh with one route in front.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)

from meshctl import protocol
from meshctl.flower import clientservice, grid
from meshctl.types import ArmedRound, SlotOutcome
from tests import toy_client_app


@pytest.fixture
def service_url() -> Iterator[callable]:
    """Start client services in threads; yields a factory of their base URLs."""
    servers = []

    def start(mode: str = "double", **config) -> str:
        service = clientservice.ClientService(
            toy_client_app.app,
            name=f"toy-{mode}",
            node_id=1,
            node_config={"mode": mode, **config},
        )
        server = clientservice.serve(service, host="127.0.0.1", port=0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class Recorder:
    """Arms a fixed set of slots and keeps what the grid reports."""

    def __init__(self, slots: tuple[int, ...]) -> None:
        self.slots = slots
        self.armed: list[int] = []
        self.reports: list[tuple[int, list[SlotOutcome]]] = []

    def arm(self, server_round: int) -> ArmedRound:
        self.armed.append(server_round)
        return ArmedRound(server_round, self.slots, f"r{server_round}")

    def report(self, server_round: int, outcomes: list[SlotOutcome]) -> None:
        self.reports.append((server_round, outcomes))


def _train_message(mesh_grid: grid.MeshGrid, slot: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord([np.ones((3, 2), dtype=np.float32)]),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=slot)


def _grid(url: str, recorder: Recorder, deadline_s: float = 5.0) -> grid.MeshGrid:
    return grid.MeshGrid(
        mesh_url=url, arm=recorder.arm, report=recorder.report, deadline_s=deadline_s
    )


def test_a_sound_update_comes_back_and_is_reported(service_url) -> None:
    recorder = Recorder((1, 2))
    mesh_grid = _grid(service_url("double"), recorder)
    slots = list(mesh_grid.get_node_ids())

    replies = list(
        mesh_grid.send_and_receive([_train_message(mesh_grid, s) for s in slots])
    )

    assert [r.has_error() for r in replies] == [False, False]
    doubled = replies[0].content["arrays"].to_numpy_ndarrays()[0]
    np.testing.assert_array_equal(doubled, np.full((3, 2), 2.0, dtype=np.float32))
    [(server_round, outcomes)] = recorder.reports
    assert server_round == 1
    assert sorted(o.slot for o in outcomes) == [1, 2]
    assert all(o.status == "ok" and o.num_examples == 10 for o in outcomes)
    assert outcomes[0].train_loss == pytest.approx(0.5)
    mesh_grid.close()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        pytest.param("nan", "NaN", id="nan-values"),
        pytest.param(
            "shape", "is float32[7, 7], expected float32[3, 2]", id="wrong-shape"
        ),
        pytest.param("dtype", "float64", id="wrong-dtype"),
        pytest.param("no-examples", "num-examples", id="no-example-count"),
        pytest.param("raise", "HTTP 500", id="app-raises"),
    ],
)
def test_a_bad_reply_becomes_an_error_reply_not_an_exception(
    service_url, mode: str, reason: str
) -> None:
    mesh_grid = _grid(service_url(mode), Recorder((1,)))
    list(mesh_grid.get_node_ids())

    [reply] = mesh_grid.send_and_receive([_train_message(mesh_grid, 1)])

    assert reply.has_error()
    assert reason in reply.error.reason
    mesh_grid.close()


def test_an_oversized_reply_is_rejected(service_url) -> None:
    recorder = Recorder((1,))
    mesh_grid = grid.MeshGrid(
        mesh_url=service_url("double"),
        arm=recorder.arm,
        report=recorder.report,
        deadline_s=5.0,
        max_reply_bytes=64,
    )
    list(mesh_grid.get_node_ids())

    [reply] = mesh_grid.send_and_receive([_train_message(mesh_grid, 1)])

    assert reply.has_error() and "exceeds 64" in reply.error.reason
    assert recorder.reports[0][1][0].status == "error"
    mesh_grid.close()


class EndlessReply(BaseHTTPRequestHandler):
    """Answers every POST with a chunked body and no content-length."""

    protocol_version = "HTTP/1.1"
    sent_bytes = 0

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        chunk = b"x" * 65536
        try:
            for _ in range(1024):  # 64 MiB, unless the reader hangs up first
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                type(self).sent_bytes += len(chunk)
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _one_reply_from(
    handler: type[BaseHTTPRequestHandler], recorder: Recorder, deadline_s: float
) -> Message:
    """One training message's reply through a grid that reads at most 1 MB,
    from a server that answers with ``handler``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # closing waits for no handler still sending
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mesh_grid = grid.MeshGrid(
        mesh_url=f"http://127.0.0.1:{server.server_address[1]}",
        arm=recorder.arm,
        report=recorder.report,
        deadline_s=deadline_s,
        max_reply_bytes=1_000_000,
    )
    try:
        list(mesh_grid.get_node_ids())
        [reply] = mesh_grid.send_and_receive([_train_message(mesh_grid, 1)])
        return reply
    finally:
        mesh_grid.close()
        server.shutdown()
        server.server_close()


def test_a_reply_without_a_length_is_cut_off_at_the_limit() -> None:
    reply = _one_reply_from(EndlessReply, Recorder((1,)), deadline_s=10.0)

    assert reply.has_error()
    assert "reply of more than 1000000 bytes" in reply.error.reason
    # The grid hung up long before the 64 MiB were written.
    assert EndlessReply.sent_bytes < 32 * 1024 * 1024


class DeclaredTooLong(BaseHTTPRequestHandler):
    """Declares a body far over any limit, then sends none of it until released."""

    protocol_version = "HTTP/1.1"
    declared_bytes = 100 * 1024 * 1024
    released = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-length", str(self.declared_bytes))
        self.end_headers()
        self.wfile.flush()
        type(self).released.wait(10.0)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_a_reply_declaring_too_many_bytes_is_refused_before_its_body_comes() -> None:
    DeclaredTooLong.released.clear()
    recorder = Recorder((1,))
    try:
        reply = _one_reply_from(DeclaredTooLong, recorder, deadline_s=5.0)
    finally:
        DeclaredTooLong.released.set()

    # Refused from its content-length alone, not left to wait for the deadline.
    assert reply.has_error()
    declared = DeclaredTooLong.declared_bytes
    assert f"reply of {declared} bytes exceeds 1000000" in reply.error.reason
    assert recorder.reports[0][1][0].status == "error"


def test_a_request_the_mesh_does_not_answer_is_lost_not_the_clients_error() -> None:
    with socket.socket() as closed:  # a port nothing listens on: Envoy is down
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    recorder = Recorder((1,))
    mesh_grid = _grid(f"http://127.0.0.1:{port}", recorder)
    list(mesh_grid.get_node_ids())

    [reply] = mesh_grid.send_and_receive([_train_message(mesh_grid, 1)])

    assert reply.has_error()
    [(_, [outcome])] = recorder.reports
    assert outcome.status == "lost"
    mesh_grid.close()


def test_a_late_client_times_out_at_the_deadline(service_url) -> None:
    recorder = Recorder((1,))
    mesh_grid = _grid(service_url("sleep", **{"sleep-s": 2.0}), recorder, 0.3)
    list(mesh_grid.get_node_ids())

    [reply] = mesh_grid.send_and_receive([_train_message(mesh_grid, 1)])

    assert reply.has_error()
    [outcome] = recorder.reports[0][1]
    assert outcome.status == "timeout"
    assert outcome.duration_s < 1.5
    mesh_grid.close()


def test_the_grid_arms_once_per_round_however_often_it_is_asked(service_url) -> None:
    recorder = Recorder((1, 2))
    mesh_grid = _grid(service_url("double"), recorder)

    for _ in range(3):  # a strategy asks several times while it samples
        assert list(mesh_grid.get_node_ids()) == [1, 2]
    mesh_grid.send_and_receive([_train_message(mesh_grid, 1)])
    mesh_grid.send_and_receive([])  # the round's (empty) evaluation closes it
    list(mesh_grid.get_node_ids())

    assert recorder.armed == [1, 2]
    mesh_grid.close()


def test_garbage_bytes_get_a_400_from_the_client_service(service_url) -> None:
    import httpx

    url = service_url("double") + protocol.MESSAGE_PATH
    response = httpx.post(url, content=b"\x00not a message")

    assert response.status_code == 400
    assert "not a Flower message" in response.text


def test_node_config_values_are_typed() -> None:
    config = clientservice.parse_config("a=1 b=0.5 c=true d=text")

    assert config == {"a": 1, "b": 0.5, "c": True, "d": "text"}


def test_a_client_app_spec_must_name_a_client_app() -> None:
    with pytest.raises(ValueError, match="module:attribute"):
        clientservice.load_client_app("no_colon")
    with pytest.raises(ValueError, match="not a flwr.clientapp.ClientApp"):
        clientservice.load_client_app("tests.toy_client_app:train")


def test_context_is_kept_between_messages() -> None:
    service = clientservice.ClientService(
        toy_client_app.app, name="c", node_id=4, node_config={}
    )
    assert isinstance(service._context, Context)
    assert service._context.node_id == 4
