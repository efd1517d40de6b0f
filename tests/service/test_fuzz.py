"""Property-based fuzzing of the RPC edge (hypothesis), against a real server (the oracle models, in-process).

(a) structured: AttributeRequests drawn field by field from the proto's descriptors — served model names and junk,
    algorithm enum values in and out of range, tensors with any dtype value, dims (negative, huge) and data length,
    any params oneof with any values, targets, priorities, noise tunnels, `also`, `evaluate`, Structs — sent through
    the stub with a 5 s deadline;
(b) raw bytes on every RPC of attrserve.v1.AttributionService and attrserve.v1.ModelRepositoryService (LoadModel and
    UnloadModel too: the test server runs without --model-control explicit, so they load and unload nothing): random
    bytes and mutated valid requests (truncated, bit-flipped, spliced, nested groups and messages past protobuf's
    recursion limit, overlong varints, invalid UTF-8, wrong wire types), sent undecoded;
(c) the Open Inference Protocol (inference.GRPCInferenceService, oip.py): structured ModelInferRequests (served model
    names and junk, versions, datatypes valid and not, shapes negative, huge or not matching the data, raw contents of
    wrong lengths, typed contents in the wrong field or besides raw ones, parameters of every kind with junk values and
    JSON strings of the wrong form, requested outputs with junk names, Triton's classification), and raw bytes on each
    of its RPCs.

Bounded: each test runs FUZZ.max_examples examples (deterministic by default: 200 structured of each service, 100 per
unary RPC of attrserve's, 100 on ModelInfer and 100 of its parameters alone, 25 on the other OIP RPCs, 150 streams).
For a longer, randomized run: ATTRSERVE_FUZZ_PROFILE=attrserve-fuzz-explore pytest tests/service/test_fuzz.py

Properties: the status is never INTERNAL or UNKNOWN (a stream's error entries neither), the message stays under
4 KiB, and the call returns within its deadline plus a margin (the server's event loop never hangs; it shares this
process' GIL, so a hang shows up as a late return). After each run the server answers with Captum's numbers, health
is SERVING and nothing is left in the engine. Each example runs under the process' own recursion limit
(`real_recursion_limit`: hypothesis raises it while it runs, which hid a RecursionError of the server's).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections import Counter

import grpc
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor as FD
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve.v1 import tensor_pb2
from attrserve_client import AttributionClient
from attrserve_engine.algorithms import ALGORITHMS as ENGINE_ALGORITHMS
from attrserve_service.kserve import grpc_predict_v2_pb2 as oip
from oracle import MODELS, Case, assert_all_close, captum_attribute, wait_in_flight

_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example, HealthCheck.filter_too_much]
settings.register_profile(
    "attrserve-fuzz", max_examples=200, deadline=None, database=None, derandomize=True, suppress_health_check=_HEALTH, print_blob=True
)
settings.register_profile(
    "attrserve-fuzz-explore", max_examples=2_000, deadline=None, database=None, suppress_health_check=_HEALTH, print_blob=True
)
FUZZ = settings.get_profile(os.environ.get("ATTRSERVE_FUZZ_PROFILE", "attrserve-fuzz"))

DEADLINE_S = 5.0
HANG_MARGIN_S = 5.0  # a call returning later than its deadline plus this is a hang (the client's deadline could not fire)
MAX_MESSAGE = 4096
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
STATUS_NAMES = {c.value[0]: c for c in grpc.StatusCode}
ATTRIBUTION = "/attrserve.v1.AttributionService/"
REPOSITORY = "/attrserve.v1.ModelRepositoryService/"
SERVICE = "attrserve.v1.AttributionService"

# Served names (not `slow`: its 0.3 s forwards would make valid requests queue each other past their deadlines).
SERVED = ["toy", "mlp", "conv", "multi", "text", "grid", "fragile"]
INPUT_SHAPES = {  # per example, per input (tests/oracle.py example_inputs)
    "toy": [(3,)], "mlp": [(6,)], "conv": [(2, 8, 8)], "multi": [(4,), (3,)], "text": [(5, 6)], "grid": [(5,)], "fragile": [(3,)],
}
MODEL_LAYERS = {  # tests/oracle.py's modules
    "toy": ["lin1", "relu", "lin2"], "mlp": ["fc1", "act1", "fc2", "act2", "fc3", "softmax"],
    "conv": ["conv1", "relu1", "pool", "conv2", "relu2", "flatten", "fc"], "multi": ["a", "a_act", "b", "b_act", "head"],
    "text": ["proj", "act", "head"], "grid": ["fc", "act"], "fragile": ["fc"],
}
LAYERS = sorted({layer for layers in MODEL_LAYERS.values() for layer in layers})
# Every algorithm's parameter names (the params messages' fields): Struct keys and ModelInfer parameters name them.
PARAM_NAMES = sorted({f.name for p in pb.AttributeRequest.DESCRIPTOR.oneofs_by_name["params"].fields for f in p.message_type.fields})
WORDS = ["gausslegendre", "riemann_left", "riemann_trapezoid", "smoothgrad", "smoothgrad_sq", "vargrad", "nearest", "bilinear"]
EDGE_INTS = [0, 1, 2, 3, 7, -1, -2, 2**31 - 1, -(2**31), 2**32 - 1, 2**53 + 1, 2**62, 2**63 - 1, -(2**63), 2**64 - 1]
DTYPE_ITEMSIZE = {1: 4, 2: 8, 3: 2, 4: 2, 5: 8, 6: 4, 7: 2, 8: 1, 9: 1, 10: 1}

outcomes: Counter = Counter()  # (test, code) → count, printed at the end of each test (pytest -s)
messages_seen: Counter = Counter()  # (test, code, the message's start) → count: how deep the fuzzing got


# -- value strategies ---------------------------------------------------------------------------------
def ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Mostly small values, sometimes the edges of the type, sometimes anything in range."""
    edges = [v for v in EDGE_INTS if lo <= v <= hi]
    return st.one_of(st.integers(max(lo, -3), min(hi, 64)), st.sampled_from(edges), st.integers(lo, hi))


