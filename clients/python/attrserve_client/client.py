"""Sync and asyncio clients for attrserve's AttributionService that speak numpy and Captum's argument conventions."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import random
import re
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve.v1 import tensor_pb2

from .tensors import as_numpy, from_tensor_proto, to_tensor_proto

_PREFIX = "ALGORITHM_"
# Inputs and attributions easily pass gRPC's 4 MiB default; the server enforces its own limit.
_DEFAULT_OPTIONS = {"grpc.max_send_message_length": -1, "grpc.max_receive_message_length": -1}
_SERVICE = "attrserve.v1.AttributionService"
# For a target that names several servers: spread calls over all of them (round_robin: kube-proxy does not
# balance HTTP/2 streams, so a client must), skip a server whose health is not SERVING (one that is draining),
# and retry a call that a server refused with UNAVAILABLE on another one.
_BALANCED_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": _SERVICE},
        "methodConfig": [
            {
                "name": [{"service": _SERVICE}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)
Target = str | Sequence[str]


def channel_target(target: Target) -> tuple[str, bool]:
    """The gRPC target for `target`, and whether it names several servers (then calls are balanced over them).

    `target` is "host:port", a resolver URI such as "dns:///attrserve-headless.ns.svc:50051" (every address the
    name resolves to), or several "ip:port" addresses (a list, or one string joined by commas)."""
    addresses = [target] if isinstance(target, str) else list(target)
    if len(addresses) == 1 and "," in addresses[0] and "://" not in addresses[0] and not addresses[0].startswith(("ipv4:", "ipv6:")):
        addresses = [a.strip() for a in addresses[0].split(",") if a.strip()]
    if len(addresses) > 1:
        ipv6 = all(a.startswith("[") for a in addresses)
        return ("ipv6:" if ipv6 else "ipv4:") + ",".join(addresses), True
    single = addresses[0]
    return single, single.startswith(("dns:", "ipv4:", "ipv6:")) and ("," in single or single.startswith("dns:"))


@dataclasses.dataclass(frozen=True)
class AlgorithmResult:
    """The answer of one more algorithm of a request (`also=`)."""

    algorithm: str
    attributions: np.ndarray | tuple[np.ndarray, ...]
    convergence_delta: np.ndarray | None


def _unwrap(tensors: tuple[np.ndarray, ...], single: bool) -> np.ndarray | tuple[np.ndarray, ...]:
    if not single:
        return tensors
    if len(tensors) != 1:
        raise ValueError(f"expected 1 attribution tensor, got {len(tensors)}")
    return tensors[0]


def _delta(message: Any) -> np.ndarray | None:
    return from_tensor_proto(message.convergence_delta) if message.HasField("convergence_delta") else None


@dataclasses.dataclass(frozen=True)
class Attribution:
    """One answer: attributions shaped like the inputs, a tuple of them when the inputs were a tuple."""

    attributions: np.ndarray | tuple[np.ndarray, ...]
    convergence_delta: np.ndarray | None
    outputs: np.ndarray | None
    model_version: str
    seed: int
    timing: dict[str, float | int]
    request_id: str
    also: tuple[AlgorithmResult, ...] = ()
    infidelity: np.ndarray | None = None  # per example, when asked for with evaluate=
    sensitivity_max: np.ndarray | None = None
    # (input index, dtype sent, dtype computed in) for each input the server cast to the model's pinned dtype,
    # e.g. (0, "float64", "float32") for numpy's default float64 sent to a float32 model.
    input_casts: tuple[tuple[int, str, str], ...] = ()

    @classmethod
    def from_response(cls, response: pb.AttributeResponse, *, single: bool = False) -> Attribution:
        """Decodes a response; `single` unwraps the one attribution of a single-input request."""
        attributions = _unwrap(tuple(from_tensor_proto(t) for t in response.attributions), single)
        return cls(
            attributions=attributions,
            convergence_delta=_delta(response),
            outputs=from_tensor_proto(response.outputs) if response.HasField("outputs") else None,
            model_version=response.model_version,
            seed=response.seed,
            timing={f.name: getattr(response.timing, f.name) for f in pb.Timing.DESCRIPTOR.fields},
            request_id=response.request_id,
            infidelity=from_tensor_proto(response.infidelity) if response.HasField("infidelity") else None,
            sensitivity_max=from_tensor_proto(response.sensitivity_max) if response.HasField("sensitivity_max") else None,
            input_casts=tuple((c.input, _dtype_name(c.sent), _dtype_name(c.used)) for c in response.input_casts),
            also=tuple(
                AlgorithmResult(
                    r.algorithm,
                    _unwrap(tuple(from_tensor_proto(t) for t in r.attributions), single and len(r.attributions) == 1),
                    _delta(r),
                )
                for r in response.also
            ),
        )


def _dtype_name(dtype: int) -> str:
    """DATA_TYPE_FLOAT64 → "float64"."""
    return tensor_pb2.DataType.Name(dtype).removeprefix("DATA_TYPE_").lower()


def algorithm_names() -> list[str]:
    """The algorithm names this client's proto knows, in snake_case."""
    return [k[len(_PREFIX) :].lower() for k in pb.Algorithm.keys() if k != "ALGORITHM_UNSPECIFIED"]


def algorithm_name(value: int) -> str:
    """The snake_case name of an `Algorithm` enum value (its number if this proto predates it)."""
    try:
        return pb.Algorithm.Name(value)[len(_PREFIX) :].lower()
    except ValueError:
        return str(value)


