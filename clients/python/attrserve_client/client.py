"""Sync and asyncio clients for attrserve's AttributionService that speak numpy and Captum's argument conventions."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

import grpc
import numpy as np

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc

from .tensors import from_tensor_proto, to_tensor_proto

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
            also=tuple(
                AlgorithmResult(
                    r.algorithm,
                    _unwrap(tuple(from_tensor_proto(t) for t in r.attributions), single and len(r.attributions) == 1),
                    _delta(r),
                )
                for r in response.also
            ),
        )


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
    return pb.TargetIndex(index=[int(value)] if np.ndim(value) == 0 else [int(i) for i in value])


def _target(target: Any) -> pb.Target:
    if isinstance(target, (int, np.integer)) and not isinstance(target, (bool, np.bool_)):
        return pb.Target(index=int(target))
    if isinstance(target, tuple):
        return pb.Target(tuple=_target_index(target))
    if isinstance(target, list) or (isinstance(target, np.ndarray) and target.ndim in (1, 2) and target.dtype.kind in "iu"):
        return pb.Target(per_example=pb.TargetIndexList(indices=[_target_index(t) for t in target]))
    raise ValueError(
        f"target must be an int, a tuple of ints, a list with one per example or an integer numpy array; got {type(target).__name__}"
    )


def _fill(message: Any, values: Mapping[str, Any], what: str) -> None:
    fields = message.DESCRIPTOR.fields_by_name
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; valid: {', '.join(fields)}")
    for key, value in values.items():
        if value is None:  # None keeps the server's default, like leaving the key out
            continue
        if fields[key].is_repeated and fields[key].message_type is not None:
            # IntList per input, e.g. sliding_window_shapes: (3, 4, 4) for one input, ((3, 4, 4), (2,)) for two
            lists = [value] if all(_is_number(v) for v in value) else value
            getattr(message, key).extend(pb.IntList(values=[int(v) for v in item]) for item in lists)
        elif fields[key].is_repeated:  # stdevs: one value for all inputs or one per input
            getattr(message, key).extend(np.ravel(value).tolist())
        else:
            setattr(message, key, value)


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
        request_id=request_id,
        model=model,
        model_version=model_version,
        algorithm=algorithm_value or pb.ALGORITHM_UNSPECIFIED,
        custom_algorithm=name if custom else "",
        inputs=[to_tensor_proto(x) for x in inputs],
        baselines=_baselines(baselines, len(inputs)),
        layer=layer or "",
        return_convergence_delta=return_convergence_delta,
        return_outputs=return_outputs,
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
        request.custom_params.update({k: _plain(v) for k, v in params.items() if v is not None})
    elif params:
        oneof = {f.name for f in pb.AttributeRequest.DESCRIPTOR.oneofs_by_name["params"].fields}
        if name not in oneof:
            raise ValueError(f"algorithm {name!r} takes no params")
        getattr(request, name).SetInParent()
        _fill(getattr(request, name), params, f"{name} params")
    if noise_tunnel is not None:
        request.noise_tunnel.SetInParent()  # an empty dict still asks for the default SmoothGrad
        _fill(request.noise_tunnel, noise_tunnel, "noise_tunnel fields")
    if seed is not None:
        request.seed = seed
    for spec in also or ():
        request.also.append(_algorithm_spec(spec))
    for metric, fields in (evaluate or {}).items():  # {"infidelity": {...}, "sensitivity_max": {...}}
        if metric not in pb.Evaluate.DESCRIPTOR.fields_by_name:
            raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(pb.Evaluate.DESCRIPTOR.fields_by_name)}")
        getattr(request.evaluate, metric).SetInParent()
        _fill(getattr(request.evaluate, metric), fields or {}, f"{metric} fields")
    return request


_SPEC_KEYS = {"algorithm", "params", "noise_tunnel", "layer", "return_convergence_delta"}


def _algorithm_spec(spec: Mapping[str, Any]) -> pb.AlgorithmSpec:
    """One `also=` entry: {"algorithm": name, "params": {...}, "noise_tunnel": {...}, "layer": ..., "return_convergence_delta": ...}."""
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown or "algorithm" not in spec:
        raise ValueError(f"also entries take {', '.join(sorted(_SPEC_KEYS))} (algorithm required); got {', '.join(sorted(spec))}")
    value = _algorithm(spec["algorithm"])
    message = pb.AlgorithmSpec(
        algorithm=value or pb.ALGORITHM_UNSPECIFIED,
        custom_algorithm="" if value is not None else spec["algorithm"],
        layer=spec.get("layer") or "",
        return_convergence_delta=bool(spec.get("return_convergence_delta", False)),
    )
    if spec.get("params"):
        message.params.update({k: _plain(v) for k, v in spec["params"].items() if v is not None})
    if spec.get("noise_tunnel") is not None:
        message.noise_tunnel.SetInParent()
        _fill(message.noise_tunnel, spec["noise_tunnel"], "noise_tunnel fields")
    return message


def _stream_request(request: pb.AttributeRequest | pb.AttributeStreamRequest) -> pb.AttributeStreamRequest:
    if isinstance(request, pb.AttributeStreamRequest):
        return request
    if isinstance(request, pb.AttributeRequest):
        return pb.AttributeStreamRequest(request=request)
    raise TypeError(f"expected an AttributeRequest, got {type(request).__name__}")


class _ClientBase:
    build_request = staticmethod(build_request)

    def __init__(
        self, target: Target, credentials: grpc.ChannelCredentials | None, options: Iterable[tuple[str, Any]] | None, grpc_module: Any
    ) -> None:
        resolved, balanced = channel_target(target)
        defaults = {**_DEFAULT_OPTIONS, **({"grpc.service_config": _BALANCED_SERVICE_CONFIG} if balanced else {})}
        merged = list({**defaults, **dict(options or ())}.items())
        if credentials is None:
            self._channel = grpc_module.insecure_channel(resolved, options=merged)
        else:
            self._channel = grpc_module.secure_channel(resolved, credentials, options=merged)
        self._stub = pb_grpc.AttributionServiceStub(self._channel)
        self._repository = pb_grpc.ModelRepositoryServiceStub(self._channel)


class AttributionClient(_ClientBase):
    """Blocking client; gRPC failures propagate as `grpc.RpcError`.

    `target`: "host:port"; or several servers — a list of "ip:port", one comma-joined string, or
    "dns:///name:port" (e.g. a Kubernetes headless Service) — over which calls are balanced round-robin,
    skipping servers that are not SERVING and retrying on another one a call refused with UNAVAILABLE."""

    def __init__(
        self, target: Target, *, credentials: grpc.ChannelCredentials | None = None, options: Iterable[tuple[str, Any]] | None = None
    ) -> None:
        super().__init__(target, credentials, options, grpc)

    def attribute(self, model: str, algorithm: str, inputs: Any, *, timeout: float | None = None, **kwargs: Any) -> Attribution:
        """Attributes `inputs`; keyword arguments are `build_request`'s."""
        response = self._stub.Attribute(build_request(model, algorithm, inputs, **kwargs), timeout=timeout)
        return Attribution.from_response(response, single=not is_multi(inputs))

    def attribute_stream(
        self, requests: Iterable[pb.AttributeRequest], *, timeout: float | None = None
    ) -> Iterator[pb.AttributeStreamResponse]:
        """Sends requests over one stream; responses come as they finish, matched by request_id."""
        return self._stub.AttributeStream((_stream_request(r) for r in requests), timeout=timeout)

    def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list(self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout).models)

    def get_model(self, model: str, version: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        request = pb.GetModelRequest(model=model, model_version=version)
        return self._stub.GetModel(request, timeout=timeout).model

    def repository_index(self, *, ready_only: bool = False, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Every model version in the server's repository with its state (`ready_only`: those serving now)."""
        request = pb.RepositoryIndexRequest(ready_only=ready_only)
        return list(self._repository.RepositoryIndex(request, timeout=timeout).models)

    def load_model(self, model: str, version: str = "", *, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Loads (or reloads) a model's versions, or the one named; the model's versions after the load.
        Needs a server run with `--model-control explicit`."""
        request = pb.LoadModelRequest(model=model, version=version)
        return list(self._repository.LoadModel(request, timeout=timeout).models)

    def unload_model(self, model: str, version: str = "", *, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Unloads a model's versions, or the one named, once their accepted requests finish; the model's
        versions after the unload. Needs a server run with `--model-control explicit`."""
        request = pb.UnloadModelRequest(model=model, version=version)
        return list(self._repository.UnloadModel(request, timeout=timeout).models)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AttributionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAttributionClient(_ClientBase):
    """grpc.aio client; gRPC failures propagate as `grpc.aio.AioRpcError`. `target` as AttributionClient's."""

    def __init__(
        self, target: Target, *, credentials: grpc.ChannelCredentials | None = None, options: Iterable[tuple[str, Any]] | None = None
    ) -> None:
        super().__init__(target, credentials, options, grpc.aio)

    async def attribute(self, model: str, algorithm: str, inputs: Any, *, timeout: float | None = None, **kwargs: Any) -> Attribution:
        """Attributes `inputs`; keyword arguments are `build_request`'s."""
        request = build_request(model, algorithm, inputs, **kwargs)
        response = await self._stub.Attribute(request, timeout=timeout)
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

        call = self._stub.AttributeStream(outgoing(), timeout=timeout)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()  # a consumer that stops early must not leave the RPC open

    async def list_models(self, *, timeout: float | None = None) -> list[pb.ModelInfo]:
        return list((await self._stub.ListModels(pb.ListModelsRequest(), timeout=timeout)).models)

    async def get_model(self, model: str, version: str = "", *, timeout: float | None = None) -> pb.ModelInfo:
        request = pb.GetModelRequest(model=model, model_version=version)
        return (await self._stub.GetModel(request, timeout=timeout)).model

    async def repository_index(self, *, ready_only: bool = False, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Every model version in the server's repository with its state (`ready_only`: those serving now)."""
        request = pb.RepositoryIndexRequest(ready_only=ready_only)
        return list((await self._repository.RepositoryIndex(request, timeout=timeout)).models)

    async def load_model(self, model: str, version: str = "", *, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Loads (or reloads) a model's versions, or the one named; needs `--model-control explicit`."""
        request = pb.LoadModelRequest(model=model, version=version)
        return list((await self._repository.LoadModel(request, timeout=timeout)).models)

    async def unload_model(self, model: str, version: str = "", *, timeout: float | None = None) -> list[pb.ModelStatus]:
        """Unloads a model's versions, or the one named; needs `--model-control explicit`."""
        request = pb.UnloadModelRequest(model=model, version=version)
        return list((await self._repository.UnloadModel(request, timeout=timeout)).models)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncAttributionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