FLOATS = st.one_of(
    st.floats(-10, 10),
    st.sampled_from([0.0, -0.0, 1e-300, -1e-300, 1e308, math.nan, math.inf, -math.inf, 0.5, 1.0]),
    st.floats(allow_nan=True, allow_infinity=True),
)
JUNK_TEXT = st.one_of(
    st.text(max_size=24),
    st.sampled_from(["", " ", "\x00", "../../etc/passwd", "%s%n", "ü" * 3, "\u202e", *SERVED, "slow", *LAYERS, *WORDS]),
    st.text(min_size=500, max_size=6_000),
)


def struct_values(depth: int = 0) -> st.SearchStrategy:
    leaves = st.one_of(st.none(), st.booleans(), FLOATS, JUNK_TEXT)
    return st.recursive(
        leaves, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(JUNK_TEXT, inner, max_size=4)), max_leaves=12
    )


@st.composite
def structs(draw) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    for key, value in draw(st.dictionaries(st.one_of(JUNK_TEXT, st.sampled_from(PARAM_NAMES)), struct_values(), max_size=5)).items():
        _set_struct_value(s.fields[key], value)
    return s


def _set_struct_value(target: struct_pb2.Value, value) -> None:
    """json_format would refuse NaN; the wire does not, so a client can send one: set it by hand."""
    if value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, float):
        target.number_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, list):
        target.list_value.SetInParent()
        for v in value:
            _set_struct_value(target.list_value.values.add(), v)
    else:
        target.struct_value.SetInParent()
        for k, v in value.items():
            _set_struct_value(target.struct_value.fields[k], v)


@st.composite
def junk_tensors(draw) -> tensor_pb2.Tensor:
    """Any dtype value, any dims (negative, huge, many), data of the right length when that is small, else any bytes."""
    dtype = draw(st.one_of(st.integers(-2, 12), st.sampled_from([2**31 - 1, -(2**31)])))
    shape = draw(st.one_of(st.lists(ints(-(2**63), 2**63 - 1), max_size=6), st.lists(st.integers(0, 2), min_size=33, max_size=40)))
    size = DTYPE_ITEMSIZE.get(dtype, 4) * math.prod(shape) if all(d >= 0 for d in shape) else -1
    if 0 <= size <= 4096 and draw(st.booleans()):
        data = draw(st.binary(min_size=size, max_size=size))
    else:
        data = draw(st.binary(max_size=256))
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def float_tensors(draw, shape: tuple[int, ...], dtype: int = tensor_pb2.DATA_TYPE_FLOAT32) -> tensor_pb2.Tensor:
    """A well-formed tensor of `shape`: random values, sometimes NaN / inf / huge ones."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.standard_normal(shape).astype(np.float32)
    special = draw(st.sampled_from([None, None, None, math.nan, math.inf, -math.inf, 3e38, 0.0]))
    if special is not None and values.size:
        values.flat[draw(st.integers(0, values.size - 1))] = special
    np_dtype = {tensor_pb2.DATA_TYPE_FLOAT64: "<f8", tensor_pb2.DATA_TYPE_INT64: "<i8"}.get(dtype, "<f4")
    with np.errstate(invalid="ignore", over="ignore"):
        data = np.nan_to_num(values, nan=0, posinf=0, neginf=0).astype(np_dtype) if np_dtype == "<i8" else values.astype(np_dtype)
    return tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=data.tobytes())


TAME_FLOATS = st.one_of(st.floats(-2, 2), st.sampled_from([0.0, 0.5, 1.0, 1e-3]))


def scalar_strategy(field: FD, tame: bool = False) -> st.SearchStrategy:
    """Any value of the field's type; `tame`: small, plausible ones (so that requests get past validation)."""
    t = field.type
    if tame and t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64, FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return st.integers(-1, 8)
    if tame and t in (FD.TYPE_UINT64, FD.TYPE_FIXED64, FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 16)
    if tame and t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return TAME_FLOATS
    if tame and t == FD.TYPE_STRING:
        return st.sampled_from(["", *WORDS, *LAYERS])
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return ints(-(2**63), 2**63 - 1)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return ints(0, 2**64 - 1)
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return ints(-(2**31), 2**31 - 1)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return ints(0, 2**32 - 1)
    if t == FD.TYPE_DOUBLE:
        return FLOATS
    if t == FD.TYPE_FLOAT:
        return st.floats(width=32, allow_nan=True, allow_infinity=True)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return JUNK_TEXT
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_ENUM:
        top = max(v.number for v in field.enum_type.values)
        return st.integers(0, top) if tame else st.one_of(st.integers(-2, top + 3), st.sampled_from([2**31 - 1, -(2**31)]))
    raise AssertionError(f"unhandled field type {t} of {field.full_name}")


def field_strategy(field: FD, depth: int, tame: bool = False) -> st.SearchStrategy:
    """One value of a field (a list for a repeated one)."""
    if field.type == FD.TYPE_MESSAGE:
        name = field.message_type.full_name
        if name == "attrserve.v1.Tensor":
            one = junk_tensors()
        elif name == "google.protobuf.Struct":
            one = structs()
        else:
            one = messages(field.message_type, depth + 1, tame=tame)
    else:
        one = scalar_strategy(field, tame)
    return st.lists(one, max_size=2 if tame else 4) if field.is_repeated else one


@st.composite
def messages(draw, descriptor, depth: int = 0, skip: frozenset = frozenset(), tame: bool = False, most: int = 5):
    """A message of `descriptor` with a random subset of (at most `most` of) its fields set to random values (nesting
    depth-limited)."""
    message = _message_class(descriptor)()
    if depth > 3:
        return message
    fields = [f for f in descriptor.fields if f.name not in skip]  # a list: sampled_from needs a sequence
    chosen = draw(st.lists(st.sampled_from(fields), max_size=min(len(fields), most), unique=True)) if fields else []
    for field in chosen:
        _assign(message, field, draw(field_strategy(field, depth, tame)))
    return message


def _message_class(descriptor):
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def _assign(message, field: FD, value) -> None:
    if field.is_repeated:
        target = getattr(message, field.name)
        if field.type == FD.TYPE_MESSAGE:
            for v in value:
                target.add().CopyFrom(v)
        else:
            target.extend(value)
    elif field.type == FD.TYPE_MESSAGE:
        getattr(message, field.name).SetInParent()
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