def _algorithm(name: str) -> pb.Algorithm | None:
    """The enum value of a built-in algorithm; None for another snake_case name (a server plugin's)."""
    key = _PREFIX + str(name).upper()
    if key != "ALGORITHM_UNSPECIFIED" and key in pb.Algorithm.keys():
        return cast("pb.Algorithm", pb.Algorithm.Value(key))  # the stubs type enum values as the enum class; Value() says int
    if key == "ALGORITHM_UNSPECIFIED" or not re.fullmatch(r"[a-z][a-z0-9_]*", str(name)):
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(algorithm_names())}, or a plugin's snake_case name")
    return None


def _plain(value: Any) -> Any:
    """Struct-ready values: tuples and arrays become lists, numpy scalars Python numbers."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def is_multi(value: Any) -> bool:
    """Whether `value` holds one entry per model input: a tuple (Captum's convention), or a list of
    arrays; a list of numbers or of lists is one array-like."""
    if isinstance(value, tuple):
        return True
    return isinstance(value, list) and len(value) > 0 and all(getattr(v, "ndim", 0) > 0 for v in value)


def _entries(value: Any, n_inputs: int | None, what: str) -> tuple[Any, ...]:
    entries = tuple(value) if is_multi(value) else (value,)
    if n_inputs is not None and len(entries) != n_inputs:
        raise ValueError(f"{what} has {len(entries)} entries for {n_inputs} inputs")
    return entries


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating))


def _baselines(baselines: Any, n_inputs: int) -> list[pb.Baseline]:
    if baselines is None:
        return []
    if _is_number(baselines):
        baselines = (baselines,) * n_inputs
    entries = _entries(baselines, n_inputs, "baselines")
    if all(b is None for b in entries):
        return []
    return [
        pb.Baseline() if b is None else pb.Baseline(scalar=float(b)) if _is_number(b) else pb.Baseline(tensor=to_tensor_proto(b))
        for b in entries
    ]


def _target_index(value: Any) -> pb.TargetIndex:
    return pb.TargetIndex(index=[_integer(value, "target")] if np.ndim(value) == 0 else [_integer(i, "target") for i in value])


def _text(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{label}: expected a string, got {_shown(value)}")
    return value


def _flag(value: Any, label: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{label}: expected a bool, got {_shown(value)}")
    return bool(value)


def _target(target: Any) -> pb.Target:
    target = as_numpy(target)
    if isinstance(target, np.ndarray) and target.size == 1 and target.dtype.kind in "iu":
        target = target.item()  # Captum reads a tensor of one element as one index for all examples
    if isinstance(target, (int, np.integer)) and not isinstance(target, (bool, np.bool_)):
        return pb.Target(index=int(target))
    if isinstance(target, tuple):
        return pb.Target(tuple=_target_index(target))
    if isinstance(target, list) or (isinstance(target, np.ndarray) and target.ndim in (1, 2) and target.dtype.kind in "iu"):
        return pb.Target(per_example=pb.TargetIndexList(indices=[_target_index(t) for t in target]))
    raise ValueError(
        f"target must be an int, a tuple of ints, a list with one per example or an integer numpy array; got {type(target).__name__}"
    )


def _shown(value: Any, limit: int = 60) -> str:
    """A value in an error message, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# protobuf scalar field types (FieldDescriptor.TYPE_*) → (kind, low, high) of the Python values they take
_INT_RANGES = {
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
}
_FLOAT_TYPES = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)


def _integer(value: Any, label: str, low: int = -(2**63), high: int = 2**63 - 1) -> int:
    """An integer from an int (or numpy int, or a float with no fraction), in [low, high]; else a ValueError naming `label`."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, float, np.floating)):
        raise TypeError(f"{label}: expected an integer, got {_shown(value)}")
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            raise ValueError(f"{label}: expected an integer, got {_shown(value)}")
        value = int(value)
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{label}: expected an integer in [{low}, {high}], got {value}")
    return value


def _number(value: Any, label: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{label}: expected a number, got {_shown(value)}")
    return float(value)


def _scalar(field: FieldDescriptor, value: Any, label: str) -> Any:
    """`value` as field's Python type, or a TypeError/ValueError that names the field."""
    if field.type in _INT_RANGES:
        return _integer(value, label, *_INT_RANGES[field.type])
    if field.type in _FLOAT_TYPES:
        return _number(value, label)
    if field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{label}: expected a bool, got {_shown(value)}")
        return bool(value)
    if field.type == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            raise TypeError(f"{label}: expected a string, got {_shown(value)}")
        return value
    return value


