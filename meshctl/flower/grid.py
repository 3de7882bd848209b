"""A Flower ``Grid`` whose nodes are routing slots behind one mesh address.

Flower's strategies ask a ``Grid`` for node ids and hand it messages.  Here the
node ids are the slots that the controller armed for the round, and every message
goes to the same address, the mesh, with the slot and the round in headers.  The
routes decide which client stands behind a slot; the server never learns it.

A request the mesh itself never answers (the connection to Envoy fails) is
``lost``, not the client's failure.  Each reply is checked before a strategy
sees it: a failed request, a late reply or
an update of the wrong shape, dtype or size, or with non-finite values, becomes an
error reply, which Flower's strategies leave out of the aggregate.  One bad reply
never aborts a round.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import numpy as np
from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from meshctl import protocol
from meshctl.flower import internals
from meshctl.types import ArmedRound, SlotOutcome

log = logging.getLogger("meshctl.grid")

# Error codes of the replies the grid makes up for failed slots.
ERROR_TRANSPORT = 1
ERROR_STATUS = 2
ERROR_TIMEOUT = 3
ERROR_BAD_REPLY = 4

DEFAULT_MAX_REPLY_BYTES = 64 * 1024 * 1024

ArmFn = Callable[[int], ArmedRound]
ReportFn = Callable[[int, list[SlotOutcome]], None]


class BadReply(ValueError):
    """A reply that must not reach aggregation; the message says why."""


class MeshGrid(Grid):
    """Sends each message through the mesh to the slot it is addressed to.

    ``arm(server_round)`` asks the controller for the round's slots; it is called
    once per round, when a strategy first asks for node ids.  ``report`` receives
    the round's per-slot outcomes once the training replies are in.
    """

    def __init__(
        self,
        *,
        mesh_url: str,
        arm: ArmFn,
        report: ReportFn,
        deadline_s: float,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        run_id: int = 1,
        http: httpx.Client | None = None,
    ) -> None:
        self._mesh_url = mesh_url.rstrip("/") + protocol.MESSAGE_PATH
        self._arm = arm
        self._report = report
        self._deadline_s = deadline_s
        self._max_reply_bytes = max_reply_bytes
        self._run = Run.create_empty(run_id)
        self._http = http or httpx.Client(limits=httpx.Limits(max_connections=256))
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="mesh-send")
        self._pending: dict[str, Future[tuple[Message, SlotOutcome]]] = {}
        self._keys = itertools.count()
        self._server_round = 0
        self._armed: ArmedRound | None = None
        self._trained = False
        internals.set_task_identity(run_id=run_id, node_id=0)

    # -- the Grid interface -------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(
            content=content,
            message_type=message_type,
            dst_node_id=dst_node_id,
            group_id=group_id,
            ttl=ttl,
        )

    def get_node_ids(self) -> Iterable[int]:
        if self._armed is None:
            self._server_round += 1
            self._armed = self._arm(self._server_round)
            self._trained = False
        return list(self._armed.slots)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        keys = []
        for message in messages:
            key = f"{self._server_round}/{next(self._keys)}"
            self._pending[key] = self._pool.submit(
                self._exchange, message, time.monotonic()
            )
            keys.append(key)
        return keys

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for key in message_ids:
            future = self._pending.get(key)
            if future is not None and future.done():
                replies.append(self._pending.pop(key).result()[0])
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        is_train = any(m.metadata.message_type == MessageType.TRAIN for m in messages)
        started = time.monotonic()
        futures = [self._pool.submit(self._exchange, m, started) for m in messages]
        results = [future.result() for future in futures]
        self._finish_phase(is_train, [outcome for _, outcome in results])
        return [reply for reply, _ in results]

    # -- rounds ---------------------------------------------------------------

    def _finish_phase(self, is_train: bool, outcomes: list[SlotOutcome]) -> None:
        """Report a round's training outcomes; close the round after evaluation.

        A strategy trains, then evaluates (possibly with no message at all), then
        starts the next round by asking for node ids again.
        """
        if is_train:
            self._trained = True
            self._report(self._server_round, outcomes)
        elif self._trained:
            self._armed = None

    # -- one message ----------------------------------------------------------

    def _exchange(
        self, message: Message, started: float
    ) -> tuple[Message, SlotOutcome]:
        slot = message.metadata.dst_node_id
        message = self._with_slot_config(message)
        remaining_s = max(0.001, self._deadline_s - (time.monotonic() - started))
        headers = {
            "host": protocol.SERVICE_HOST,
            "content-type": protocol.MESSAGE_CONTENT_TYPE,
            protocol.SLOT_HEADER: str(slot),
            protocol.ROUND_HEADER: str(self._server_round),
            protocol.DEADLINE_HEADER: str(int(remaining_s * 1000)),
        }
        request = self._http.build_request(
            "POST",
            self._mesh_url,
            content=internals.message_to_bytes(message),
            headers=headers,
            timeout=remaining_s,
        )
        try:
            status, body = self._send(request)
        except httpx.TimeoutException:
            return self._failed(message, started, "timeout", ERROR_TIMEOUT, "deadline")
        except httpx.HTTPError as exc:
            # No answer from the mesh itself (Envoy down or restarting): the
            # request may never have reached the client, so it is not held
            # against it.
            return self._failed(message, started, "lost", ERROR_TRANSPORT, str(exc))
        except BadReply as exc:
            return self._failed(message, started, "error", ERROR_BAD_REPLY, str(exc))
        if status != 200:
            text = body[:200].decode(errors="replace").strip()
            return self._failed(
                message, started, "error", ERROR_STATUS, f"HTTP {status}: {text}"
            )
        try:
            reply = _decode_reply(body, message, self._max_reply_bytes)
        except BadReply as exc:
            return self._failed(message, started, "error", ERROR_BAD_REPLY, str(exc))
        return reply, _outcome(self._server_round, message, reply, started)

    def _send(self, request: httpx.Request) -> tuple[int, bytes]:
        """Send ``request``; the status and the body, read no further than allowed.

        A reply larger than ``max_reply_bytes`` is refused as soon as its
        ``content-length`` or its bytes so far say so, and its connection is
        dropped: a client cannot make the server hold more than that.
        """
        limit = self._max_reply_bytes
        response = self._http.send(request, stream=True)
        try:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise BadReply(f"reply of {int(declared)} bytes exceeds {limit}")
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise BadReply(f"reply of more than {limit} bytes exceeds {limit}")
            return response.status_code, bytes(body)
        finally:
            response.close()

    def _with_slot_config(self, message: Message) -> Message:
        """Merge the slot's own training settings into a training message.

        The controller may ask for per-slot settings (a policy that gives fast
        clients more local steps); they override the strategy's configuration
        for that slot only.  The arrays are shared, not copied.
        """
        slot = message.metadata.dst_node_id
        overrides = self._armed.slot_config.get(slot) if self._armed else None
        if not overrides or message.metadata.message_type != MessageType.TRAIN:
            return message
        content = RecordDict(dict(message.content.items()))
        configs = dict(message.content.config_records) or {"config": ConfigRecord()}
        for key, record in configs.items():
            content[key] = ConfigRecord({**record, **overrides})
        message.content = content
        return message

    def _failed(
        self, message: Message, started: float, status: str, code: int, reason: str
    ) -> tuple[Message, SlotOutcome]:
        slot = message.metadata.dst_node_id
        log.warning(
            "round %d slot %d: %s (%s)", self._server_round, slot, status, reason
        )
        outcome = SlotOutcome(
            server_round=self._server_round,
            slot=slot,
            status=status,
            duration_s=time.monotonic() - started,
            reason=reason,
        )
        return Message(Error(code=code, reason=reason), reply_to=message), outcome

    def close(self) -> None:
        """Stop the sender threads and the HTTP connection pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def _outcome(
    server_round: int, message: Message, reply: Message, started: float
) -> SlotOutcome:
    metrics = {}
    for record in reply.content.metric_records.values():
        metrics.update(record)
    loss = metrics.get(protocol.TRAIN_LOSS_METRIC)
    emulated = metrics.get(protocol.EMULATED_SECONDS_METRIC)
    return SlotOutcome(
        server_round=server_round,
        slot=message.metadata.dst_node_id,
        status="ok",
        duration_s=time.monotonic() - started,
        num_examples=int(metrics.get(protocol.NUM_EXAMPLES_METRIC, 0)),
        train_loss=float(loss) if loss is not None else None,
        emulated_s=float(emulated) if emulated is not None else None,
    )


