"""The Open Inference Protocol (KServe v2 gRPC, `inference.GRPCInferenceService`, the API Triton's clients speak) on
attrserve's port: health and metadata from the core; ModelInfer as an AttributionJob through the same core.

ModelInfer without an `algorithm` request parameter returns the model's predictions (its explained output: a
predictions-only job, one forward row per example). With one it returns attributions, equal to Attribute's:

- request parameters: `algorithm` (snake_case, e.g. integrated_gradients, or a plugin's name), `target`, `layer`,
  `seed`, `return_convergence_delta`, and any other parameter by its Captum name (`n_steps`, `method`, ...).
  `target` is an int64 (one class for all examples) or a string of JSON: `3`; `[1, 0, 2]` (one per example, Captum's
  list); `[[0, 1], [2, 3]]` (an index tuple per example); `{"tuple": [0, 1]}` (one index tuple for all). A string
  parameter whose text starts with `[` or `{` is read as JSON too (e.g. `sliding_window_shapes`), in the bounds of
  Attribute's Struct parameters (at most 1000 characters, 8 levels deep, finite numbers). Triton's own
  request parameters (priority, timeout, sequence_*) are ignored.
- input tensors: the model's inputs, matched by name to the names its config gives them (GetModel,
  ModelMetadata), or by position when the config names none; `<input>__baselines` and `<input>__feature_mask` give
  an input's baseline and feature mask. Data in `contents` (typed fields) or `raw_input_contents` (little-endian).
- outputs: `output` (the model's explained output, returned with attributions when asked for by name in the
  request's `outputs`), `attributions__<input>` (one per input; `attributions__<i>` for a layer method's),
  `convergence_delta`; all as raw_output_contents. The response's `seed` parameter reproduces the request. A requested
  output name the answer does not have is INVALID_ARGUMENT naming `outputs[i].name`, and so is an output asked for with
  Triton's `classification` parameter (its clients' class_count: the top classes as text, which attrserve does not
  give) naming `outputs[i].parameters.classification`.

Errors are the same statuses as Attribute's (methods.py maps them): a bad field is INVALID_ARGUMENT naming it. An
attribution request (one with `algorithm`) is counted in the attribution metrics as Attribute's are, whatever its
outcome; predictions are not attributions."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from attrserve.v1 import model_config_pb2 as mc
from attrserve.v1 import tensor_pb2
from attrserve_engine import AttributionJob, InvalidArgument, NotFound
from attrserve_engine.errors import shown
from attrserve_engine.events import version_order
from attrserve_engine.limits import INT64_MAX, INT64_MIN
from attrserve_service import __version__, metrics
from attrserve_service.convert import MAX_STRUCT_DEPTH, MAX_STRUCT_STRING, WIRE_DTYPES, Job, Result, array_from_proto, decode, wire_array
from attrserve_service.core import Core
from attrserve_service.kserve import grpc_predict_v2_pb2 as oip
from attrserve_service.servicer import AttributionServicer, _unary, grpc_status

if TYPE_CHECKING:
    from attrserve_service.methods import Registrar

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
DType = tensor_pb2.DataType

# OIP datatype ↔ attrserve's wire dtype (the same little-endian bytes; BF16 travels as its 16 raw bits).
OIP_DTYPES: dict[str, tensor_pb2.DataType] = {
    "FP32": DType.DATA_TYPE_FLOAT32,
    "FP64": DType.DATA_TYPE_FLOAT64,
    "FP16": DType.DATA_TYPE_FLOAT16,
    "BF16": DType.DATA_TYPE_BFLOAT16,
    "INT64": DType.DATA_TYPE_INT64,
    "INT32": DType.DATA_TYPE_INT32,
    "INT16": DType.DATA_TYPE_INT16,
    "INT8": DType.DATA_TYPE_INT8,
    "UINT8": DType.DATA_TYPE_UINT8,
    "BOOL": DType.DATA_TYPE_BOOL,
}
WIRE_TO_OIP = {wire: name for name, wire in OIP_DTYPES.items()}
FLOAT_DTYPES = frozenset({"FP32", "FP64", "FP16", "BF16"})
# The typed field of InferTensorContents each datatype is sent in (FP16 and BF16 have none: raw only).
CONTENTS_FIELD = {
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "INT16": "int_contents",
    "INT8": "int_contents",
    "UINT8": "uint_contents",
    "BOOL": "bool_contents",
}
PLATFORM = "pytorch"
OUTPUT = "output"
BASELINES = "__baselines"
FEATURE_MASK = "__feature_mask"
# Triton's clients set these request parameters themselves (scheduling hints attrserve does not use).
IGNORED_PARAMETERS = frozenset({"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "binary_data_output"})


class InferenceServicer:
    """inference.GRPCInferenceService over a Core (this process's engine or the engine-core process)."""

    def __init__(self, core: Core, attribution: AttributionServicer, strict_readiness: bool = False) -> None:
        self.core = core
        self.attribution = attribution  # its `active` count is what the drain waits on
        self.strict_readiness = strict_readiness
        # ModelInfer's input names per (model, version asked for), so a request does not ask the engine process for
        # the whole ModelInfo; forgotten whenever a model or worker changes state (a new version may serve "").
        self._input_names: dict[tuple[str, str], list[str]] = {}
        self._changes = 0
        core.on_change(self._changed, asyncio.get_running_loop())

    def _changed(self) -> None:
        self._changes += 1
        self._input_names.clear()

    async def _model_inputs(self, model: str, version: str) -> list[str]:
        key = (model, version)
        names = self._input_names.get(key)
        if names is None:
            changes = self._changes
            names = _input_names((await self.core.model_info(model, version)).config)
            if changes == self._changes:  # no state change while it was asked: still the answer
                self._input_names[key] = names
        return names

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> oip.ServerLiveResponse:
        decode(oip.ServerLiveRequest, request)
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> oip.ServerReadyResponse:
        decode(oip.ServerReadyRequest, request)
        return oip.ServerReadyResponse(ready=self.core.readiness(self.strict_readiness)[0])

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> oip.ModelReadyResponse:
        message = decode(oip.ModelReadyRequest, request)
        try:
            info = await self.core.model_info(message.name, message.version)
        except NotFound:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=info.ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> oip.ServerMetadataResponse:
        decode(oip.ServerMetadataRequest, request)
        return oip.ServerMetadataResponse(name="attrserve", version=__version__)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> oip.ModelMetadataResponse:
        message = decode(oip.ModelMetadataRequest, request)
        info = await self.core.model_info(message.name, message.version)
        config = info.config
        versions = sorted({i.config.version for i in await self.core.model_infos() if i.config.name == config.name}, key=version_order)
        metadata = oip.ModelMetadataResponse.TensorMetadata
        # Each input, and its attributions shaped like it: (name, datatype, shape).
        tensors = [(name, WIRE_TO_OIP.get(spec.dtype, "FP32"), [-1, *spec.dims]) for name, spec in zip(_input_names(config), config.inputs)]
        inputs = [metadata(name=name, datatype=datatype, shape=shape) for name, datatype, shape in tensors]
        # The output's dtype and per-example shape are the model's (not in its config): a float, rank unknown.
        outputs = [metadata(name=OUTPUT, datatype="FP32", shape=[-1])]
        # An integer or bool input's attributions are floats (a perturbation method's, in the output's dtype).
        outputs += [
            metadata(name=f"attributions__{name}", datatype=datatype if datatype in FLOAT_DTYPES else "FP32", shape=shape)
            for name, datatype, shape in tensors
        ]
        return oip.ModelMetadataResponse(name=config.name, versions=versions, platform=PLATFORM, inputs=inputs, outputs=outputs)

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> oip.ModelInferResponse:
        """Predictions (no `algorithm` parameter) or attributions. An attribution request is counted in the attribution
        metrics whatever its outcome, as Attribute counts its own: refused at the edge (a bad tensor, target or output
        name, an unknown model) as much as by the engine; a name a client makes up is labelled "unknown"
        (`Core.labels`). Predictions are no attribution: only the RPC metrics count them."""
        start = time.monotonic()
        remaining = context.time_remaining()
        message = decode(oip.ModelInferRequest, request)
        algorithm = _requested_algorithm(message)
        if algorithm is None:
            return await self._infer(message, start, remaining)
        labels = self.core.labels(message.model_name, algorithm)  # bounded: made-up names count as "unknown"
        metrics.ATTRSERVE_REQUESTS_IN_FLIGHT.inc()
        self.attribution.active += 1
        code = "OK"
        try:
            return await self._infer(message, start, remaining, labels)
        except BaseException as e:
            code = grpc_status(e, context)[0].name
            raise
        finally:
            self.attribution.active -= 1
            metrics.ATTRSERVE_REQUESTS_IN_FLIGHT.dec()
            metrics.child(metrics.ATTRSERVE_ATTRIBUTIONS_COMPLETED_TOTAL, *labels, code).inc()
            metrics.child(metrics.ATTRSERVE_ATTRIBUTION_DURATION_SECONDS, *labels).observe(time.monotonic() - start)

    async def _infer(
        self, message: oip.ModelInferRequest, start: float, remaining: float | None, labels: tuple[str, str] | None = None
    ) -> oip.ModelInferResponse:
        """ModelInfer's work: the job, the engine's answer, the response (`labels`: an attribution's metric labels)."""
        if not message.model_name:
            raise InvalidArgument("model_name is empty; name a served model (ModelMetadata describes it)")
        model_inputs = await self._model_inputs(message.model_name, message.model_version)
        job, names = infer_request_to_job(message, model_inputs, None if remaining is None else start + remaining)
        result = await self.core.attribute(job)
        if labels is not None:
            metrics.child(metrics.ATTRSERVE_QUEUE_WAIT_SECONDS, labels[0]).observe(result.timing.queue_ms / 1e3)
            if result.convergence_delta is not None:
                metrics.observe_delta(*labels, result.convergence_delta)
        return _response(message, result, names)


def _requested_algorithm(request: oip.ModelInferRequest) -> str | None:
    """The algorithm an attribution request names (its label before any check: "" where the parameter is no string);
    None for predictions (no `algorithm` parameter, or an empty one), which infer_request_to_job reads the same way."""
    if "algorithm" not in request.parameters:
        return None
    value = request.parameters["algorithm"]
    if value.WhichOneof("parameter_choice") != "string_param":
        return ""  # refused by infer_request_to_job, and counted as an attribution of algorithm "unknown"
    return value.string_param or None


def _input_names(config: mc.ModelConfig) -> list[str]:
    """The names the model's config gives its inputs; [] when it names none (inputs are then matched by position)."""
    names = [spec.name for spec in config.inputs]
    return names if names and all(names) else []


# -- ModelInferRequest → AttributionJob --------------------------------------------------------------------------------


def infer_request_to_job(request: oip.ModelInferRequest, model_inputs: list[str], deadline: float | None = None) -> tuple[Job, list[str]]:
    """The job a ModelInfer asks for, and the names of its inputs in the model's order (the output names use them)."""
    arrival = time.monotonic()
    tensors = _input_tensors(request)
    extras = {name: t for name, t in tensors.items() if name.endswith((BASELINES, FEATURE_MASK))}
    given = [name for name in tensors if name not in extras]
    if not given:
        raise InvalidArgument("inputs is empty; send one tensor per model input")
    if model_inputs:
        unknown = [name for name in given if name not in model_inputs]
        if unknown:
            raise InvalidArgument(f"inputs: {shown(unknown[0])} is not an input of model {request.model_name!r}; it has {model_inputs}")
        missing = [name for name in model_inputs if name not in tensors]
        if missing:
            raise InvalidArgument(f"inputs: model {request.model_name!r} needs input {missing[0]!r} (its inputs: {model_inputs})")
        names = model_inputs
    else:
        names = given
    for name in extras:
        if name.rsplit("__", 1)[0] not in names:
            raise InvalidArgument(f"inputs: {shown(name)} names no input of the model (its inputs: {names})")
    params = _parameters(request)
    algorithm = params.pop("algorithm", "")
    if not isinstance(algorithm, str):
        raise InvalidArgument("parameters.algorithm must be a string_param, e.g. integrated_gradients")
    seed = params.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidArgument("parameters.seed must be an int64_param")
    delta = params.pop("return_convergence_delta", False)
    if not isinstance(delta, bool):
        raise InvalidArgument("parameters.return_convergence_delta must be a bool_param")
    requested = [o.name for o in request.outputs]
    _check_requested(requested, names, algorithm, delta)
    for i, o in enumerate(request.outputs):  # Triton's classification extension (class_count): the top classes as text
        if "classification" in o.parameters:
            raise InvalidArgument(
                f"outputs[{i}].parameters.classification is set; attrserve returns tensors only, so ask for {shown(o.name)} without it"
            )
    layer = params.pop("layer", "")
    if not isinstance(layer, str):
        raise InvalidArgument("parameters.layer must be a string_param, a dotted module path")
    masks = [name for name in extras if name.endswith(FEATURE_MASK)]
    if masks and len(masks) != len(names):
        raise InvalidArgument(f"inputs: send a {FEATURE_MASK} tensor for every input or for none")
    job: Job = AttributionJob(
        model=request.model_name,
        model_version=request.model_version,
        algorithm=algorithm,
        inputs=tuple(tensors[name] for name in names),
        baselines=tuple(tensors.get(name + BASELINES) for name in names) if any(n.endswith(BASELINES) for n in extras) else (),
        target=_target(params.pop("target", None)),
        params=params,
        layer=layer,
        feature_masks=tuple(tensors[name + FEATURE_MASK] for name in names) if masks else (),
        return_convergence_delta=delta,
        return_outputs=not algorithm or OUTPUT in requested,
        seed=seed,
        request_id=request.id,
        deadline=deadline,
        arrival=arrival,
    )
    return job, names


def _check_requested(requested: list[str], names: list[str], algorithm: str, delta: bool) -> None:
    """Each requested output name is one the answer can have (`_response` writes them), or INVALID_ARGUMENT naming
    outputs[i].name: a name no output has (a typo of an input's name) would otherwise get an answer without it.
    Predictions have `output` alone; attributions `output`, `attributions__<input>`, `attributions__<i>` (a layer
    method's: how many its layer gives is known only once it ran, so `_response` checks that index), and
    `convergence_delta` when return_convergence_delta is set."""
    known = [OUTPUT]
    if algorithm:
        known += [f"attributions__{name}" for name in names] + (["convergence_delta"] if delta else [])
    for i, name in enumerate(requested):
        if name in known or (algorithm and _layer_index(name) is not None):
            continue
        if name == "convergence_delta" and algorithm:
            raise InvalidArgument(f"outputs[{i}].name is 'convergence_delta'; set parameters.return_convergence_delta to get it")
        more = ", attributions__<i> (a layer method's i-th)" if algorithm else " (a request without parameters.algorithm is a prediction)"
        raise InvalidArgument(f"outputs[{i}].name {shown(name)} is not an output; it can be one of {shown(known, 400)}{more}")


def _layer_index(name: str) -> int | None:
    """i of `attributions__<i>` (decimal, as `_response` writes it: no sign, no leading zero), else None."""
    digits = name.removeprefix("attributions__")
    if digits == name or not digits.isascii() or not digits.isdigit() or (len(digits) > 1 and digits[0] == "0") or len(digits) > 4:
        return None
    return int(digits)


def _input_tensors(request: oip.ModelInferRequest) -> dict[str, np.ndarray]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(f"raw_input_contents has {len(raw)} entries; send one per input ({len(request.inputs)})")
    tensors: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        label = f"inputs[{i}]"
        if not t.name:
            raise InvalidArgument(f"{label}.name is empty")
        if t.name in tensors:
            raise InvalidArgument(f"{label}.name {shown(t.name)} is sent twice")
        wire = OIP_DTYPES.get(t.datatype)
        if wire is None:
            raise InvalidArgument(f"{label}.datatype is {shown(t.datatype)}; set one of {', '.join(OIP_DTYPES)}")
        has_contents = t.HasField("contents") and t.contents.ByteSize() > 0
        if raw:
            if has_contents:
                raise InvalidArgument(f"{label}.contents is set but raw_input_contents is too; send each input's data one way")
            data = raw[i]
            label = f"raw_input_contents[{i}] (input {shown(t.name)})"
        else:
            data = _contents_bytes(t, label)
        tensors[t.name] = array_from_proto(tensor_pb2.Tensor(dtype=wire, shape=t.shape, data=data), label)
    return tensors


def _contents_bytes(t: oip.ModelInferRequest.InferInputTensor, label: str) -> bytes:
    """An input's typed contents as the raw little-endian bytes of its datatype (values checked to fit it)."""
    field = CONTENTS_FIELD.get(t.datatype)
    if field is None:
        raise InvalidArgument(f"{label}: {t.datatype} has no typed contents field; send it in raw_input_contents")
    for other in t.contents.DESCRIPTOR.fields:
        if other.name != field and len(getattr(t.contents, other.name)):
            raise InvalidArgument(f"{label}.contents.{other.name} is set; a {t.datatype} tensor's values go in contents.{field}")
    values = getattr(t.contents, field)
    np_dtype = WIRE_DTYPES[OIP_DTYPES[t.datatype]]
    if np_dtype.kind in "iu" and np_dtype.itemsize < 4 and len(values):
        info = np.iinfo(np_dtype)
        array = np.asarray(values, dtype=np.int64)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidArgument(f"{label}.contents.{field} has a value outside {t.datatype}'s range [{info.min}, {info.max}]")
    return np.asarray(values, dtype=np_dtype).tobytes()


def _parameters(request: oip.ModelInferRequest) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for key, value in request.parameters.items():
        if key in IGNORED_PARAMETERS:
            continue
        which = value.WhichOneof("parameter_choice")
        label = f"parameters.{shown(key, 40)}"
        if which is None:
            raise InvalidArgument(f"{label} has no value")
        item = getattr(value, which)
        if which == "double_param" and not math.isfinite(item):
            raise InvalidArgument(f"{label} is {item}; numbers must be finite")
        if which == "string_param" and key != "target" and item.startswith(("[", "{")):
            item = _json(item, label)
        params[key] = item
    return params


def _json(text: str, label: str) -> Any:
    """A string parameter's JSON, in the bounds of Attribute's Struct parameters (convert.struct_to_dict): at most
    MAX_STRUCT_STRING characters, MAX_STRUCT_DEPTH levels of nesting (a job's parameters are pickled to the engine,
    which a deeper one made a RecursionError: INTERNAL) and finite numbers (JSON has no NaN or Infinity, which
    json.loads takes, nor does 1e999 fit a double)."""
    if len(text) > MAX_STRUCT_STRING:
        raise InvalidArgument(f"{label} is a string of {len(text)} characters; at most {MAX_STRUCT_STRING}")
    try:
        value = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError) as e:
        raise InvalidArgument(f"{label} is not valid JSON: {shown(str(e), 100)}") from None
    _check_depth(value, label, 1)
    return value