def _fill(message: Any, values: Mapping[str, Any], what: str, label: str, n_inputs: int = 1) -> None:
    """Sets `values` on `message` by field name; `what` names them in "unknown ..." errors, `label` prefixes the field in
    the others (e.g. "params.n_steps: expected an integer, got 'ten'"). `n_inputs`: the request's inputs, which tell
    Captum's forms of a list of IntLists apart (strides (2, 1): one int per input of two, one per dim of one)."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{label}: expected a dict of field values, got {_shown(values)}")
    fields = message.DESCRIPTOR.fields_by_name
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(str, unknown))}; valid: {', '.join(fields)}")
    for key, value in values.items():
        if value is None:  # None keeps the server's default, like leaving the key out
            continue
        field, name = fields[key], f"{label}.{key}"
        if field.is_repeated and field.message_type is not None:
            # IntList per input, e.g. sliding_window_shapes: (3, 4, 4) for one input, ((3, 4, 4), (2,)) for two. Captum's
            # strides also take an int (one input's every dim), and per input an int (its every dim): 2, (2, 1), (2, (1, 2))
            ints = key == "strides"
            if ints and _is_number(value):
                value = (value,)
            if _is_number(value) or not isinstance(value, (list, tuple, np.ndarray)):
                raise TypeError(f"{name}: expected a list of integers per input, got {_shown(value)}")
            one_input = all(_is_number(v) for v in value) and not (ints and n_inputs > 1)
            lists = [value] if one_input else value
            items = []
            for i, item in enumerate(lists):
                if ints and _is_number(item):
                    item = (item,)  # an IntList of one value: the server's (and Captum's) int stride
                if not isinstance(item, (list, tuple, np.ndarray)):
                    raise TypeError(f"{name}[{i}]: expected a list of integers, got {_shown(item)}")
                items.append(pb.IntList(values=[_integer(v, f"{name}[{i}]") for v in item]))
            getattr(message, key).extend(items)
        elif field.is_repeated:  # stdevs: one value for all inputs or one per input
            flat = [value] if _is_number(value) else np.ravel(np.asarray(value, dtype=object)).tolist()
            getattr(message, key).extend(_scalar(field, v, name) for v in flat)
        else:
            setattr(message, key, _scalar(field, value, name))


def _struct(message: Any, values: Mapping[str, Any], label: str) -> None:
    """Fills a google.protobuf.Struct (a plugin's custom_params, an also entry's params), naming the field on failure."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{label}: expected a dict of parameters, got {_shown(values)}")
    for key, value in values.items():
        if value is None:
            continue
        if not isinstance(key, str):
            raise TypeError(f"{label}: parameter names must be strings, got {_shown(key)}")
        try:
            message.update({key: _plain(value)})
        except (TypeError, ValueError) as e:
            raise TypeError(f"{label}.{key}: {_shown(value)} cannot be sent as JSON-like parameters: {e}") from None


def build_request(
    model: str,
    algorithm: str,
    inputs: Any,
    *,
    baselines: Any = None,
    target: Any = None,
    additional_forward_args: Any = None,
    layer: str | None = None,
    params: Mapping[str, Any] | None = None,
    noise_tunnel: Mapping[str, Any] | None = None,
    feature_mask: Any = None,
    seed: int | None = None,
    return_convergence_delta: bool = False,
    return_outputs: bool = False,
    model_version: str = "",
    request_id: str = "",
    also: Iterable[Mapping[str, Any]] | None = None,
    evaluate: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> pb.AttributeRequest:
    """Builds an `AttributeRequest` from Captum-style arguments (numpy arrays or nested lists)."""
    algorithm_value = _algorithm(algorithm)
    custom = algorithm_value is None
    name = algorithm if algorithm_value is None else algorithm_name(algorithm_value)  # built-ins: also the params oneof field
    inputs = _entries(inputs, None, "inputs")
    request = pb.AttributeRequest(
        request_id=_text(request_id, "request_id"),
        model=_text(model, "model"),
        model_version=_text(model_version, "model_version"),
        algorithm=algorithm_value or pb.ALGORITHM_UNSPECIFIED,
        custom_algorithm=name if custom else "",
        inputs=[to_tensor_proto(x) for x in inputs],
        baselines=_baselines(baselines, len(inputs)),
        layer=_text(layer or "", "layer"),
        return_convergence_delta=_flag(return_convergence_delta, "return_convergence_delta"),
        return_outputs=_flag(return_outputs, "return_outputs"),
    )
    if target is not None:
        request.target.CopyFrom(_target(target))
    if additional_forward_args is not None:
        request.additional_forward_args.extend(
            to_tensor_proto(a) for a in _entries(additional_forward_args, None, "additional_forward_args")
        )
    if feature_mask is not None:
        request.feature_masks.extend(to_tensor_proto(m) for m in _entries(feature_mask, len(inputs), "feature_mask"))
    if params and custom:
        _struct(request.custom_params, params, "params")
    elif params:
        oneof = {f.name for f in pb.AttributeRequest.DESCRIPTOR.oneofs_by_name["params"].fields}
        if name not in oneof:
            raise ValueError(f"algorithm {name!r} takes no params")
        getattr(request, name).SetInParent()
        _fill(getattr(request, name), params, f"{name} params", "params", len(inputs))
    if noise_tunnel is not None:
        request.noise_tunnel.SetInParent()  # an empty dict still asks for the default SmoothGrad
        _fill(request.noise_tunnel, noise_tunnel, "noise_tunnel fields", "noise_tunnel")
    if seed is not None:
        request.seed = _integer(seed, "seed", 0, 2**64 - 1)
    for i, spec in enumerate(also or ()):
        request.also.append(_algorithm_spec(spec, f"also[{i}]"))
    for metric, fields in (evaluate or {}).items():  # {"infidelity": {...}, "sensitivity_max": {...}}
        if metric not in pb.Evaluate.DESCRIPTOR.fields_by_name:
            raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(pb.Evaluate.DESCRIPTOR.fields_by_name)}")
        getattr(request.evaluate, metric).SetInParent()
        _fill(getattr(request.evaluate, metric), fields or {}, f"{metric} fields", f"evaluate.{metric}")
    return request


_SPEC_KEYS = {"algorithm", "params", "noise_tunnel", "layer", "return_convergence_delta"}


