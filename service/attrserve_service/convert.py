"""Protobuf ↔ numpy at the service edge: decode requests into AttributionJobs, encode results (zero-copy where possible).

Without torch: a job's tensors are numpy arrays here and become torch tensors in the engine process, and a result's
come back as numpy arrays (frames.py; docs/ARCHITECTURE.md, "Threads, the GIL and the hot path")."""

from __future__ import annotations

import math
import time
from typing import Any, TypeVar, cast

import ml_dtypes
import numpy as np
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import tensor_pb2
from attrserve_engine import AlgorithmSpec, AttributionJob, AttributionResult, InvalidArgument
from attrserve_engine.errors import shown
from attrserve_service.frames import dtype_name

DType = tensor_pb2.DataType
# A job and a result as the front end holds them: numpy arrays, which the frames turn into the engine's tensors and back.
# Types only: an instance made through the alias would carry it (`__orig_class__`) into every frame.
Job = AttributionJob[np.ndarray]
Result = AttributionResult[np.ndarray]

# wire dtype → the numpy dtype its little-endian bytes are read as (bfloat16: ml_dtypes', as numpy has none). Each
# one's name is torch's name for it too (torch.float32, torch.bfloat16, ...).
WIRE_DTYPES: dict[tensor_pb2.DataType, np.dtype] = {
    DType.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    DType.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    DType.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    DType.DATA_TYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    DType.DATA_TYPE_INT64: np.dtype("<i8"),
    DType.DATA_TYPE_INT32: np.dtype("<i4"),
    DType.DATA_TYPE_INT16: np.dtype("<i2"),
    DType.DATA_TYPE_INT8: np.dtype("i1"),
    DType.DATA_TYPE_UINT8: np.dtype("u1"),
    DType.DATA_TYPE_BOOL: np.dtype("?"),
}
NAME_TO_WIRE = {dtype.name: wire for wire, dtype in WIRE_DTYPES.items()}
_PREFIX = "ALGORITHM_"
# A tensor's dims: NumPy takes at most 64; no model input needs more than a handful.
MAX_DIMS = 32
# The bytes a tensor's nonzero dims may span (elements × itemsize): under what NumPy's intp counts (2**63 - 1), with
# room, so that neither NumPy nor torch overflows on a shape that passed (an empty one included).
MAX_TENSOR_BYTES = 2**62
# Bounds of a google.protobuf.Struct of parameters (custom_params, also[i].params), checked while it is converted, so
# a huge or deeply nested one costs at most this much work before it is refused.
MAX_STRUCT_DEPTH = 8
MAX_STRUCT_VALUES = 1000
MAX_STRUCT_STRING = 1000
M = TypeVar("M", bound=Message)


def wire_dtype(dtype: object) -> int:
    """The wire dtype of a torch or numpy dtype (by its name); 0, DATA_TYPE_UNSPECIFIED, for one the wire lacks."""
    return NAME_TO_WIRE.get(str(dtype).removeprefix("torch."), 0)


def array_from_proto(t: tensor_pb2.Tensor, label: str) -> np.ndarray:
    """A read-only numpy array viewing the bytes read out of the message."""
    if t.dtype not in WIRE_DTYPES:
        raise InvalidArgument(
            f"{label}.dtype is {DType.Name(t.dtype) if t.dtype in DType.values() else t.dtype}; "
            f"set one of {', '.join(DType.Name(d) for d in WIRE_DTYPES)}"
        )
    np_dtype = WIRE_DTYPES[t.dtype]
    if len(t.shape) > MAX_DIMS:
        raise InvalidArgument(f"{label}.shape has {len(t.shape)} dims; at most {MAX_DIMS}")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{label}.shape {list(shape)} has a negative dim")
    # Python ints: a product of int64 dims may not fit in one (NumPy's would wrap around). NumPy refuses an array whose
    # nonzero dims hold more bytes than an intp counts, even an empty one ([0, 2**61] of float32: ValueError, "array is
    # too big"), so the bound is on those bytes, not on the elements.
    nbytes = math.prod(d for d in shape if d) * np_dtype.itemsize
    if nbytes >= MAX_TENSOR_BYTES:
        raise InvalidArgument(
            f"{label}.shape {list(shape)} of {DType.Name(t.dtype)} spans {nbytes} bytes (its nonzero dims); more than any tensor can hold"
        )
    want = math.prod(shape) * np_dtype.itemsize
    data = t.data  # read once: each read of a bytes field copies it out of the message (15 µs for 588 KiB)
    if len(data) != want:
        raise InvalidArgument(f"{label}: shape {list(shape)} of {DType.Name(t.dtype)} needs {want} bytes of data, got {len(data)}")
    return np.frombuffer(data, dtype=np_dtype).reshape(shape)