def _decode_reply(data: bytes, sent: Message, max_bytes: int) -> Message:
    """Decode a reply and check it against the message it answers."""
    if len(data) > max_bytes:
        raise BadReply(f"reply of {len(data)} bytes exceeds {max_bytes}")
    try:
        reply = internals.message_from_bytes(data)
    except internals.WireError as exc:
        raise BadReply(str(exc)) from exc
    if reply.has_error():
        raise BadReply(f"client reported an error: {reply.error.reason}")
    if sent.metadata.message_type == MessageType.TRAIN:
        check_update(sent.content, reply.content)
    return reply


def check_update(sent: RecordDict, received: RecordDict) -> None:
    """Raise :class:`BadReply` unless ``received`` is a sound update of ``sent``.

    The update must hold one array record with the same arrays as the model sent
    (names, shapes, dtypes), only finite values, and a positive example count.
    """
    sent_records = list(sent.array_records.values())
    records = list(received.array_records.values())
    if len(records) != 1 or len(sent_records) != 1:
        raise BadReply(f"expected one array record, got {len(records)}")
    expected, update = sent_records[0], records[0]
    if list(update.keys()) != list(expected.keys()):
        raise BadReply(f"array names {list(update.keys())} != {list(expected.keys())}")
    for name in expected.keys():
        _check_array(name, expected[name], update[name])
    examples = [
        r.get(protocol.NUM_EXAMPLES_METRIC) for r in received.metric_records.values()
    ]
    count = next((e for e in examples if e is not None), None)
    if not isinstance(count, int) or count <= 0:
        raise BadReply(f"'{protocol.NUM_EXAMPLES_METRIC}' must be a positive int")


def _check_array(name: str, expected, update) -> None:
    if tuple(update.shape) != tuple(expected.shape) or update.dtype != expected.dtype:
        raise BadReply(
            f"array {name!r} is {update.dtype}{list(update.shape)}, "
            f"expected {expected.dtype}{list(expected.shape)}"
        )
    try:
        values = update.numpy()
    except Exception as exc:  # malformed bytes inside a well-formed record
        raise BadReply(f"array {name!r} does not decode: {exc}") from exc
    # The header may lie about the data it carries: check what was decoded.
    if not isinstance(values, np.ndarray) or (
        values.shape != tuple(expected.shape) or values.dtype != expected.dtype
    ):
        found = f"{getattr(values, 'dtype', type(values).__name__)}"
        found += f"{list(getattr(values, 'shape', ()))}"
        raise BadReply(
            f"array {name!r} decodes to {found}, expected "
            f"{expected.dtype}{list(expected.shape)}"
        )
    if not np.all(np.isfinite(values)):
        raise BadReply(f"array {name!r} holds NaN or infinite values")