def _algorithm_spec(spec: Mapping[str, Any], label: str = "also[0]") -> pb.AlgorithmSpec:
    """One `also=` entry: {"algorithm": name, "params": {...}, "noise_tunnel": {...}, "layer": ..., "return_convergence_delta": ...}."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"{label}: expected a dict with the algorithm and its params, got {_shown(spec)}")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown or "algorithm" not in spec:
        raise ValueError(f"also entries take {', '.join(sorted(_SPEC_KEYS))} (algorithm required); got {', '.join(sorted(spec))}")
    value = _algorithm(spec["algorithm"])
    message = pb.AlgorithmSpec(
        algorithm=value or pb.ALGORITHM_UNSPECIFIED,
        custom_algorithm="" if value is not None else spec["algorithm"],
        layer=_text(spec.get("layer") or "", f"{label}.layer"),
        return_convergence_delta=bool(spec.get("return_convergence_delta", False)),
    )
    if spec.get("params"):
        _struct(message.params, spec["params"], f"{label}.params")
    if spec.get("noise_tunnel") is not None:
        message.noise_tunnel.SetInParent()
        _fill(message.noise_tunnel, spec["noise_tunnel"], "noise_tunnel fields", f"{label}.noise_tunnel")
    return message


def _stream_request(request: pb.AttributeRequest | pb.AttributeStreamRequest) -> pb.AttributeStreamRequest:
    if isinstance(request, pb.AttributeStreamRequest):
        return request
    if isinstance(request, pb.AttributeRequest):
        return pb.AttributeStreamRequest(request=request)
    raise TypeError(f"expected an AttributeRequest, got {type(request).__name__}")


Pem = bytes | str | os.PathLike[str]  # PEM bytes (or text), or the path of a PEM file


def _pem(value: Pem, what: str) -> bytes:
    """PEM bytes as given, PEM text encoded, or a file's contents."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {value}: {e.strerror or e}") from None


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerHeader(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a plaintext channel (gRPC sends call credentials
    only over secure channels)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), self.header]
        compression = getattr(details, "compression", None)
        return _CallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, compression)

    def intercept_unary_unary(self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: grpc.ClientCallDetails, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: grpc.ClientCallDetails, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def _aio_bearer_header(token: str) -> list[grpc.aio.ClientInterceptor]:
    """_BearerHeader for grpc.aio channels: one interceptor per call kind (an aio channel files each under one kind)."""
    header = ("authorization", f"Bearer {token}")

    def details(d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(d.metadata or ()), header)
        return grpc.aio.ClientCallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready)

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
            return await continuation(details(client_call_details), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
            return await continuation(details(client_call_details), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
            return await continuation(details(client_call_details), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
            return await continuation(details(client_call_details), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]


# --- deadlines and retries ------------------------------------------------------------------------

DEFAULT_TIMEOUT = 30.0  # seconds: the deadline of a unary call (all its attempts) unless the client or the call sets another
# Trailing metadata with the milliseconds after which a refused call may be retried (gRPC's retry design A6); the
# server sets it on RESOURCE_EXHAUSTED from admission control and on UNAVAILABLE from a restarting engine, and sets -1
# (A6: a negative or malformed hint means "do not retry") on a RESOURCE_EXHAUSTED that the request meets whenever it
# is sent: over the server's limits per request (--max-rows-per-request, --max-request-work-bytes).
RETRY_PUSHBACK = "grpc-retry-pushback-ms"
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
# A message over a size limit, refused by gRPC itself (RESOURCE_EXHAUSTED, no trailer: attrserve's code never sees it):
# the server's (--max-request-bytes; "SERVER: Received message larger than max (240027 vs. 100000)"), or this channel's
# own grpc.max_send_message_length ("CLIENT: Sent ...") or grpc.max_receive_message_length (an answer too large:
# "Stream removed (CLIENT: Received ...)"). The same message is as large every time it is sent, so it is not retried.
# Matched as the whole of gRPC core's text (message_size_filter: "%s: %s message larger than max (%u vs. %d)", either
# side, either direction; as is or wrapped in "Stream removed (...)") and nothing looser: any other RESOURCE_EXHAUSTED
# without a hint, such as a server's bound on concurrent calls ("Concurrent RPC limit exceeded!"), is the server's load
# and still retried.
_SIZE_REFUSAL = r"(?:CLIENT|SERVER): (?:Sent|Received) message larger than max \(\d+ vs\. -?\d+\)"
MESSAGE_TOO_LARGE = re.compile(rf"{_SIZE_REFUSAL}|Stream removed \({_SIZE_REFUSAL}\)")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a client retries a call the server refused with UNAVAILABLE or RESOURCE_EXHAUSTED.

    Only calls that give the same answer when repeated are retried: ListModels, GetModel, RepositoryIndex, and an
    Attribute request that is `replayable` (it carries a seed, or nothing in it draws random numbers). LoadModel,
    UnloadModel and AttributeStream are never retried. Nor is a refusal that the same request meets every time: one
    with a negative (or malformed) pushback hint, which the server sends for a request over its limits per request,
    and a message over a size limit, which gRPC itself refuses (MESSAGE_TOO_LARGE). Attempt n (from 0) waits the
    server's pushback hint when it sent one (`grpc-retry-pushback-ms`), else a random time in
    [0, min(max_backoff, initial_backoff * multiplier**n)] ("full jitter"). No retry starts after `max_attempts`
    attempts, or when its wait would end past `max_total` seconds from the first attempt or past the call's deadline;
    the last error is raised then."""

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    max_total: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: expected at least 1, got {self.max_attempts}")
        if min(self.initial_backoff, self.max_backoff, self.max_total) < 0 or self.multiplier < 1:
            raise ValueError("backoffs and max_total must be >= 0, multiplier >= 1")

    def backoff(self, attempt: int) -> float:
        """The jittered wait before retry `attempt` + 1 when the server sent no hint."""
        return random.uniform(0.0, min(self.max_backoff, self.initial_backoff * self.multiplier**attempt))


NO_RETRY = RetryPolicy(max_attempts=1)
# What a client built without `retry=` uses (read when the client is built).
DEFAULT_RETRY = RetryPolicy()
# Built-in algorithms whose result depends on random draws (and so on the seed); a plugin's may too.
RANDOM_ALGORITHMS = frozenset(
    {
        "gradient_shap",
        "layer_gradient_shap",
        "neuron_gradient_shap",
        "feature_permutation",
        "shapley_value_sampling",
        "lime",
        "kernel_shap",
    }
)


def replayable(request: pb.AttributeRequest) -> bool:
    """Whether sending `request` again gives the same answer, so that a refused attempt may be retried: it carries a
    seed, or it draws no random numbers (built-in algorithms outside RANDOM_ALGORITHMS, for the request and each `also`
    entry, with no noise tunnel and no `evaluate` metrics, which perturb at random). A request without a seed gets a
    random one from the server, so a retry of a random one could answer differently: it is not retried."""
    if request.HasField("seed"):
        return True
    if request.HasField("noise_tunnel") or request.HasField("evaluate"):
        return False
    specs = [(request.algorithm, request.custom_algorithm, False)]
    specs += [(a.algorithm, a.custom_algorithm, a.HasField("noise_tunnel")) for a in request.also]
    return all(not custom and not noise and algorithm_name(value) not in RANDOM_ALGORITHMS for value, custom, noise in specs)


def _retry_wait(error: BaseException, attempt: int, policy: RetryPolicy, elapsed: float, timeout: float | None) -> float | None:
    """Seconds to wait before retrying after `error` on attempt `attempt` (from 0), `elapsed` seconds after the first
    began; None: do not retry."""
    code = getattr(error, "code", None)
    if not callable(code) or code() not in RETRYABLE or attempt + 1 >= policy.max_attempts:
        return None
    details = error.details() if callable(getattr(error, "details", None)) else None  # type: ignore[attr-defined]
    if code() == grpc.StatusCode.RESOURCE_EXHAUSTED and isinstance(details, str) and MESSAGE_TOO_LARGE.fullmatch(details):
        return None
    wait = policy.backoff(attempt)
    trailing = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None  # type: ignore[attr-defined]
    hints = [value for key, value in trailing or () if key == RETRY_PUSHBACK]
    if hints:
        try:
            wait = int(hints[0]) / 1e3
        except ValueError:
            return None  # A6: a malformed hint means do not retry
        if wait < 0:
            return None
    end = elapsed + wait
    if end > policy.max_total or (timeout is not None and end >= timeout):
        return None
    return wait


T = TypeVar("T")


# gRPC holds a deadline as nanoseconds since the epoch in an int64 (to the year 2262): a call whose timeout reaches past
# it fails at once with DEADLINE_EXCEEDED, as one with a timeout of 0, a negative one or NaN does. A timeout past a
# century is no deadline.
_NO_DEADLINE = 100 * 365 * 86400.0


def _effective(timeout: float | None, default: float | None) -> float | None:
    """A call's deadline in seconds: its own, else the client's; math.inf (or anything past a century) means none.
    Anything but a positive number is a ValueError naming the timeout, not a call that gRPC fails at once."""
    chosen = default if timeout is None else timeout
    if chosen is None:
        return None
    if isinstance(chosen, (bool, np.bool_)) or not isinstance(chosen, (int, float, np.integer, np.floating)) or not chosen > 0:
        raise ValueError(f"timeout: expected a positive number of seconds (math.inf: none), got {_shown(chosen)}")
    return None if chosen >= _NO_DEADLINE else float(chosen)


def _with_retries(call: Callable[[float | None], T], timeout: float | None, policy: RetryPolicy) -> T:
    """`call(seconds left)` until it answers or `policy` gives up (the last error is raised)."""
    start = time.monotonic()
    attempt = 0
    while True:
        elapsed = time.monotonic() - start
        try:
            return call(None if timeout is None else max(timeout - elapsed, 0.0))
        except grpc.RpcError as e:
            wait = _retry_wait(e, attempt, policy, time.monotonic() - start, timeout)
            if wait is None:
                raise
        time.sleep(wait)
        attempt += 1


async def _with_retries_async(call: Callable[[float | None], Awaitable[T]], timeout: float | None, policy: RetryPolicy) -> T:
    """_with_retries for grpc.aio calls."""
    start = time.monotonic()
    attempt = 0
    while True:
        elapsed = time.monotonic() - start
        try:
            return await call(None if timeout is None else max(timeout - elapsed, 0.0))
        except grpc.RpcError as e:  # grpc.aio.AioRpcError is one
            wait = _retry_wait(e, attempt, policy, time.monotonic() - start, timeout)
            if wait is None:
                raise
        await asyncio.sleep(wait)
        attempt += 1


class RequestFailed(Exception):
    """A request of `attribute_many` that the server answered with an error (the other requests go on): yielded in its
    place, so that `raise` works on it. `code` is a grpc.StatusCode; `retry_after_ms` the server's hint (0: none;
    NO_RETRY_MS, the field's largest value: `permanent`, the request passes a limit per request and is refused whenever
    it is sent, so do not send it again as it is)."""

    NO_RETRY_MS = 2**32 - 1

    def __init__(self, request_id: str, code: grpc.StatusCode, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(f"{request_id}: {code.name}: {message}")
        self.request_id, self.code, self.message, self.retry_after_ms = request_id, code, message, retry_after_ms

    @property
    def permanent(self) -> bool:
        """Refused whenever it is sent (a limit per request): retrying it as it is cannot succeed."""
        return self.retry_after_ms == self.NO_RETRY_MS


_STATUS_OF = {c.value[0]: c for c in grpc.StatusCode}


def _many_request(item: pb.AttributeRequest | Mapping[str, Any], position: int) -> tuple[pb.AttributeRequest, bool]:
    """One `attribute_many` item as a request with a request_id, and whether its answer is unwrapped to one array."""
    if isinstance(item, Mapping):
        kwargs = dict(item)
        try:
            model, algorithm, inputs = kwargs.pop("model"), kwargs.pop("algorithm"), kwargs.pop("inputs")
        except KeyError as e:
            raise ValueError(f"requests[{position}]: needs model, algorithm and inputs; missing {e.args[0]}") from None
        request, single = build_request(model, algorithm, inputs, **kwargs), not is_multi(inputs)
    elif isinstance(item, pb.AttributeRequest):
        request, single = item, len(item.inputs) == 1
    else:
        raise TypeError(f"requests[{position}]: expected an AttributeRequest or a dict of attribute() arguments, got {_shown(item)}")
    if not request.request_id:
        named = pb.AttributeRequest()
        named.CopyFrom(request)
        named.request_id = str(position)
        request = named
    return request, single


def _many_result(response: pb.AttributeStreamResponse, single: bool) -> Attribution | RequestFailed:
    if response.WhichOneof("result") == "error":
        e = response.error
        return RequestFailed(response.request_id, _STATUS_OF.get(e.code, grpc.StatusCode.UNKNOWN), e.message, e.retry_after_ms)
    return Attribution.from_response(response.response, single=single)


class _Pipeline:
    """attribute_many's bookkeeping, the same for the sync and the asyncio client: which requests are in flight, and
    which decoded answers may be yielded now (in the order of the requests, or as they arrive). No I/O; the caller
    frees one slot of its in-flight bound per answer `arrived` returns. Thread-safe (the sync client sends from
    gRPC's thread)."""

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.sent: dict[str, tuple[int, bool]] = {}  # request_id -> (position, single input)
        self.held: dict[int, Attribution | RequestFailed] = {}
        self.next_position = 0
        self.lock = threading.Lock()

    def sending(self, request: pb.AttributeRequest, single: bool, position: int) -> pb.AttributeStreamRequest:
        """`request` (item `position`, built by _many_request) recorded as in flight, as the stream sends it."""
        with self.lock:
            if request.request_id in self.sent:
                raise ValueError(f"requests[{position}]: request_id {request.request_id!r} is already in flight")
            self.sent[request.request_id] = (position, single)
        return pb.AttributeStreamRequest(request=request)

    def arrived(self, response: pb.AttributeStreamResponse) -> list[Attribution | RequestFailed]:
        """The answers to yield now that `response` came (none while an earlier request's answer is missing)."""
        with self.lock:
            position, single = self.sent.pop(response.request_id)
        result = _many_result(response, single)
        if not self.ordered:
            return [result]
        self.held[position] = result
        ready = []
        while self.next_position in self.held:
            ready.append(self.held.pop(self.next_position))
            self.next_position += 1
        return ready


class _ClientBase:
    build_request = staticmethod(build_request)

    def __init__(
        self,
        target: Target,
        credentials: grpc.ChannelCredentials | None,
        options: Iterable[tuple[str, Any]] | None,
        grpc_module: Any,
        *,
        tls: bool = False,
        root_certificates: Pem | None = None,
        client_cert: tuple[Pem, Pem] | None = None,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        """`timeout`: the default deadline of unary calls in seconds (None: none; a call's `timeout=` wins, and
        `timeout=math.inf` there means none); streams have none unless the call sets one. `retry`: the RetryPolicy of
        idempotent calls (default DEFAULT_RETRY, RetryPolicy(); NO_RETRY: never).

        `credentials`: ready-made channel credentials; or `tls=True` (the system's root certificates),
        `root_certificates` (PEM bytes or a file: the CA that signed the server's certificate; implies TLS) and
        `client_cert=(certificate, key)` (PEM bytes or files, for a server that requires client certificates; implies
        TLS). `token`: sent as `authorization: Bearer <token>` on every call (with TLS as call credentials; on a
        plaintext channel, where gRPC sends no call credentials, by an interceptor)."""
        self._timeout = _effective(None, timeout)
        self._retry = DEFAULT_RETRY if retry is None else retry
        resolved, balanced = channel_target(target)
        defaults = {**_DEFAULT_OPTIONS, **({"grpc.service_config": _BALANCED_SERVICE_CONFIG} if balanced else {})}
        merged = list({**defaults, **dict(options or ())}.items())
        if credentials is not None and (tls or root_certificates is not None or client_cert is not None):
            raise ValueError("give either credentials or tls/root_certificates/client_cert, not both")
        if credentials is None and (tls or root_certificates is not None or client_cert is not None):
            key, chain = (None, None) if client_cert is None else (_pem(client_cert[1], "client key"), _pem(client_cert[0], "client_cert"))
            roots = None if root_certificates is None else _pem(root_certificates, "root_certificates")
            credentials = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
        if token is not None:
            token = token.strip()
            if not token or any(c.isspace() or not c.isprintable() or not c.isascii() for c in token):
                raise ValueError("token must be one word of printable ASCII characters")
        aio = grpc_module is grpc.aio
        if credentials is None:
            if token is None:
                self._channel = grpc_module.insecure_channel(resolved, options=merged)
            elif aio:
                self._channel = grpc.aio.insecure_channel(resolved, options=merged, interceptors=_aio_bearer_header(token))
            else:
                self._channel = grpc.intercept_channel(grpc.insecure_channel(resolved, options=merged), _BearerHeader(token))
        else:
            if token is not None:
                credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
            self._channel = grpc_module.secure_channel(resolved, credentials, options=merged)
        self._stub = pb_grpc.AttributionServiceStub(self._channel)
        self._repository = pb_grpc.ModelRepositoryServiceStub(self._channel)


class AttributionClient(_ClientBase):
    """Blocking client; gRPC failures propagate as `grpc.RpcError`.

    `target`: "host:port"; or several servers — a list of "ip:port", one comma-joined string, or
    "dns:///name:port" (e.g. a Kubernetes headless Service) — over which calls are balanced round-robin,
    skipping servers that are not SERVING and retrying on another one a call refused with UNAVAILABLE."""

    def __init__(
        self,
        target: Target,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, Any]] | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        client_cert: tuple[Pem, Pem] | None = None,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Deadlines, retries, TLS, client certificates and tokens: see `_ClientBase.__init__`."""
        super().__init__(
            target,
            credentials,
            options,
            grpc,
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            token=token,
            timeout=timeout,
            retry=retry,
        )

    def _unary(self, method: Any, request: Any, timeout: float | None, idempotent: bool) -> Any:
        """One unary call under the client's deadline, retried when `idempotent` (RetryPolicy)."""

        def attempt(left: float | None) -> Any:
            return method(request, timeout=left)

        return _with_retries(attempt, _effective(timeout, self._timeout), self._retry if idempotent else NO_RETRY)

    def attribute(self, model: str, algorithm: str, inputs: Any, *, timeout: float | None = None, **kwargs: Any) -> Attribution:
        """Attributes `inputs` (numpy arrays, torch tensors or nested lists); keyword arguments are `build_request`'s.
        Retried on UNAVAILABLE/RESOURCE_EXHAUSTED only when the request is `replayable`."""
        request = build_request(model, algorithm, inputs, **kwargs)
        response = self._unary(self._stub.Attribute, request, timeout, replayable(request))
        return Attribution.from_response(response, single=not is_multi(inputs))

    def attribute_stream(
        self, requests: Iterable[pb.AttributeRequest], *, timeout: float | None = None
    ) -> Iterator[pb.AttributeStreamResponse]:
        """Sends requests over one stream; responses come as they finish, matched by request_id."""
        return self._stub.AttributeStream((_stream_request(r) for r in requests), timeout=_effective(timeout, None))

    def attribute_many(
        self,
        requests: Iterable[pb.AttributeRequest | Mapping[str, Any]],
        *,
        max_in_flight: int = 32,
        ordered: bool = True,
        timeout: float | None = None,
    ) -> Iterator[Attribution | RequestFailed]:
        """Pipelines many requests over one AttributeStream and yields each decoded answer.

        `requests`: AttributeRequests (`build_request(...)`; one with a single input gets a single array back) or dicts
        of `attribute()`'s arguments ({"model": ..., "algorithm": ..., "inputs": ..., "target": 0, ...}); it is read
        lazily, as room opens. At most `max_in_flight` requests are sent and not yet yielded (keep it at or under the
        server's --max-requests-per-stream, 256 by default). `ordered=True` yields in the order of `requests` (a slow
        request holds back later answers, which stay within the window); `ordered=False` as they complete. A request
        without a request_id gets its position ("0", "1", ...), which comes back in `Attribution.request_id`.
        A request the server refuses yields a RequestFailed in its place and the others go on; a failure of the stream
        itself raises grpc.RpcError (the stream is not retried). `timeout`: a deadline for the whole stream (default:
        none). Leaving the loop early cancels the stream."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight: expected at least 1, got {max_in_flight}")
        room = threading.Semaphore(max_in_flight)
        closed = threading.Event()
        pipeline = _Pipeline(ordered)
        failure: list[BaseException] = []

        def outgoing() -> Iterator[pb.AttributeStreamRequest]:
            try:
                for i, item in enumerate(requests):
                    request, single = _many_request(item, i)
                    while not room.acquire(timeout=0.05):
                        if closed.is_set():
                            return
                    yield pipeline.sending(request, single, i)
            except Exception as e:  # raised to the caller (gRPC would only log it)
                failure.append(e)

        call = self._stub.AttributeStream(outgoing(), timeout=_effective(timeout, None))
        try:
            for response in call:
                for result in pipeline.arrived(response):
                    room.release()
                    yield result
                if failure and ordered:
                    break
            if failure:
                raise failure[0]
        finally:
            closed.set()
            call.cancel()  # a consumer that stops early must not leave the RPC open

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout, True).models)

    def get_model(self, model: str, version: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        request = pb.GetModelRequest(model=model, model_version=version)
        return self._unary(self._stub.GetModel, request, timeout, True).model

    def repository_index(self, *, ready_only: bool = False, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Every model version in the server's repository with its state (`ready_only`: those serving now)."""
        request = pb.RepositoryIndexRequest(ready_only=ready_only)
        return list(self._unary(self._repository.RepositoryIndex, request, timeout, True).models)

    def load_model(self, model: str, version: str = "", *, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Loads (or reloads) a model's versions, or the one named; the model's versions after the load.
        Needs a server run with `--model-control explicit`."""
        request = pb.LoadModelRequest(model=model, version=version)
        return list(self._unary(self._repository.LoadModel, request, timeout, False).models)

    def unload_model(self, model: str, version: str = "", *, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Unloads a model's versions, or the one named, once their accepted requests finish; the model's
        versions after the unload. Needs a server run with `--model-control explicit`."""
        request = pb.UnloadModelRequest(model=model, version=version)
        return list(self._unary(self._repository.UnloadModel, request, timeout, False).models)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AttributionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAttributionClient(_ClientBase):
    """grpc.aio client; gRPC failures propagate as `grpc.aio.AioRpcError`. `target` as AttributionClient's."""

    def __init__(
        self,
        target: Target,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, Any]] | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        client_cert: tuple[Pem, Pem] | None = None,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
    ) -> None:
        """Deadlines, retries, TLS, client certificates and tokens: see `_ClientBase.__init__`."""
        super().__init__(
            target,
            credentials,
            options,
            grpc.aio,
            tls=tls,
            root_certificates=root_certificates,
            client_cert=client_cert,
            token=token,
            timeout=timeout,
            retry=retry,
        )

    async def _unary(self, method: Any, request: Any, timeout: float | None, idempotent: bool) -> Any:
        """One unary call under the client's deadline, retried when `idempotent` (RetryPolicy)."""

        async def attempt(left: float | None) -> Any:
            return await method(request, timeout=left)

        return await _with_retries_async(attempt, _effective(timeout, self._timeout), self._retry if idempotent else NO_RETRY)

    async def attribute(self, model: str, algorithm: str, inputs: Any, *, timeout: float | None = None, **kwargs: Any) -> Attribution:
        """Attributes `inputs`; keyword arguments are `build_request`'s."""
        request = build_request(model, algorithm, inputs, **kwargs)
        response = await self._unary(self._stub.Attribute, request, timeout, replayable(request))
        return Attribution.from_response(response, single=not is_multi(inputs))

    async def attribute_stream(
        self,
        requests: AsyncIterable[pb.AttributeRequest] | Iterable[pb.AttributeRequest],
        *,
        timeout: float | None = None,
    ) -> AsyncIterator[pb.AttributeStreamResponse]:
        """Sends requests over one stream; responses come as they finish, matched by request_id."""

        async def outgoing() -> AsyncIterator[pb.AttributeStreamRequest]:
            if isinstance(requests, AsyncIterable):
                async for r in requests:
                    yield _stream_request(r)
            else:
                for r in requests:
                    yield _stream_request(r)

        call = self._stub.AttributeStream(outgoing(), timeout=_effective(timeout, None))
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()  # a consumer that stops early must not leave the RPC open

    async def attribute_many(
        self,
        requests: AsyncIterable[pb.AttributeRequest | Mapping[str, Any]] | Iterable[pb.AttributeRequest | Mapping[str, Any]],
        *,
        max_in_flight: int = 32,
        ordered: bool = True,
        timeout: float | None = None,
    ) -> AsyncIterator[Attribution | RequestFailed]:
        """AttributionClient.attribute_many on asyncio: pipelines many requests over one AttributeStream, at most
        `max_in_flight` sent and not yet yielded, and yields each decoded answer (in the order of `requests`, or as
        they complete with `ordered=False`); a refused request yields a RequestFailed in its place. `requests` may
        be an async iterable; it is read lazily, as room opens."""
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight: expected at least 1, got {max_in_flight}")
        room = asyncio.Semaphore(max_in_flight)
        pipeline = _Pipeline(ordered)
        failure: list[BaseException] = []

        async def items() -> AsyncIterator[pb.AttributeRequest | Mapping[str, Any]]:
            if isinstance(requests, AsyncIterable):
                async for item in requests:
                    yield item
            else:
                for item in requests:
                    yield item

        async def outgoing() -> AsyncIterator[pb.AttributeStreamRequest]:
            i = 0
            try:
                async for item in items():
                    request, single = _many_request(item, i)
                    await room.acquire()
                    yield pipeline.sending(request, single, i)
                    i += 1
            except Exception as e:  # raised to the caller (gRPC would only log it)
                failure.append(e)

        call = self._stub.AttributeStream(outgoing(), timeout=_effective(timeout, None))
        try:
            async for response in call:
                for result in pipeline.arrived(response):
                    room.release()
                    yield result
                if failure and ordered:
                    break
            if failure:
                raise failure[0]
        finally:
            call.cancel()  # a consumer that stops early must not leave the RPC open

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list((await self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout, True)).models)

    async def get_model(self, model: str, version: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        request = pb.GetModelRequest(model=model, model_version=version)
        return (await self._unary(self._stub.GetModel, request, timeout, True)).model

    async def repository_index(self, *, ready_only: bool = False, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Every model version in the server's repository with its state (`ready_only`: those serving now)."""
        request = pb.RepositoryIndexRequest(ready_only=ready_only)
        return list((await self._unary(self._repository.RepositoryIndex, request, timeout, True)).models)

    async def load_model(self, model: str, version: str = "", *, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Loads (or reloads) a model's versions, or the one named; needs `--model-control explicit`."""
        request = pb.LoadModelRequest(model=model, version=version)
        return list((await self._unary(self._repository.LoadModel, request, timeout, False)).models)

    async def unload_model(self, model: str, version: str = "", *, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Unloads a model's versions, or the one named; needs `--model-control explicit`."""
        request = pb.UnloadModelRequest(model=model, version=version)
        return list((await self._unary(self._repository.UnloadModel, request, timeout, False)).models)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncAttributionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