def wire_array(a: np.ndarray) -> tuple[DType, tuple[int, ...], bytes]:
    """A result's array as the wire carries it: its dtype (one the wire lacks, uint16 say, goes as float32), its shape
    and its bytes (C order, little-endian)."""
    wire = NAME_TO_WIRE.get(dtype_name(a.dtype))
    if wire is None:
        a, wire = a.astype(np.float32), DType.DATA_TYPE_FLOAT32
    return wire, a.shape, a.astype(WIRE_DTYPES[wire], copy=False).tobytes()


def fill_tensor(message: tensor_pb2.Tensor, a: np.ndarray) -> None:
    """Write a result's array into `message`, a field of the response being built. In place: a Tensor built apart and
    then put into its parent (a constructor's argument, CopyFrom) is copied there, which upb does by serialising it and
    parsing the bytes; for a 3x224x224 answer that doubled the front's cost of building the response (bench/RESULTS.md,
    issue 12 step 32)."""
    message.dtype, shape, message.data = wire_array(a)
    message.shape.extend(shape)


def array_to_proto(a: np.ndarray) -> tensor_pb2.Tensor:
    """A result's array as a message of its own."""
    message = tensor_pb2.Tensor()
    fill_tensor(message, a)
    return message


# Built-in algorithm names by enum value (ALGORITHM_UNSPECIFIED left out), and the values by name, built once: a
# request looks its name up, a model's info each of its algorithms' values.
ALGORITHM_NAMES = {v: n[len(_PREFIX) :].lower() for n, v in pb.Algorithm.items() if v != pb.ALGORITHM_UNSPECIFIED}
_ALGORITHM_VALUES = {name: value for value, name in ALGORITHM_NAMES.items()}


def algorithm_name(value: int, label: str = "algorithm") -> str:
    if value == pb.ALGORITHM_UNSPECIFIED:
        raise InvalidArgument(f"{label} is ALGORITHM_UNSPECIFIED; name the algorithm to run (or a plugin in custom_algorithm)")
    name = ALGORITHM_NAMES.get(value)
    if name is None:
        raise InvalidArgument(f"{label} {value} is not known to this server")
    return name


def algorithm_enum(name: str) -> pb.Algorithm | None:
    """The enum value of a built-in algorithm (its name in any case); None for a plugin's."""
    # (A dict, not `pb.Algorithm.keys()`: that builds the list of every enum name on each call, and a model's info
    # asks once per algorithm: ListModels took ~1.7 ms of the engine process's event loop on the bench's four models.)
    return cast("pb.Algorithm | None", _ALGORITHM_VALUES.get(name.lower()))


