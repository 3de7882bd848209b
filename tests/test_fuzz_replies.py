"""Fuzzing client replies: any bytes, and well-formed Flower messages holding
odd arrays (wrong dtypes and shapes, NaN and infinities, empty, huge
dimensions, bytes that do not match their header).

The grid keeps a reply only when it is a sound update of the model it sent;
anything else is a :class:`BadReply` that says why (naming the array when an
array is at fault), never another exception.
"""

from __future__ import annotations

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from hypothesis import example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from meshctl import protocol
from meshctl.flower import grid, internals
from tests.fuzz_support import fuzz

MAX_BYTES = 1 << 20
MODEL = {"dense.weight": np.zeros((3, 2), np.float32), "dense.bias": np.zeros(2)}
DTYPES = st.sampled_from(["float32", "float64", "float16", "int32", "uint8", "bool"])
SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    st.sampled_from([(3, 2), (2,), (2, 3), (6,), (0,)]),
)


def _sent() -> Message:
    internals.set_task_identity(run_id=1, node_id=0)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in MODEL.items()}),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    return Message(content=content, message_type=MessageType.TRAIN, dst_node_id=1)


SENT = _sent()


@st.composite
def arrays(draw) -> Array:
    """A numpy array of any small shape and dtype, or a header that lies."""
    dtype, shape = draw(DTYPES), draw(SHAPES)
    values = draw(hnp.arrays(dtype, shape))  # NaN and infinities included
    array = Array(values)
    if draw(st.booleans()):
        return array
    lie = draw(st.sampled_from(["shape", "data", "dtype"]))
    if lie == "shape":
        huge = draw(st.sampled_from([(2**31 - 1,), (3, 2), (65536, 65536), (-1,)]))
        return Array(dtype=array.dtype, shape=huge, stype=array.stype, data=array.data)
    if lie == "data":
        data = draw(st.binary(max_size=64))
        return Array(dtype=array.dtype, shape=array.shape, stype=array.stype, data=data)
    odd = draw(st.sampled_from(["float32", "object", "<U4", "nonsense", ""]))
    return Array(dtype=odd, shape=array.shape, stype=array.stype, data=array.data)


@st.composite
def replies(draw) -> RecordDict:
    """A reply's content: the model's array names (mostly), odd arrays, counts."""
    names = draw(st.one_of(st.just(list(MODEL)), st.lists(st.text(max_size=4))))
    records = {}
    for index in range(draw(st.sampled_from([1, 1, 1, 0, 2]))):
        chosen = {
            name: (draw(arrays()) if draw(st.booleans()) else Array(MODEL[name]))
            if name in MODEL
            else draw(arrays())
            for name in names
        }
        records[f"arrays-{index}"] = ArrayRecord(chosen)
    count = draw(st.one_of(st.integers(-3, 10**12), st.floats(), st.none()))
    if count is not None:
        records["metrics"] = MetricRecord({protocol.NUM_EXAMPLES_METRIC: count})
    return RecordDict(records)


def _reply_bytes(content: RecordDict) -> bytes:
    internals.set_task_identity(run_id=1, node_id=1)
    return internals.message_to_bytes(Message(content, reply_to=SENT))


@fuzz(200)
@given(data=st.binary(max_size=300))
@example(data=b"")
@example(data=b"\x0a\x00")
def test_any_bytes_are_a_reply_or_a_bad_reply(data) -> None:
    try:
        grid._decode_reply(data, SENT, MAX_BYTES)
    except grid.BadReply as exc:
        assert str(exc)


@fuzz(150)
@given(content=replies())
@example(  # a header claiming 2**31 values over a few bytes of data
    content=RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "dense.weight": Array(
                        dtype="float32",
                        shape=(2**31 - 1,),
                        stype="numpy.ndarray",
                        data=Array(MODEL["dense.weight"]).data,
                    ),
                    "dense.bias": Array(MODEL["dense.bias"]),
                }
            ),
            "metrics": MetricRecord({protocol.NUM_EXAMPLES_METRIC: 5}),
        }
    )
)
def test_an_odd_update_is_kept_only_when_sound(content) -> None:
    data = _reply_bytes(content)
    try:
        reply = grid._decode_reply(data, SENT, MAX_BYTES)
    except grid.BadReply as exc:
        assert str(exc)
        return

    # What was kept is exactly the model's arrays, finite, with a count.
    (record,) = reply.content.array_records.values()
    assert list(record.keys()) == list(MODEL)
    for name, expected in MODEL.items():
        values = record[name].numpy()
        assert values.dtype == expected.dtype and values.shape == expected.shape
        assert np.all(np.isfinite(values))


def _lying(dtype: str, shape: tuple[int, ...], data_of: np.ndarray) -> Array:
    """An array whose header says ``dtype`` and ``shape`` over another's data."""
    return Array(
        dtype=dtype, shape=shape, stype="numpy.ndarray", data=Array(data_of).data
    )


@fuzz(100)
@given(name=st.sampled_from(list(MODEL)), array=arrays())
@example(name="dense.weight", array=_lying("float32", (3, 2), np.zeros((3, 2))))
@example(name="dense.weight", array=_lying("float32", (3, 2), np.zeros((2, 3), "f4")))
@example(name="dense.weight", array=_lying("float32", (3, 2), np.zeros(6, "f4")))
def test_a_bad_array_is_rejected_naming_it(name, array) -> None:
    update = {k: Array(v) for k, v in MODEL.items()}
    update[name] = array
    content = RecordDict(
        {
            "arrays": ArrayRecord(update),
            "metrics": MetricRecord({protocol.NUM_EXAMPLES_METRIC: 3}),
        }
    )
    try:
        grid.check_update(SENT.content, content)
    except grid.BadReply as exc:
        assert repr(name) in str(exc)
    else:
        values = array.numpy()
        assert values.shape == MODEL[name].shape and values.dtype == MODEL[name].dtype
        assert np.all(np.isfinite(values))
