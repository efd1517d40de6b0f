"""Server configuration and the model repository: `config.pbtxt` (text-format ModelConfig) ↔ engine ModelSpec."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format

from attrserve.v1 import model_config_pb2 as mc
from attrserve_engine import EngineLimits, InputSpec, LoadedModel, ModelSpec
from attrserve_service.convert import TORCH_TO_WIRE, WIRE_DTYPES
from attrserve_service.demo_models import DEMO_MODEL_REPOSITORY

_PLATFORMS = {mc.PLATFORM_UNSPECIFIED: "", mc.PLATFORM_PYTORCH_EAGER: "pytorch_eager", mc.PLATFORM_TORCHSCRIPT: "torchscript"}


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    metrics_port: int | None = 9090  # None: no /metrics endpoint; 0: any free port
    model_repository: Path | None = None  # None: the built-in demo models
    plugins: list[str] = field(default_factory=list)  # algorithm plugins: .py files, folders or module paths
    limits: EngineLimits = field(default_factory=EngineLimits)
    max_request_bytes: int = 64 * 1024 * 1024
    max_requests_per_stream: int = 256  # in flight on one AttributeStream
    grace_seconds: float = 10.0
    # On SIGTERM, health says NOT_SERVING this long before the listener stops taking requests: clients that
    # watch health (the Python client with several servers, Kubernetes readiness) move away without losing a call.
    prestop_seconds: float = 1.0


class RepositoryError(Exception):
    """A model folder that cannot be served; raised at start-up with the path."""


def read_model_config(folder: Path) -> mc.ModelConfig:
    config = mc.ModelConfig()
    path = folder / "config.pbtxt"
    if path.exists():
        try:
            text_format.Parse(path.read_text(), config)
        except text_format.ParseError as e:
            raise RepositoryError(f"{path}: {e}") from None
    return config


def spec_from_config(folder: Path, config: mc.ModelConfig) -> ModelSpec:
    inputs = []
    for i, s in enumerate(config.inputs):
        if s.dtype != 0 and s.dtype not in WIRE_DTYPES:
            raise RepositoryError(f"{folder}/config.pbtxt: inputs[{i}].dtype {s.dtype} is not supported")
        # No dims means "not pinned" (any shape), not a scalar per example.
        dims = tuple(s.dims) if s.dims else None
        inputs.append(InputSpec(name=s.name or f"input{i}", dtype=WIRE_DTYPES[s.dtype][1] if s.dtype else None, dims=dims))
    if config.platform not in _PLATFORMS:
        raise RepositoryError(f"{folder}/config.pbtxt: platform {config.platform} is not one this server knows")
    which = config.output.WhichOneof("selector")
    return ModelSpec(
        name=config.name or folder.name,
        version=config.version or "1",
        path=folder,
        platform=_PLATFORMS[config.platform],
        inputs=inputs,
        max_batch_rows=config.max_batch_rows,
        max_queue_delay_us=config.max_queue_delay_microseconds,
        device=config.device,
        output_index=config.output.index if which == "index" else None,
        output_key=config.output.key if which == "key" else None,
        description=config.description,
        precision=config.precision,
    )


def load_repository(root: Path | None) -> list[ModelSpec]:
    """One ModelSpec per model folder (a folder with model.py or model.pt)."""
    root = Path(root) if root is not None else DEMO_MODEL_REPOSITORY
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a folder")
    specs = [
        spec_from_config(folder, read_model_config(folder))
        for folder in sorted(p for p in root.iterdir() if p.is_dir())
        if (folder / "model.py").exists() or (folder / "model.pt").exists()
    ]
    if not specs:
        raise RepositoryError(f"model repository {root} has no model folders (each needs model.py or model.pt)")
    return specs


def effective_config(model: LoadedModel) -> mc.ModelConfig:
    """The config a model is served with, defaults filled in (for GetModel)."""
    spec = model.spec
    config = mc.ModelConfig(
        name=model.name,
        version=model.version,
        platform=mc.PLATFORM_TORCHSCRIPT if model.is_torchscript else mc.PLATFORM_PYTORCH_EAGER,
        max_batch_rows=model.max_batch_rows,
        max_queue_delay_microseconds=round(model.max_queue_delay_s * 1e6),
        device=str(model.device),
        description=spec.description,
        precision=spec.precision or "float32",
    )
    for s in spec.inputs:
        wire = TORCH_TO_WIRE.get(s.dtype, 0) if s.dtype is not None else 0  # 0: DATA_TYPE_UNSPECIFIED, any dtype
        config.inputs.add(name=s.name, dtype=wire, dims=list(s.dims or ()))
    if spec.output_key is not None:
        config.output.key = spec.output_key
    elif spec.output_index is not None:
        config.output.index = spec.output_index
    return config