def decode(message_type: type[M], data: bytes | M) -> M:
    """A request message from its wire bytes (the servicers take raw bytes, so that a request that does not
    parse is an INVALID_ARGUMENT of ours rather than grpc's UNKNOWN); a message passes through."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        return data
    try:
        return message_type.FromString(bytes(data))
    except Exception as e:  # DecodeError (garbage, truncated, nested past protobuf's recursion limit), RecursionError
        name = message_type.DESCRIPTOR.full_name
        raise InvalidArgument(f"the request is not a valid {name}: {shown(str(e), 200)}") from None


def struct_to_dict(struct: struct_pb2.Struct, label: str) -> dict[str, Any]:
    """A Struct of parameters as Python values (json_format.MessageToDict's), refused past the bounds: at most
    MAX_STRUCT_DEPTH levels of nesting, MAX_STRUCT_VALUES values and MAX_STRUCT_STRING characters a string or key,
    and numbers finite (a Struct is JSON, which has no NaN or Infinity). Costs O(the bounds), whatever the size."""
    budget = [MAX_STRUCT_VALUES]
    return _struct(struct, label, 1, budget)


def _path(label: str, key: str) -> str:
    return f"{label}.{key}" if len(key) <= 40 else f"{label}.{key[:40]}..."


def _spend(label: str, count: int, budget: list[int]) -> None:
    budget[0] -= count
    if budget[0] < 0:
        raise InvalidArgument(f"{label} holds more than {MAX_STRUCT_VALUES} values in all; this server takes at most {MAX_STRUCT_VALUES}")


def _struct(struct: struct_pb2.Struct, label: str, depth: int, budget: list[int]) -> dict[str, Any]:
    if depth > MAX_STRUCT_DEPTH:
        raise InvalidArgument(f"{label} is nested more than {MAX_STRUCT_DEPTH} levels deep")
    _spend(label, len(struct.fields), budget)
    out = {}
    for key, value in struct.fields.items():
        if len(key) > MAX_STRUCT_STRING:
            raise InvalidArgument(f"{label} has a key of {len(key)} characters ({shown(key, 40)}); at most {MAX_STRUCT_STRING}")
        out[key] = _value(value, _path(label, key), depth, budget)
    return out


def _value(value: struct_pb2.Value, label: str, depth: int, budget: list[int]) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidArgument(f"{label} is {number}; numbers must be finite (a Struct is JSON, which has no NaN or Infinity)")
        return number
    if kind == "string_value":
        if len(value.string_value) > MAX_STRUCT_STRING:
            raise InvalidArgument(f"{label} is a string of {len(value.string_value)} characters; at most {MAX_STRUCT_STRING}")
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _struct(value.struct_value, label, depth + 1, budget)
    if kind == "list_value":
        if depth + 1 > MAX_STRUCT_DEPTH:
            raise InvalidArgument(f"{label} is nested more than {MAX_STRUCT_DEPTH} levels deep")
        items = value.list_value.values
        _spend(label, len(items), budget)
        return [_value(item, f"{label}[{i}]", depth + 1, budget) for i, item in enumerate(items)]
    return None  # null_value, or no value set (as json_format reads them)


def _fields(message: Message) -> dict:
    """The fields a caller set, by Captum name; unset fields fall back to Captum's defaults."""
    return {f.name: _plain(f, v) for f, v in message.ListFields()}


def _plain(field: FieldDescriptor, value: Any) -> Any:
    if field.is_repeated and field.message_type is not None:  # IntList, e.g. one window shape per input
        return [tuple(item.values) for item in value]
    return list(value) if field.is_repeated else value


def _target(target: pb.Target) -> int | tuple[int, ...] | list[tuple[int, ...]] | None:
    """The target in Captum's forms; the engine checks and formats it (attrserve_engine.targets)."""
    which = target.WhichOneof("value")
    if which == "index":
        return target.index
    if which == "tuple":
        return tuple(target.tuple.index)
    if which == "per_example":
        return [tuple(t.index) for t in target.per_example.indices]
    return None


def _algorithm_and_params(request: pb.AttributeRequest) -> tuple[str, dict]:
    params_field = request.WhichOneof("params")
    if request.custom_algorithm:
        if request.algorithm != pb.ALGORITHM_UNSPECIFIED or params_field is not None:
            raise InvalidArgument("custom_algorithm is set: leave algorithm and its params unset, and pass parameters in custom_params")
        return request.custom_algorithm, struct_to_dict(request.custom_params, "custom_params")
    if request.HasField("custom_params"):
        raise InvalidArgument("custom_params is only for custom_algorithm; use the params field of the algorithm")
    algorithm = algorithm_name(request.algorithm)
    if params_field is not None and params_field != algorithm:
        raise InvalidArgument(f"params are for {params_field} but algorithm is {algorithm}; set the {algorithm} field")
    return algorithm, _fields(getattr(request, params_field)) if params_field else {}


def _also(spec: pb.AlgorithmSpec, i: int) -> AlgorithmSpec:
    if bool(spec.custom_algorithm) == (spec.algorithm != pb.ALGORITHM_UNSPECIFIED):
        raise InvalidArgument(f"also[{i}]: set exactly one of algorithm and custom_algorithm")
    return AlgorithmSpec(
        algorithm=spec.custom_algorithm or algorithm_name(spec.algorithm, f"also[{i}].algorithm"),
        params=struct_to_dict(spec.params, f"also[{i}].params"),
        noise_tunnel=_fields(spec.noise_tunnel) if spec.HasField("noise_tunnel") else None,
        layer=spec.layer,
        return_convergence_delta=spec.return_convergence_delta,
    )


def request_to_job(request: pb.AttributeRequest, deadline: float | None = None) -> Job:
    arrival = time.monotonic()
    if not request.model:
        raise InvalidArgument("model is empty; name a served model (ListModels lists them)")
    algorithm, params = _algorithm_and_params(request)
    inputs = tuple(array_from_proto(t, f"inputs[{i}]") for i, t in enumerate(request.inputs))
    baselines = []
    for i, b in enumerate(request.baselines):
        which = b.WhichOneof("value")
        baselines.append(None if which is None else b.scalar if which == "scalar" else array_from_proto(b.tensor, f"baselines[{i}].tensor"))
    return AttributionJob(
        model=request.model,
        model_version=request.model_version,
        algorithm=algorithm,
        inputs=inputs,
        baselines=tuple(baselines),
        target=_target(request.target),
        additional_forward_args=tuple(
            array_from_proto(t, f"additional_forward_args[{i}]") for i, t in enumerate(request.additional_forward_args)
        ),
        params=params,
        noise_tunnel=_fields(request.noise_tunnel) if request.HasField("noise_tunnel") else None,
        layer=request.layer,
        feature_masks=tuple(array_from_proto(t, f"feature_masks[{i}]") for i, t in enumerate(request.feature_masks)),
        return_convergence_delta=request.return_convergence_delta,
        return_outputs=request.return_outputs,
        seed=request.seed if request.HasField("seed") else None,
        request_id=request.request_id,
        deadline=deadline,
        arrival=arrival,
        also=tuple(_also(spec, i) for i, spec in enumerate(request.also)),
        evaluate={f.name: _fields(v) for f, v in request.evaluate.ListFields()} if request.HasField("evaluate") else None,
        priority=_priority(request.priority),
    )


def payload_bytes(job: Job) -> int:
    """The bytes of a job's arrays: its inputs, array baselines, additional forward args, feature masks and target."""
    arrays = (*job.inputs, *job.baselines, *job.additional_forward_args, *job.feature_masks, job.target)
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


def _priority(value: int) -> str:
    if value == pb.PRIORITY_BATCH:
        return "batch"
    if value in (pb.PRIORITY_UNSPECIFIED, pb.PRIORITY_INTERACTIVE):
        return "interactive"
    raise InvalidArgument(f"priority {value} is not one of PRIORITY_INTERACTIVE (1) or PRIORITY_BATCH (2)")


def result_to_response(result: Result) -> pb.AttributeResponse:
    t = result.timing
    response = pb.AttributeResponse(
        request_id=result.request_id,
        model_version=result.model_version,
        seed=result.seed,
        timing=pb.Timing(
            queue_ms=t.queue_ms,
            compute_ms=t.compute_ms,
            total_ms=t.total_ms,
            rows=t.rows,
            passes=t.passes,
            pass_rows=t.pass_rows,
            pass_requests=t.pass_requests,
        ),
    )
    for a in result.attributions:
        fill_tensor(response.attributions.add(), a)
    for outcome in result.also:
        entry = response.also.add(algorithm=outcome.algorithm)
        for a in outcome.attributions:
            fill_tensor(entry.attributions.add(), a)
        if outcome.convergence_delta is not None:
            fill_tensor(entry.convergence_delta, outcome.convergence_delta)
    for made in result.input_casts:
        response.input_casts.add(input=made.input, sent=wire_dtype(made.sent), used=wire_dtype(made.used))
    for name in ("convergence_delta", "outputs", "infidelity", "sensitivity_max"):
        value = getattr(result, name)
        if value is not None:
            fill_tensor(getattr(response, name), value)
    return response