def _not_json(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number; numbers must be finite")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit in a double; numbers must be finite")
    return value


def _check_depth(value: Any, label: str, depth: int) -> None:
    if isinstance(value, (list, dict)):
        if depth > MAX_STRUCT_DEPTH:
            raise InvalidArgument(f"{label} is nested more than {MAX_STRUCT_DEPTH} levels deep")
        for item in value.values() if isinstance(value, dict) else value:
            _check_depth(item, label, depth + 1)


def _target(value: Any) -> int | tuple[int, ...] | list[Any] | None:
    """`target` in Captum's forms: an int64_param, or a string of JSON (an int, a list per example, {"tuple": [...]}).
    Every index fits in an int64 (a uint64_param or a JSON number may not): the engine's target is an int64 tensor."""
    if value is None:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return _int64(value)
    if not isinstance(value, str):
        raise InvalidArgument("parameters.target must be an int64_param or a string_param of JSON")
    parsed = _json(value, "parameters.target")
    if isinstance(parsed, int) and not isinstance(parsed, bool):
        return _int64(parsed)
    if isinstance(parsed, dict) and set(parsed) == {"tuple"} and _ints(parsed["tuple"]):
        return tuple(parsed["tuple"])
    if isinstance(parsed, list) and (_ints(parsed) or all(isinstance(row, list) and _ints(row) for row in parsed)):
        return [tuple(row) if isinstance(row, list) else row for row in parsed]
    raise InvalidArgument(
        'parameters.target must be an int, a list (one per example) of ints or of int lists, or {"tuple": [ints]}; '
        f"got {shown(value, 60)}"
    )


