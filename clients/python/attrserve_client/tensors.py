"""Converts between numpy arrays (or torch tensors, going out) and attrserve's wire `Tensor` (raw little-endian,
row-major bytes). torch is never imported: a tensor is recognised by its `.detach().cpu().numpy()`."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import numpy.typing as npt

from attrserve.v1 import tensor_pb2

_DT = tensor_pb2.DataType

# Wire type -> little-endian numpy dtype. bfloat16 is absent: numpy has no such type.
_NUMPY_OF: dict[tensor_pb2.DataType, np.dtype] = {
    _DT.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    _DT.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    _DT.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    _DT.DATA_TYPE_INT64: np.dtype("<i8"),
    _DT.DATA_TYPE_INT32: np.dtype("<i4"),
    _DT.DATA_TYPE_INT16: np.dtype("<i2"),
    _DT.DATA_TYPE_INT8: np.dtype("i1"),
    _DT.DATA_TYPE_UINT8: np.dtype("u1"),
    _DT.DATA_TYPE_BOOL: np.dtype("?"),
}
# Keyed by (kind, itemsize) so that either byte order finds its wire type.
_WIRE_OF = {(d.kind, d.itemsize): (wire, d) for wire, d in _NUMPY_OF.items()}


def is_tensor(value: Any) -> bool:
    """Whether `value` looks like a torch tensor (duck typing: torch itself is not imported)."""
    return not isinstance(value, (np.ndarray, np.generic)) and all(hasattr(value, a) for a in ("detach", "cpu", "numpy"))


def as_numpy(value: Any) -> Any:
    """A torch tensor as a numpy array (detached, on the CPU, same dtype); anything else unchanged."""
    return value.detach().cpu().numpy() if is_tensor(value) else value


def _bfloat16(value: Any) -> tensor_pb2.Tensor | None:
    """A torch bfloat16 tensor as a BFLOAT16 wire tensor (numpy has no bfloat16: its 16-bit patterns are sent as they are)."""
    if not is_tensor(value) or str(getattr(value, "dtype", "")) != "torch.bfloat16":
        return None
    torch = sys.modules["torch"]  # a torch tensor exists, so torch is imported already
    bits = value.detach().cpu().contiguous().view(torch.int16).numpy()
    return tensor_pb2.Tensor(dtype=_DT.DATA_TYPE_BFLOAT16, shape=bits.shape, data=bits.astype("<i2").tobytes())


def _as_array(value: npt.ArrayLike) -> np.ndarray:
    value = as_numpy(value)
    if isinstance(value, (np.ndarray, np.generic)):
        return np.asarray(value)
    # Python data follows torch's defaults: floats -> float32, ints -> int64, bools -> bool.
    arr = np.asarray(value)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    return arr


def to_tensor_proto(value: npt.ArrayLike) -> tensor_pb2.Tensor:
    """Encodes an array-like (numpy array, torch tensor, scalar or nested lists) as a `Tensor`; numpy arrays and torch
    tensors keep their dtype (bfloat16 tensors too), Python data follows torch's defaults (float32, int64)."""
    if (bf16 := _bfloat16(value)) is not None:
        return bf16
    arr = _as_array(value)
    try:
        wire, dtype = _WIRE_OF[arr.dtype.kind, arr.dtype.itemsize]
    except KeyError:
        raise ValueError(f"unsupported dtype {arr.dtype}; supported: " + ", ".join(str(d) for d in _NUMPY_OF.values())) from None
    # astype(order="C") rather than np.ascontiguousarray, which would make a scalar 1-D.
    arr = arr.astype(dtype, order="C", copy=False)
    return tensor_pb2.Tensor(dtype=wire, shape=arr.shape, data=arr.tobytes())


def from_tensor_proto(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """Decodes a `Tensor` into a numpy array (a read-only view of the message's bytes; bfloat16 becomes float32)."""
    shape = tuple(tensor.shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"tensor shape {list(shape)} has a negative dimension")
    count = int(np.prod(shape, dtype=np.int64))
    dtype: np.dtype
    if tensor.dtype == _DT.DATA_TYPE_BFLOAT16:
        dtype = np.dtype("<u2")
    elif tensor.dtype in _NUMPY_OF:
        dtype = _NUMPY_OF[tensor.dtype]
    else:
        name = _DT.Name(tensor.dtype) if tensor.dtype in _DT.values() else tensor.dtype
        raise ValueError(f"unsupported tensor dtype {name}")
    if len(tensor.data) != count * dtype.itemsize:
        raise ValueError(
            f"tensor data has {len(tensor.data)} bytes but shape {list(shape)} of {_DT.Name(tensor.dtype)} needs {count * dtype.itemsize}"
        )
    arr = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if tensor.dtype == _DT.DATA_TYPE_BFLOAT16:
        # bfloat16 is the top half of a float32: widen the bits, then reinterpret.
        return (arr.astype("<u4") << 16).view("<f4")
    return arr
