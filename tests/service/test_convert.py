"""The service edge's conversions: every wire dtype both ways (numpy ↔ Tensor message), byte lengths checked,
and requests decoded into the engine's job with Captum's target forms.

The front end handles numpy arrays; the engine computes in torch tensors, and the frames between the two processes
turn one into the other (frames.py). So the round trips here go the whole way a served value goes: an engine's tensor,
framed to the front as an array, into a message; a message's array, framed to the engine as a tensor."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import tensor_pb2
from attrserve_engine import AttributionResult, InvalidArgument, JobTiming
from attrserve_service import frames
from attrserve_service.convert import (
    WIRE_DTYPES,
    algorithm_enum,
    algorithm_name,
    array_from_proto,
    array_to_proto,
    request_to_job,
    result_to_response,
)

DT = tensor_pb2.DataType
SHAPES = [(), (0,), (2, 0, 3), (5,), (2, 3, 4)]


def crossed(value: object, tensors: bool) -> object:
    """`value` as a frame carries it to the engine process (tensors) or to the front end (numpy arrays)."""
    (back,) = frames.decode(bytearray(frames.encode([value])[8:]), tensors=tensors)
    return back


def tensor_to_proto(t: torch.Tensor) -> tensor_pb2.Tensor:
    """An engine's result tensor as the front end encodes it."""
    array = crossed(t, tensors=False)
    assert isinstance(array, np.ndarray)
    return array_to_proto(array)


def tensor_from_proto(message: tensor_pb2.Tensor, label: str) -> torch.Tensor:
    """A request's tensor as the engine receives it."""
    t = crossed(array_from_proto(message, label), tensors=True)
    assert isinstance(t, torch.Tensor)
    return t


def sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.arange(int(np.prod(shape)), dtype=torch.int64).reshape(shape) - 3
    if dtype is torch.bool:
        return values % 2 == 0
    if dtype.is_floating_point:
        return (values.to(torch.float64) * 0.37).to(dtype)
    return values.to(dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("wire", list(WIRE_DTYPES), ids=lambda w: DT.Name(w))
def test_every_wire_dtype_round_trips_exactly(wire: int, shape: tuple[int, ...]) -> None:
    np_dtype = WIRE_DTYPES[wire]
    torch_dtype = getattr(torch, np_dtype.name)
    t = sample(torch_dtype, shape)
    message = tensor_to_proto(t)
    assert message.dtype == wire and list(message.shape) == list(shape)
    assert len(message.data) == t.numel() * np_dtype.itemsize
    back = tensor_from_proto(message, "x")
    assert back.dtype == torch_dtype and tuple(back.shape) == shape
    assert torch.equal(back, t)
    array = array_from_proto(message, "x")  # the front's array: the same values, in ml_dtypes' bfloat16 for bfloat16
    assert array.dtype == np_dtype and array.shape == shape
    assert np.array_equal(array.astype(np.float64), t.to(torch.float64).numpy())


def test_bytes_are_little_endian_row_major() -> None:
    message = tensor_to_proto(torch.tensor([[1, 2], [3, 256]], dtype=torch.int32))
    assert message.data == b"\x01\0\0\0\x02\0\0\0\x03\0\0\0\x00\x01\0\0"
    bf16 = tensor_to_proto(torch.tensor([1.0], dtype=torch.bfloat16))
    assert bf16.dtype == DT.DATA_TYPE_BFLOAT16 and bf16.data == b"\x80\x3f"  # the top 16 bits of float32 1.0


def test_views_grads_and_devices_are_encoded_as_values() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(tensor_from_proto(tensor_to_proto(base.t()), "x"), base.t())  # non-contiguous
    leaf = base.clone().requires_grad_()
    assert torch.equal(tensor_from_proto(tensor_to_proto(leaf * 2), "x"), base * 2)  # needs grad
    assert tensor_to_proto(torch.tensor([1.5], dtype=torch.float64)).dtype == DT.DATA_TYPE_FLOAT64


def test_a_dtype_without_a_wire_type_is_sent_as_float32() -> None:
    message = tensor_to_proto(torch.tensor([1, 2], dtype=torch.uint16))
    assert message.dtype == DT.DATA_TYPE_FLOAT32
    assert torch.equal(tensor_from_proto(message, "x"), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("message, match", [
    (tensor_pb2.Tensor(dtype=DT.DATA_TYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20),
     r"inputs\[0\]: shape \[2, 3\] of DATA_TYPE_FLOAT32 needs 24 bytes of data, got 20"),
    (tensor_pb2.Tensor(dtype=DT.DATA_TYPE_INT64, shape=[1], data=b"\0" * 9), r"inputs\[0\]: .* needs 8 bytes of data, got 9"),
    (tensor_pb2.Tensor(dtype=DT.DATA_TYPE_FLOAT32, shape=[-1, 3], data=b""), r"inputs\[0\]\.shape \[-1, 3\] has a negative dim"),
    (tensor_pb2.Tensor(dtype=DT.DATA_TYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), r"inputs\[0\]\.dtype is DATA_TYPE_UNSPECIFIED"),
    (tensor_pb2.Tensor(dtype=99, shape=[1], data=b"\0" * 4), r"inputs\[0\]\.dtype is 99"),
])
def test_bad_tensors_are_refused_naming_the_field(message: tensor_pb2.Tensor, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        tensor_from_proto(message, "inputs[0]")


@pytest.mark.parametrize("target, want", [
    (pb.Target(), None),
    (pb.Target(index=3), 3),
    (pb.Target(tuple=pb.TargetIndex(index=[1, 2])), (1, 2)),
    (pb.Target(per_example=pb.TargetIndexList(indices=[pb.TargetIndex(index=[0]), pb.TargetIndex(index=[1])])), [(0,), (1,)]),
])
def test_targets_are_decoded_into_captums_forms(target: pb.Target, want) -> None:
    request = pb.AttributeRequest(model="m", algorithm=pb.ALGORITHM_SALIENCY, inputs=[tensor_to_proto(torch.zeros(2, 3))])
    if target.WhichOneof("value"):
        request.target.CopyFrom(target)
    job = request_to_job(request, deadline=12.5)
    assert set(vars(job)) == {f.name for f in dataclasses.fields(job)}  # the fields alone go into the engine's frame
    assert job.target == want
    assert job.algorithm == "saliency" and job.deadline == 12.5 and job.inputs[0].shape == (2, 3)


def test_a_result_is_encoded_with_its_timing_and_extras() -> None:
    result = AttributionResult(
        attributions=(torch.ones(2, 3),), convergence_delta=torch.zeros(2), outputs=None, model_version="1", seed=7,
        timing=JobTiming(queue_ms=1.0, compute_ms=2.0, total_ms=3.0, rows=4, passes=1, pass_rows=8, pass_requests=2),
        request_id="r1",
    )
    response = result_to_response(crossed(result, tensors=False))  # as the engine process's answer reaches the front
    assert response.request_id == "r1" and response.seed == 7 and response.model_version == "1"
    assert (response.timing.rows, response.timing.passes, response.timing.pass_requests) == (4, 1, 2)
    assert torch.equal(tensor_from_proto(response.attributions[0], "a"), torch.ones(2, 3))
    assert np.array_equal(array_from_proto(response.convergence_delta, "d"), np.zeros(2, dtype=np.float32))
    assert response.HasField("convergence_delta") and not response.HasField("outputs")


def test_algorithm_names_and_enum_values_map_both_ways() -> None:
    """A model's info lists its built-in algorithms by enum value and its plugins' by name (`algorithm_enum`); a
    request names its algorithm by value (`algorithm_name`). Every built-in maps both ways, in any case; a name the
    enum lacks is a plugin's, ALGORITHM_UNSPECIFIED's included."""
    values = [v for v in pb.Algorithm.values() if v != pb.ALGORITHM_UNSPECIFIED]
    assert values
    for value in values:
        name = algorithm_name(value)
        assert name == pb.Algorithm.Name(value).removeprefix("ALGORITHM_").lower()
        assert algorithm_enum(name) == value and algorithm_enum(name.upper()) == value
    for plugin in ("blur_integrated_gradients", "unspecified", "", "ALGORITHM_SALIENCY"):
        assert algorithm_enum(plugin) is None