def _int64(value: int) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidArgument(f"parameters.target has the index {shown(value)}, outside the int64 range")
    return value


def _ints(values: Any) -> bool:
    """A list of ints, each checked to fit in an int64 (refused naming parameters.target)."""
    if not (isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values)):
        return False
    for v in values:
        _int64(v)
    return True


# -- AttributionResult → ModelInferResponse ------------------------------------------------------------------------------


def _response(request: oip.ModelInferRequest, result: Result, names: list[str]) -> oip.ModelInferResponse:
    outputs: list[tuple[str, np.ndarray]] = []
    if result.outputs is not None:
        outputs.append((OUTPUT, result.outputs))
    for i, a in enumerate(result.attributions):  # a layer method's by position, whatever its count
        outputs.append((f"attributions__{i if result.layer_shaped else names[i]}", a))
    if result.convergence_delta is not None:
        outputs.append(("convergence_delta", result.convergence_delta))
    requested = {o.name for o in request.outputs}
    written = {name for name, _ in outputs}
    for i, o in enumerate(request.outputs):  # a layer method's attributions__<i> past its layer's tensors
        if o.name not in written:
            raise InvalidArgument(
                f"outputs[{i}].name {shown(o.name)} is not an output of this answer; it has {shown(sorted(written), 400)}"
            )
    response = oip.ModelInferResponse(model_name=request.model_name, model_version=result.model_version, id=request.id)
    response.parameters["seed"].int64_param = result.seed
    for name, tensor in outputs:
        if requested and name not in requested:
            continue
        wire, shape, data = wire_array(tensor)
        response.outputs.add(name=name, datatype=WIRE_TO_OIP[wire], shape=shape)
        response.raw_output_contents.append(data)
    return response


assert set(WIRE_DTYPES) == set(WIRE_TO_OIP)  # every dtype wire_array writes has an OIP name


def add_inference_service(servicer: InferenceServicer, server: Registrar) -> None:
    """Registers inference.GRPCInferenceService; like attrserve's services, each handler parses its request's bytes."""
    responses = {
        "ServerLive": oip.ServerLiveResponse,
        "ServerReady": oip.ServerReadyResponse,
        "ModelReady": oip.ModelReadyResponse,
        "ServerMetadata": oip.ServerMetadataResponse,
        "ModelMetadata": oip.ModelMetadataResponse,
        "ModelInfer": oip.ModelInferResponse,
    }
    server.add_registered_method_handlers(SERVICE_NAME, {name: _unary(getattr(servicer, name), responses[name]) for name in METHODS})