PARAMS = list(pb.AttributeRequest.DESCRIPTOR.oneofs_by_name["params"].fields)
ALGORITHMS = [v.number for v in pb.Algorithm.DESCRIPTOR.values if v.number]
ALGORITHM_NAMES = {v.number: v.name[len("ALGORITHM_"):].lower() for v in pb.Algorithm.DESCRIPTOR.values}
HANDLED = frozenset({"model", "algorithm", "inputs", "additional_forward_args", "target", "layer", "priority",
                     *(f.name for f in PARAMS)})
# What a coherent request may also carry (drawn tame): the rest (baselines, feature_masks, custom_*) is drawn as junk.
COHERENT_EXTRAS = frozenset({"return_convergence_delta", "return_outputs", "seed", "noise_tunnel", "evaluate", "request_id"})


@st.composite
def attribute_requests(draw) -> pb.AttributeRequest:
    """Half of them coherent (a served model, a real algorithm, its own params field with small values, inputs of the
    right shapes, few tame extras: they get past the first checks and into the engine), half anything."""
    if draw(st.integers(0, 9)) < 6:
        request = draw(messages(pb.AttributeRequest.DESCRIPTOR, skip=frozenset(
            f.name for f in pb.AttributeRequest.DESCRIPTOR.fields if f.name not in COHERENT_EXTRAS), tame=True, most=2))
        model = draw(st.sampled_from(SERVED))
        request.model = model
        request.algorithm = draw(st.sampled_from(ALGORITHMS))
        n = draw(st.integers(1, 3))
        for shape in INPUT_SHAPES[model]:
            request.inputs.add().CopyFrom(draw(float_tensors((n, *shape))))
        if model == "text":
            request.additional_forward_args.add().CopyFrom(draw(float_tensors((n, 5))))
        name = ALGORITHM_NAMES[request.algorithm]
        field = next((f for f in PARAMS if f.name == name), None)
        if field is not None and draw(st.booleans()):
            _assign(request, field, draw(messages(field.message_type, 1, tame=True, most=3)))
        if field is not None and "neuron_selector" in field.message_type.fields_by_name and draw(st.integers(0, 4)):
            params = getattr(request, field.name)
            params.SetInParent()
            del params.neuron_selector[:]
            params.neuron_selector.extend(draw(st.lists(st.integers(0, 2), min_size=1, max_size=3)))
        # What the algorithm takes (the engine's table), each broken now and then: a layer for layer and neuron
        # methods, a target where it looks at the output, baselines where it takes them.
        algorithm = ENGINE_ALGORITHMS[name]
        if algorithm.layer_method == bool(draw(st.integers(0, 9))):
            request.layer = draw(st.sampled_from(MODEL_LAYERS[model] if algorithm.layer_method else LAYERS))
        if algorithm.uses_target == bool(draw(st.integers(0, 9))):
            if model == "grid":
                request.target.tuple.index.extend(draw(st.sampled_from([[0, 0], [1, 2], [1, 2], [2, 0]])))
            else:
                request.target.index = draw(st.one_of(st.integers(0, 1), st.integers(0, 1), st.integers(-1, 3)))
        if algorithm.uses_baselines and draw(st.integers(0, 3)) == 0:
            for _ in INPUT_SHAPES[model]:
                request.baselines.add().scalar = draw(TAME_FLOATS)
    else:
        request = draw(messages(pb.AttributeRequest.DESCRIPTOR, skip=HANDLED))
        request.model = draw(st.one_of(st.sampled_from(SERVED), JUNK_TEXT))
        request.algorithm = draw(st.one_of(st.integers(-3, max(ALGORITHMS) + 3), st.sampled_from([2**31 - 1, -(2**31)])))
        for t in draw(st.lists(junk_tensors(), max_size=3)):
            request.inputs.add().CopyFrom(t)
        for t in draw(st.lists(junk_tensors(), max_size=2)):
            request.additional_forward_args.add().CopyFrom(t)
        if draw(st.booleans()):
            request.target.CopyFrom(draw(messages(pb.Target.DESCRIPTOR, 1)))
        request.layer = draw(st.one_of(st.just(""), JUNK_TEXT))
        if draw(st.booleans()):  # any params field, whatever the algorithm
            field = draw(st.sampled_from(PARAMS))
            _assign(request, field, draw(messages(field.message_type, 1)))
    if draw(st.integers(0, 7)) == 0:
        request.priority = draw(st.one_of(st.integers(-1, 4), st.sampled_from([2**31 - 1, -(2**31)])))
    else:
        request.priority = draw(st.integers(0, 2))
    return request


# -- raw bytes ------------------------------------------------------------------------------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field, by hand."""
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _valid_attribute_requests() -> list[pb.AttributeRequest]:
    x = np.array([[0.2, -0.4, 0.9]], np.float32)
    conv = np.zeros((2, 2, 8, 8), np.float32)
    text = np.ones((1, 5, 6), np.float32)
    also = AttributionClient.build_request("toy", "integrated_gradients", x, target=0, params={"n_steps": 8},
                                           also=[{"algorithm": "saliency"}, {"algorithm": "deep_lift", "params": {"eps": 1e-3}}],
                                           evaluate={"infidelity": {"n_perturb_samples": 2}}, noise_tunnel={"nt_samples": 2}, seed=3)
    custom = AttributionClient.build_request("toy", "integrated_gradients", x, target=1)
    custom.algorithm, custom.custom_algorithm = pb.ALGORITHM_UNSPECIFIED, "integrated_gradients"
    custom.custom_params.update({"n_steps": 4, "nested": {"a": [1, 2, {"b": "c"}]}})
    return [
        AttributionClient.build_request("toy", "saliency", x, target=0),
        AttributionClient.build_request("conv", "integrated_gradients", conv, target=[1, 2], params={"n_steps": 8}),
        AttributionClient.build_request("multi", "gradient_shap", (np.ones((1, 4), np.float32), np.ones((1, 3), np.float32)),
                                        baselines=(np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float32)), target=0, seed=1),
        AttributionClient.build_request("text", "layer_integrated_gradients", text, layer="proj", target=1,
                                        additional_forward_args=np.ones((1, 5), np.float32), params={"n_steps": 4}),
        AttributionClient.build_request("grid", "occlusion", np.ones((1, 5), np.float32), target=(1, 2),
                                        params={"sliding_window_shapes": (2,)}),
        also,
        custom,
    ]


