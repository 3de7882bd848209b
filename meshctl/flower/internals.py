"""The few Flower names that are not public API, kept in one place.

Flower 1.42 builds instruction messages only inside its own runtimes: a process
that creates a ``Message`` outside them must first set the process-global task
identity.  Serialisation goes through Flower's protobuf serde.  When the pinned
Flower version moves, this module is the one to update.
"""

from __future__ import annotations

from flwr.app import Message
from flwr.common import serde
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611
from flwr.supercore.task_identity import TaskIdentity


class WireError(ValueError):
    """Bytes that do not decode to a Flower ``Message``."""


def set_task_identity(*, run_id: int, node_id: int, task_id: int = 1) -> None:
    """Let this process create and reply to messages outside Flower's runtimes."""
    TaskIdentity.task_id = task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id


def message_to_bytes(message: Message) -> bytes:
    """Serialise ``message`` with Flower's own protobuf schema."""
    return serde.message_to_proto(message).SerializeToString()


def message_from_bytes(data: bytes) -> Message:
    """Decode bytes written by :func:`message_to_bytes`."""
    proto = ProtoMessage()
    try:
        proto.ParseFromString(data)
        return serde.message_from_proto(proto)
    except Exception as exc:  # protobuf raises several unrelated types
        raise WireError(f"not a Flower message ({len(data)} bytes): {exc}") from exc
