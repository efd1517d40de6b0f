"""Round trips between numpy arrays and the wire Tensor, and decoding's validation."""

import numpy as np
import pytest

from attrserve.v1 import tensor_pb2
from attrserve_client import from_tensor_proto, to_tensor_proto

DT = tensor_pb2.DataType
WIRE = {
    "float32": DT.DATA_TYPE_FLOAT32, "float64": DT.DATA_TYPE_FLOAT64, "float16": DT.DATA_TYPE_FLOAT16,
    "int64": DT.DATA_TYPE_INT64, "int32": DT.DATA_TYPE_INT32, "int16": DT.DATA_TYPE_INT16,
    "int8": DT.DATA_TYPE_INT8, "uint8": DT.DATA_TYPE_UINT8, "bool": DT.DATA_TYPE_BOOL,
}
SHAPES = [(), (0,), (2, 0, 3), (5,), (2, 3, 4)]


def _sample(dtype, shape):
    values = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) - 3
    return (values % 2 == 0) if dtype == "bool" else values.astype(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(WIRE))
def test_round_trip_every_dtype_and_shape(dtype, shape):
    arr = _sample(dtype, shape)
    t = to_tensor_proto(arr)
    assert t.dtype == WIRE[dtype]
    assert list(t.shape) == list(shape)
    assert t.data == arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    back = from_tensor_proto(t)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


@pytest.mark.parametrize("value, dtype, shape", [
    (1.5, DT.DATA_TYPE_FLOAT32, []),
    (3, DT.DATA_TYPE_INT64, []),
    (True, DT.DATA_TYPE_BOOL, []),
    ([[1, 2], [3, 4]], DT.DATA_TYPE_INT64, [2, 2]),
    ([1.0, 2], DT.DATA_TYPE_FLOAT32, [2]),
    ([True, False], DT.DATA_TYPE_BOOL, [2]),
    ([], DT.DATA_TYPE_FLOAT32, [0]),
    (np.float64(2.0), DT.DATA_TYPE_FLOAT64, []),  # numpy values keep their dtype
    (np.int16(7), DT.DATA_TYPE_INT16, []),
])
def test_python_values_follow_torch_defaults(value, dtype, shape):
    t = to_tensor_proto(value)
    assert (t.dtype, list(t.shape)) == (dtype, shape)
    np.testing.assert_array_equal(from_tensor_proto(t), np.asarray(value))


@pytest.mark.parametrize("view", [
    lambda a: a[:, ::2],
    lambda a: a.T,
    lambda a: np.asfortranarray(a),
    lambda a: a[::-1],
])
def test_non_contiguous_inputs_are_sent_row_major(view):
    arr = view(np.arange(12, dtype=np.float32).reshape(3, 4))
    assert not arr.flags.c_contiguous
    t = to_tensor_proto(arr)
    assert t.data == np.ascontiguousarray(arr).tobytes()
    np.testing.assert_array_equal(from_tensor_proto(t), arr)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i8", ">i4", ">i2", ">f2"])
def test_big_endian_inputs_are_sent_little_endian(dtype):
    arr = np.array([[1, -2, 3], [4, 5, -6]], dtype=dtype)
    t = to_tensor_proto(arr)
    assert t.data == arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    back = from_tensor_proto(t)
    assert back.dtype.byteorder in "<=|"
    np.testing.assert_array_equal(back, arr)


def test_decode_is_a_read_only_view_of_the_message_bytes():
    back = from_tensor_proto(to_tensor_proto(np.ones((2, 3), np.float32)))
    assert back.base is not None
    assert not back.flags.writeable


def test_bfloat16_decodes_to_float32():
    values = np.array([[1.0, -2.5, 0.15625], [np.inf, -0.0, 3.0e38]], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype("<u2")  # truncation: exact for these values
    expected = (bits.astype(np.uint32) << 16).view(np.float32)
    t = tensor_pb2.Tensor(dtype=DT.DATA_TYPE_BFLOAT16, shape=[2, 3], data=bits.tobytes())
    back = from_tensor_proto(t)
    assert back.dtype == np.float32 and back.shape == (2, 3)
    np.testing.assert_array_equal(back, expected)
    np.testing.assert_array_equal(back[0, :3], values[0, :3])


def test_bfloat16_byte_length_is_checked():
    with pytest.raises(ValueError, match="needs 4"):
        from_tensor_proto(tensor_pb2.Tensor(dtype=DT.DATA_TYPE_BFLOAT16, shape=[2], data=b"\0" * 3))


@pytest.mark.parametrize("shape, size", [([2, 3], 23), ([2, 3], 25), ([], 0), ([0], 4)])
def test_byte_length_is_validated(shape, size):
    t = tensor_pb2.Tensor(dtype=DT.DATA_TYPE_FLOAT32, shape=shape, data=b"\0" * size)
    with pytest.raises(ValueError, match=f"has {size} bytes .*FLOAT32 needs"):
        from_tensor_proto(t)


def test_negative_dims_and_unknown_dtypes_are_rejected():
    with pytest.raises(ValueError, match="negative"):
        from_tensor_proto(tensor_pb2.Tensor(dtype=DT.DATA_TYPE_FLOAT32, shape=[-1], data=b""))
    with pytest.raises(ValueError, match="DATA_TYPE_UNSPECIFIED"):
        from_tensor_proto(tensor_pb2.Tensor(shape=[1], data=b"\0"))
    with pytest.raises(ValueError, match="99"):
        from_tensor_proto(tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0"))


@pytest.mark.parametrize("value", [
    np.zeros(2, np.complex64), np.zeros(2, np.uint16), np.zeros(2, np.uint32), np.zeros(2, np.uint64),
    ["a", "b"], np.array([object()]),
])
def test_unsupported_dtypes_are_rejected(value):
    with pytest.raises(ValueError, match="unsupported dtype"):
        to_tensor_proto(value)