ATTRIBUTE_SEEDS = [r.SerializeToString() for r in _valid_attribute_requests()]
UNARY_SEEDS = {
    ATTRIBUTION + "Attribute": ATTRIBUTE_SEEDS,
    ATTRIBUTION + "ListModels": [b""],
    ATTRIBUTION + "GetModel": [pb.GetModelRequest(model="conv").SerializeToString(),
                               pb.GetModelRequest(model="toy", model_version="1").SerializeToString()],
    REPOSITORY + "RepositoryIndex": [pb.RepositoryIndexRequest(ready_only=True).SerializeToString(), b""],
    # The test server runs without --model-control explicit: these are refused (FAILED_PRECONDITION) once decoded,
    # and nothing is loaded or unloaded whatever the bytes say.
    REPOSITORY + "LoadModel": [pb.LoadModelRequest(model="toy").SerializeToString()],
    REPOSITORY + "UnloadModel": [pb.UnloadModelRequest(model="toy", version="1").SerializeToString()],
}
STREAM = ATTRIBUTION + "AttributeStream"
STREAM_SEEDS = [ld(1, r) for r in ATTRIBUTE_SEEDS]  # AttributeStreamRequest.request


def test_the_fuzzed_rpcs_are_every_rpc_of_both_services() -> None:
    fuzzed = {*UNARY_SEEDS, STREAM}
    for service in ("AttributionService", "ModelRepositoryService"):
        descriptor = pb.DESCRIPTOR.services_by_name[service]
        assert {f"/{descriptor.full_name}/{m.name}" for m in descriptor.methods} <= fuzzed, service


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """Random bytes, or a valid request's bytes truncated, bit-flipped, spliced, or wrapped in nesting past protobuf's
    recursion limit; overlong varints, lengths past the end, invalid UTF-8 and wrong wire types on known fields."""
    seed = draw(st.sampled_from(seeds))
    kind = draw(st.sampled_from(["random", "truncate", "flip", "splice", "groups", "deep", "varint", "length", "utf8", "wiretype"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "truncate":
        return seed[: draw(st.integers(0, max(len(seed) - 1, 0)))]
    if kind == "flip":
        data = bytearray(seed or b"\x00")
        for _ in range(draw(st.integers(1, 8))):
            bit = draw(st.integers(0, 8 * len(data) - 1))
            data[bit // 8] ^= 1 << (bit % 8)
        return bytes(data)
    if kind == "splice":
        at = draw(st.integers(0, len(seed)))
        return seed[:at] + draw(st.binary(min_size=1, max_size=40)) + seed[at:]
    if kind == "groups":  # start-group tags of some field, nested `depth` deep, closed or not
        field, depth = draw(st.integers(1, 40)), draw(st.integers(1, 300))
        start, end = _varint((field << 3) | 3), _varint((field << 3) | 4)
        return seed + start * depth + (end * depth if draw(st.booleans()) else b"")
    if kind == "deep":  # nested length-delimited messages (AttributeRequest.target / Struct values) past the limit
        depth = draw(st.integers(50, 400))
        value = b"\x11" + b"\x00" * 8
        for _ in range(depth):
            value = ld(6, ld(1, value))  # Value.list_value → ListValue.values
        return seed + ld(27, ld(1, ld(1, b"k") + ld(2, value)))
    if kind == "varint":
        return seed + bytes([draw(st.integers(1, 0x7F)) << 3 & 0xFF]) + b"\xff" * draw(st.integers(10, 20))
    if kind == "length":
        return seed + _varint((draw(st.integers(1, 40)) << 3) | 2) + _varint(draw(st.integers(1, 2**32))) + b"abc"
    if kind == "utf8":
        return seed + ld(draw(st.sampled_from([1, 2, 3, 9, 26])), draw(st.sampled_from([b"\xff\xfe", b"\xc3", b"\xed\xa0\x80", b"a\x80b"])))
    # a known field with the wrong wire type: varint where a string or message goes, fixed64 for a varint, ...
    field = draw(st.integers(1, 40))
    wire = draw(st.sampled_from([0, 1, 5]))
    payload = {0: b"\x05", 1: b"\x00" * 8, 5: b"\x00" * 4}[wire]
    return seed + _varint((field << 3) | wire) + payload


# -- checks ---------------------------------------------------------------------------------------------
RECURSION_LIMIT = sys.getrecursionlimit()  # this process' own (1000), read before hypothesis runs


def real_recursion_limit(test):
    """Run each example under the process' own recursion limit: hypothesis raises it (to ~2000) while a test runs, and
    the in-process server shares it, so a request that a real server refuses with a RecursionError (INTERNAL) passed."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        raised = sys.getrecursionlimit()
        sys.setrecursionlimit(RECURSION_LIMIT)
        try:
            return test(*args, **kwargs)
        finally:
            sys.setrecursionlimit(raised)

    return run


def check_status(test: str, code: grpc.StatusCode, details: str, took: float, sent) -> None:
    outcomes[(test, code.name)] += 1
    messages_seen[(test, code.name, details[:50])] += 1
    assert code not in BAD, f"{code.name}: {details!r} for {sent!r}"[:3000]
    assert len(details.encode()) < MAX_MESSAGE, f"a {len(details.encode())}-byte message for {sent!r}"[:3000]
    assert took < DEADLINE_S + HANG_MARGIN_S, f"returned after {took:.1f} s for {sent!r}"[:3000]


def unary(channel: grpc.Channel, path: str, data: bytes) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    try:
        call(data, timeout=DEADLINE_S)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status


def assert_still_serving(server) -> None:
    """Nothing left in the engine; a normal request gets Captum's numbers; health is SERVING."""
    wait_in_flight(server.running.engine, 0)
    case = Case("conv", "integrated_gradients", {"n_steps": 16}, target="per_example", n=2, seed=5)
    built = case.build()
    want, _ = captum_attribute(case, MODELS["conv"](), built)
    with AttributionClient(server.address) as client:
        got = client.attribute("conv", "integrated_gradients", built["inputs"][0].numpy(), target=[[0], [1]],
                               params={"n_steps": 16}, timeout=30)
    assert_all_close((torch.from_numpy(got.attributions),), want)
    assert health(server.address) == health_pb2.HealthCheckResponse.SERVING


def report(test: str) -> None:
    print(f"\n{test}: " + ", ".join(f"{code} {n}" for (t, code), n in sorted(outcomes.items()) if t == test))
    common = [(n, code, start) for (t, code, start), n in messages_seen.most_common() if t == test][:8]
    print("  most common: " + "; ".join(f"{n}x {code} {start!r}" for n, code, start in common))


# -- tests ----------------------------------------------------------------------------------------------
def test_structured_attribute_requests_never_get_internal_or_unknown(server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)

        @settings(FUZZ)
        @given(request=attribute_requests())
        @real_recursion_limit
        def fuzz(request: pb.AttributeRequest) -> None:
            start = time.monotonic()
            try:
                stub.Attribute(request, timeout=DEADLINE_S)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            check_status("structured", code, details, time.monotonic() - start, request)

        fuzz()
    report("structured")
    assert_still_serving(server)


def fuzz_unary_bytes(server, path: str, seed: bytes, max_examples: int) -> None:
    """Mutations of `seed`'s bytes sent undecoded to the unary RPC `path`: never INTERNAL or UNKNOWN."""
    with grpc.insecure_channel(server.address) as channel:

        @settings(FUZZ, max_examples=max_examples)
        @given(data=mutated(seed))
        @real_recursion_limit
        def fuzz(data: bytes) -> None:
            start = time.monotonic()
            code, details = unary(channel, path, data)
            check_status(path, code, details, time.monotonic() - start, data)

        fuzz()
    report(path)


@pytest.mark.parametrize("path", sorted(UNARY_SEEDS))
def test_raw_bytes_on_unary_rpcs_never_get_internal_or_unknown(server, path: str) -> None:
    fuzz_unary_bytes(server, path, UNARY_SEEDS[path], max(FUZZ.max_examples // 2, 10))
    assert_still_serving(server)


def test_raw_bytes_on_attribute_stream_never_get_internal_or_unknown(server) -> None:
    """1-3 raw messages on one stream: the stream's status and every error entry it yields are never INTERNAL or UNKNOWN;
    a stream that ends OK answered every message (a request that fails yields an error entry and the stream goes on)."""
    with grpc.insecure_channel(server.address) as channel:
        call = channel.stream_stream(STREAM, request_serializer=None, response_deserializer=None)

        @settings(FUZZ, max_examples=max(3 * FUZZ.max_examples // 4, 10))
        @given(messages_=st.lists(mutated(STREAM_SEEDS), min_size=1, max_size=3))
        @real_recursion_limit
        def fuzz(messages_: list[bytes]) -> None:
            start = time.monotonic()
            entries = []
            try:
                for raw in call(iter(messages_), timeout=DEADLINE_S):
                    entries.append(pb.AttributeStreamResponse.FromString(raw))
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            took = time.monotonic() - start
            for entry in entries:
                if entry.WhichOneof("result") == "error":
                    check_status(STREAM + " entry", STATUS_NAMES[entry.error.code], entry.error.message, took, messages_)
            check_status(STREAM, code, details, took, messages_)
            if code == grpc.StatusCode.OK:
                assert len(entries) == len(messages_), (entries, messages_)

        fuzz()
    report(STREAM)
    report(STREAM + " entry")
    assert_still_serving(server)


# -- the Open Inference Protocol (inference.GRPCInferenceService, service/attrserve_service/oip.py) -------------------
OIP = "/inference.GRPCInferenceService/"
OIP_DATATYPES = ["FP32", "FP64", "FP16", "BF16", "INT64", "INT32", "INT16", "INT8", "UINT8", "BOOL"]
OIP_ITEMSIZE = {"FP32": 4, "FP64": 8, "FP16": 2, "BF16": 2, "INT64": 8, "INT32": 4, "INT16": 2, "INT8": 1, "UINT8": 1, "BOOL": 1}
OIP_NP = {"FP32": "<f4", "FP64": "<f8", "FP16": "<f2", "INT64": "<i8", "INT32": "<i4", "INT16": "<i2", "INT8": "i1", "UINT8": "u1",
          "BOOL": "?"}
CONTENTS_FIELDS = [f.name for f in oip.InferTensorContents.DESCRIPTOR.fields]
TYPED = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents",
         "INT16": "int_contents", "INT8": "int_contents", "UINT8": "uint_contents", "BOOL": "bool_contents"}
# ModelInfer's own parameters, Triton's (ignored), and every algorithm's by its Captum name (the params messages' fields).
PARAMETER_NAMES = sorted({"algorithm", "target", "layer", "seed", "return_convergence_delta", "priority", "timeout", "sequence_id",
                          "binary_data_output", *PARAM_NAMES})
OUTPUT_NAMES = ["output", "convergence_delta", "attributions__x", "attributions__0", "attributions__1", "attributions__00",
                "attributions__-1", "attributions__99999", "attributions__in0", "attributions__in1", "attributions__"]
DEEP_JSON = st.sampled_from(["[" * 499 + "]" * 499, "[" * 9 + "1" + "]" * 9, "[" * 600, '{"a": ' * 140 + "1" + "}" * 140, '{"a": ' * 300])
JSON_TEXT = st.one_of(  # string parameters that oip.py reads as JSON: lists, objects, numbers past int64 and double, NaN, depth
    st.sampled_from(["[", "{", "[]", "{}", "[NaN]", "[Infinity, -Infinity]", "[1e999]", f"[{2**64}]", f"[{'9' * 400}]", "[[1, 2], [3]]",
                     '{"tuple": [0, 1]}', '{"tuple": []}', '{"tuple": [true]}', "[[0], [1]]", "[0, 1, 2]", "[true]", '["a"]', "[null]",
                     "[0.5, -0.0]", "[[2, 2], [1, 1]]", "[[1]]", "[[]]"]),
    st.builds(json.dumps, st.recursive(st.one_of(st.integers(-3, 2**70), st.floats(-1e3, 1e3), st.booleans()),
                                                                  lambda inner: st.lists(inner, max_size=4), max_leaves=10)),
)


def one_in(draw, n: int) -> bool:
    """True about once in n draws; False at both ends of the range (hypothesis favours the bounds, and shrinks to the
    lower one: the ordinary path)."""
    return draw(st.integers(1, 1000 * n + 1)) % n == 0


def _oip_parameter(draw, tame: bool) -> oip.InferParameter:
    """An InferParameter of any kind; `tame`: small plausible values."""
    kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param", "double_param", "uint64_param", None]))
    p = oip.InferParameter()
    if kind == "bool_param":
        p.bool_param = draw(st.booleans())
    elif kind == "int64_param":
        p.int64_param = draw(st.integers(-1, 8) if tame else ints(-(2**63), 2**63 - 1))
    elif kind == "uint64_param":
        p.uint64_param = draw(st.integers(0, 8) if tame else ints(0, 2**64 - 1))
    elif kind == "double_param":
        p.double_param = draw(TAME_FLOATS if tame else FLOATS)
    elif kind == "string_param":
        if tame:
            p.string_param = draw(st.sampled_from(["", *WORDS, *LAYERS, "[2]", "[[2], [1]]", "[1, 0]", "[0.5]", "[[1]]"]))
        else:
            p.string_param = draw(DEEP_JSON if one_in(draw, 4) else st.one_of(JUNK_TEXT, JSON_TEXT))
    return p  # kind None: a parameter with no value set


@st.composite
def oip_parameters(draw, tame: bool = False, names: list[str] | None = None) -> dict[str, oip.InferParameter]:
    keys = draw(st.lists(st.one_of(st.sampled_from(names or PARAMETER_NAMES), JUNK_TEXT) if not tame else st.sampled_from(names or PARAMETER_NAMES),
                         max_size=4, unique=True))
    return {k: _oip_parameter(draw, tame) for k in keys}


def _fill_parameters(target, parameters: dict[str, oip.InferParameter]) -> None:
    for key, value in parameters.items():
        target[key].CopyFrom(value)


@st.composite
def oip_tensor(draw, name: str, shape: tuple[int, ...], raw: bool, junk: bool) -> tuple[oip.ModelInferRequest.InferInputTensor, bytes | None]:
    """One input: a datatype (now and then not one), a shape (now and then wrong, negative, huge), its data as raw
    bytes (now and then of a wrong length) or typed contents (now and then in another field, or both ways at once)."""
    if junk:
        datatype = draw(st.one_of(st.sampled_from(OIP_DATATYPES), JUNK_TEXT, st.sampled_from(["fp32", "FP8", "BYTES", "UINT64"])))
    else:
        datatype = draw(st.sampled_from(OIP_DATATYPES)) if one_in(draw, 5) else "FP32"
    if junk and draw(st.booleans()):
        shape = tuple(draw(st.one_of(st.lists(ints(-(2**63), 2**63 - 1), max_size=5), st.lists(st.integers(0, 2), min_size=33, max_size=36))))
    elif one_in(draw, 12):
        shape = (*shape[:-1], shape[-1] + draw(st.sampled_from([-1, 1, 2**40])))
    tensor = oip.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))
    if one_in(draw, 10):
        _fill_parameters(tensor.parameters, draw(oip_parameters()))
    size = math.prod(shape) if all(0 <= d <= 4096 for d in shape) else 6
    size = min(size, 4096)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.standard_normal(size)
    if size and one_in(draw, 6):
        values[draw(st.integers(0, size - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf, 3e38, 1e300]))
    data = None
    if raw:
        itemsize = OIP_ITEMSIZE.get(datatype, 4)
        np_type = OIP_NP.get(datatype)
        with np.errstate(all="ignore"):
            data = (values.astype(np_type) if np_type else np.zeros(size, np.float32)).tobytes() if datatype != "BF16" else b"\x80\x3f" * size
        if one_in(draw, 12):
            data = data[: draw(st.integers(0, max(len(data) - 1, 0)))] + draw(st.binary(max_size=itemsize))
    field = TYPED.get(datatype)
    if (not raw and field is not None) or one_in(draw, 20):
        field = draw(st.sampled_from(CONTENTS_FIELDS)) if field is None or one_in(draw, 20) else field
        contents = getattr(tensor.contents, field)
        with np.errstate(all="ignore"):
            if field in ("fp32_contents", "fp64_contents"):
                contents.extend(values.astype(np.float32 if field == "fp32_contents" else np.float64).tolist())
            elif field == "bool_contents":
                contents.extend((values > 0).tolist())
            elif field == "bytes_contents":
                contents.extend([b"\x00\x01"] * min(size, 4))
            else:
                lo, hi = {"int_contents": (-(2**31), 2**31 - 1), "int64_contents": (-(2**63), 2**63 - 1),
                          "uint_contents": (0, 2**32 - 1), "uint64_contents": (0, 2**64 - 1)}[field]
                contents.extend(draw(st.lists(st.integers(lo, hi) if junk else st.integers(max(lo, -3), 3), min_size=size, max_size=size)))
        if one_in(draw, 12) and size:  # a value count that does not match the shape
            del contents[-1]
    return tensor, data


@st.composite
def model_infer_requests(draw) -> oip.ModelInferRequest:
    """Mostly coherent (a served model, its inputs by position, an algorithm with its own parameters, a layer, target
    and outputs that fit, each broken now and then), else any: junk names, versions, datatypes, shapes, contents."""
    coherent = not one_in(draw, 4)
    bad_json = one_in(draw, 4)  # drawn first: hypothesis explores the first choices of a long example best
    # (not `text` when coherent: ModelInfer has no additional_forward_args, which its forward needs)
    served = st.sampled_from([m for m in SERVED if m != "text"] if coherent else SERVED)
    request = oip.ModelInferRequest(model_name=draw(served) if coherent else draw(st.one_of(served, JUNK_TEXT)))
    if one_in(draw, 20 if coherent else 5):
        request.model_version = draw(st.one_of(st.sampled_from(["1", "2", "01", "-1", "latest"]), JUNK_TEXT))
    if one_in(draw, 6):
        request.id = draw(JUNK_TEXT)
    model = request.model_name if request.model_name in INPUT_SHAPES else draw(served)
    shapes = INPUT_SHAPES[model]
    n = draw(st.integers(1, 3))
    names = ["x"] if len(shapes) == 1 else [f"in{i}" for i in range(len(shapes))]
    raw = not one_in(draw, 4)
    tensors = []
    for name, shape in zip(names, shapes):
        tensors.append(draw(oip_tensor(name, (n, *shape), raw, junk=not coherent or one_in(draw, 10))))
    algorithm = draw(st.sampled_from(sorted(ENGINE_ALGORITHMS))) if not one_in(draw, 6) else None
    if algorithm is not None:
        spec = ENGINE_ALGORITHMS[algorithm]
        if spec.uses_baselines and one_in(draw, 5):
            tensors.append(draw(oip_tensor(names[0] + "__baselines", (1, *shapes[0]), raw, junk=not coherent)))
        if spec.uses_feature_mask and one_in(draw, 5):
            for name, shape in zip(names, shapes):
                tensors.append(draw(oip_tensor(name + "__feature_mask", (1, *shape), raw, junk=not coherent)))
    if not coherent and draw(st.booleans()):  # extra tensors: unknown names, names twice, empty names
        tensors.append(draw(oip_tensor(draw(st.one_of(st.sampled_from(["", "x", "in0", "y__baselines", "x__feature_mask"]), JUNK_TEXT)),
                                       (n, 3), raw, junk=True)))
    if one_in(draw, 8):
        tensors = draw(st.permutations(tensors))
    for tensor, data in tensors:
        request.inputs.add().CopyFrom(tensor)
        if raw:
            request.raw_input_contents.append(data)
    if raw and one_in(draw, 10):  # one entry too many or too few
        if draw(st.booleans()) or not request.raw_input_contents:
            request.raw_input_contents.append(b"\x00" * 12)
        else:
            del request.raw_input_contents[-1]
    if algorithm is not None:
        request.parameters["algorithm"].string_param = algorithm if not one_in(draw, 10) else draw(JUNK_TEXT)
        field = next((f for f in PARAMS if f.name == algorithm), None)
        own = [f.name for f in field.message_type.fields] if field is not None else []
        if own and draw(st.booleans()):
            _fill_parameters(request.parameters, draw(oip_parameters(tame=coherent and not one_in(draw, 3), names=own)))
        spec = ENGINE_ALGORITHMS[algorithm]
        if spec.layer_method == (not one_in(draw, 10)):
            request.parameters["layer"].string_param = draw(st.sampled_from(MODEL_LAYERS[model] if spec.layer_method else LAYERS))
        if bad_json:  # one of its parameters (or any) in a JSON form it does not take: nested lists, deep, NaN
            key = draw(st.sampled_from(own)) if own and draw(st.booleans()) else draw(st.sampled_from(PARAM_NAMES))
            request.parameters[key].string_param = draw(DEEP_JSON if draw(st.booleans()) else JSON_TEXT)
        if algorithm == "occlusion" and not one_in(draw, 6):  # one window (and stride) shape per input
            request.parameters["sliding_window_shapes"].string_param = json.dumps([[min(d, 2) for d in shape] for shape in shapes])
            if draw(st.booleans()):
                request.parameters["strides"].string_param = json.dumps([[draw(st.integers(0, 2))] * len(shape) for shape in shapes])
        if "neuron_selector" in own and not one_in(draw, 5):
            request.parameters["neuron_selector"].string_param = draw(st.sampled_from(["[0]", "[1]", "[0, 1]", "[2, 0]", "[0, 0, 1]", "[-1]"]))
        if spec.uses_target == (not one_in(draw, 10)):
            target = request.parameters["target"]
            if model == "grid":
                target.string_param = draw(st.sampled_from(['{"tuple": [1, 2]}', "[[0, 0]]", '{"tuple": [2, 0]}']))
            elif draw(st.booleans()):
                target.int64_param = draw(st.integers(-1, 3))
            else:
                per_example = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
                target.string_param = draw(st.sampled_from(["0", "1", json.dumps(per_example), json.dumps([[t] for t in per_example]),
                                                            "-1", "[0, 5, 1]", "[1]"]))
        if one_in(draw, 5):
            request.parameters["return_convergence_delta"].bool_param = True
        if one_in(draw, 5):
            request.parameters["seed"].int64_param = draw(st.integers(0, 9))
    if not coherent or one_in(draw, 4):
        _fill_parameters(request.parameters, draw(oip_parameters()))
    for _ in range(draw(st.integers(1, 3)) if one_in(draw, 4) else 0):
        output = request.outputs.add(name=draw(st.one_of(st.sampled_from(OUTPUT_NAMES), JUNK_TEXT)))
        if one_in(draw, 6):  # Triton's class_count, or any other output parameter
            _fill_parameters(output.parameters, draw(oip_parameters(names=["classification", "binary_data", "shared_memory_region"])))
    return request


OIP_SEEDS = {
    OIP + "ServerLive": [b""],
    OIP + "ServerReady": [b""],
    OIP + "ServerMetadata": [b""],
    OIP + "ModelReady": [oip.ModelReadyRequest(name="toy").SerializeToString(), oip.ModelReadyRequest(name="conv", version="1").SerializeToString()],
    OIP + "ModelMetadata": [oip.ModelMetadataRequest(name="multi").SerializeToString(),
                            oip.ModelMetadataRequest(name="toy", version="1").SerializeToString()],
}


def _valid_model_infer_requests() -> list[bytes]:
    x = np.array([[0.2, -0.4, 0.9]], np.float32)
    prediction = oip.ModelInferRequest(model_name="toy", id="r1", raw_input_contents=[x.tobytes()])
    prediction.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    explained = oip.ModelInferRequest(model_name="multi")
    explained.inputs.add(name="a", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([0.1, 0.2, 0.3, 0.4])
    explained.inputs.add(name="b", datatype="FP64", shape=[1, 3]).contents.fp64_contents.extend([1.0, -1.0, 0.5])
    explained.inputs.add(name="a__baselines", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([0.0] * 4)
    explained.parameters["algorithm"].string_param = "integrated_gradients"
    explained.parameters["target"].string_param = "[1]"
    explained.parameters["n_steps"].int64_param = 8
    explained.parameters["return_convergence_delta"].bool_param = True
    explained.outputs.add(name="attributions__a")
    explained.outputs.add(name="convergence_delta")
    occlusion = oip.ModelInferRequest(model_name="grid", raw_input_contents=[np.ones((1, 5), np.float32).tobytes()])
    occlusion.inputs.add(name="x", datatype="FP32", shape=[1, 5])
    occlusion.parameters["algorithm"].string_param = "occlusion"
    occlusion.parameters["target"].string_param = '{"tuple": [1, 2]}'
    occlusion.parameters["sliding_window_shapes"].string_param = "[[2]]"
    occlusion.parameters["strides"].uint64_param = 1
    layered = oip.ModelInferRequest(model_name="toy", raw_input_contents=[x.tobytes()])
    layered.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    layered.parameters["algorithm"].string_param = "neuron_gradient"
    layered.parameters["layer"].string_param = "lin1"
    layered.parameters["neuron_selector"].string_param = "[1]"
    layered.parameters["priority"].double_param = 2.5
    layered.outputs.add(name="attributions__x").parameters["classification"].int64_param = 2
    return [r.SerializeToString() for r in (prediction, explained, occlusion, layered)]


OIP_SEEDS[OIP + "ModelInfer"] = _valid_model_infer_requests()


def assert_model_infer_still_serves(server) -> None:
    """After an OIP run: ModelInfer answers Captum's numbers too (and assert_still_serving: health, the engine empty)."""
    x = np.array([[0.2, -0.4, 0.9], [0.1, 0.3, -0.2]], np.float32)
    request = oip.ModelInferRequest(model_name="toy", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    request.parameters["algorithm"].string_param = "integrated_gradients"
    request.parameters["target"].int64_param = 1
    request.parameters["n_steps"].int64_param = 16
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(OIP + "ModelInfer", request_serializer=oip.ModelInferRequest.SerializeToString,
                                   response_deserializer=oip.ModelInferResponse.FromString)
        response = call(request, timeout=30)
    (got,) = [np.frombuffer(raw, "<f4").reshape(2, 3) for o, raw in zip(response.outputs, response.raw_output_contents)
              if o.name == "attributions__x"]
    want = IntegratedGradients(MODELS["toy"]()).attribute(torch.from_numpy(x), target=1, n_steps=16)
    assert_all_close((torch.from_numpy(got.copy()),), (want.detach(),))
    assert_still_serving(server)


def test_the_fuzzed_oip_rpcs_are_every_rpc_the_server_registers() -> None:
    from attrserve_service.oip import METHODS, SERVICE_NAME

    descriptor = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert {f"/{descriptor.full_name}/{m.name}" for m in descriptor.methods} == {f"/{SERVICE_NAME}/{m}" for m in METHODS} == set(OIP_SEEDS)


def fuzz_model_infer(server, requests: st.SearchStrategy, label: str, max_examples: int) -> None:
    """ModelInfer with each request `requests` draws: never INTERNAL or UNKNOWN; then the server still serves."""
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(OIP + "ModelInfer", request_serializer=oip.ModelInferRequest.SerializeToString,
                                   response_deserializer=oip.ModelInferResponse.FromString)

        @settings(FUZZ, max_examples=max_examples)
        @given(request=requests)
        @real_recursion_limit
        def fuzz(request: oip.ModelInferRequest) -> None:
            start = time.monotonic()
            try:
                call(request, timeout=DEADLINE_S)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as e:
                code, details = e.code(), e.details() or ""
            check_status(label, code, details, time.monotonic() - start, request)

        fuzz()
    report(label)
    assert_model_infer_still_serves(server)


def test_structured_model_infer_requests_never_get_internal_or_unknown(server) -> None:
    fuzz_model_infer(server, model_infer_requests(), "oip structured", FUZZ.max_examples)


@pytest.mark.parametrize("path", sorted(OIP_SEEDS))
def test_raw_bytes_on_oip_rpcs_never_get_internal_or_unknown(server, path: str) -> None:
    fuzz_unary_bytes(server, path, OIP_SEEDS[path], max(FUZZ.max_examples // (2 if path.endswith("ModelInfer") else 8), 10))
    assert_model_infer_still_serves(server)


@st.composite
def model_infer_parameters(draw) -> oip.ModelInferRequest:
    """A valid ModelInfer of `toy` (its layers, target 0, a neuron) but for 1-3 parameters of any kind: the algorithm's own
    or any algorithm's, with junk values and JSON strings of the wrong form (what model_infer_requests rarely gets this
    far with, whole requests being broken in many places at once)."""
    x = np.array([[0.2, -0.4, 0.9], [0.1, 0.3, -0.2]], np.float32)
    request = oip.ModelInferRequest(model_name="toy", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=[2, 3])
    algorithm = draw(st.sampled_from(sorted(ENGINE_ALGORITHMS)))
    spec = ENGINE_ALGORITHMS[algorithm]
    request.parameters["algorithm"].string_param = algorithm
    if spec.uses_target:
        request.parameters["target"].int64_param = 0
    if spec.layer_method:
        request.parameters["layer"].string_param = draw(st.sampled_from(MODEL_LAYERS["toy"]))
    if algorithm.startswith("neuron"):
        request.parameters["neuron_selector"].string_param = "[0]"
    if algorithm == "occlusion":
        request.parameters["sliding_window_shapes"].string_param = "[[1]]"
    field = next((f for f in PARAMS if f.name == algorithm), None)
    own = [f.name for f in field.message_type.fields] if field is not None else []
    for key in draw(st.lists(st.sampled_from(own) if own and draw(st.booleans()) else st.sampled_from(PARAMETER_NAMES), min_size=1,
                             max_size=3, unique=True)):
        if draw(st.booleans()):
            request.parameters[key].string_param = draw(st.one_of(DEEP_JSON, JSON_TEXT))
        else:
            request.parameters[key].CopyFrom(_oip_parameter(draw, tame=draw(st.booleans())))
    return request


def test_model_infer_parameters_never_get_internal_or_unknown(server) -> None:
    fuzz_model_infer(server, model_infer_parameters(), "oip parameters", max(FUZZ.max_examples // 2, 10))
