"""The models an engine serves: loads model folders (eager `model.py` or TorchScript `model.pt`) and keeps them resident."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attrserve_engine.errors import InvalidArgument, NotFound
from attrserve_engine.user_code import import_file

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_ROWS = 256
DEFAULT_MAX_QUEUE_DELAY_US = 500


@dataclass
class InputSpec:
    name: str
    dtype: torch.dtype | None = None  # None: any dtype
    dims: tuple[int, ...] | None = None  # per example; -1 = any size; None: any shape


@dataclass
class ModelSpec:
    """Everything the engine needs to load and serve one model version.

    The service builds it from `config.pbtxt`; tests may pass `module` directly.
    """

    name: str
    version: str = "1"
    path: Path | None = None  # model folder
    platform: str = ""  # "pytorch_eager" | "torchscript" | "" (detect from the folder)
    inputs: list[InputSpec] = field(default_factory=list)
    max_batch_rows: int = 0  # 0: engine default
    max_queue_delay_us: int = 0  # 0: engine default
    device: str = ""  # "auto" | "cpu" | "cuda[:i]" | "" (engine default)
    output_index: int | None = None
    output_key: str | None = None
    description: str = ""
    precision: str = ""  # autocast dtype for passes: "" / "float32", "bfloat16", "float16"
    module: nn.Module | None = None  # an already-built model (tests, embedding in other programs)


_AUTOCAST = {"": None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise InvalidArgument(f"device {device!r} is not a torch device: {e}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument(f"device {device!r} asked for, but CUDA is not available")
    return resolved


def _load_module(spec: ModelSpec) -> nn.Module:
    if spec.module is not None:
        return spec.module
    if spec.path is None:
        raise InvalidArgument(f"model {spec.name!r} has neither a folder nor a module")
    folder = Path(spec.path)
    platform = spec.platform or ("torchscript" if (folder / "model.pt").exists() else "pytorch_eager")
    if platform == "torchscript":
        if not (folder / "model.pt").exists():
            raise NotFound(f"model folder {folder} is configured as TorchScript but has no model.pt")
        return torch.jit.load(str(folder / "model.pt"), map_location="cpu")
    source = folder / "model.py"
    if not source.exists():
        raise NotFound(f"model folder {folder} is configured as eager PyTorch but has no model.py")
    py_module = import_file(source, f"attrserve_model_{spec.name}")
    build: Callable[[], nn.Module] | None = getattr(py_module, "build_model", None)
    if build is None:
        raise InvalidArgument(f"{source} defines no build_model()")
    model = build()
    weights = folder / "weights.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


class LoadedModel:
    """A model resident on its device, with what the engine knows about it."""

    def __init__(self, spec: ModelSpec, default_max_batch_rows: int, default_max_queue_delay_us: int) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = spec.version or "1"
        self.device = resolve_device(spec.device)
        if self.device.type == "cuda":
            # NOTE: TF32 convolutions trade ~1e-3 relative error for speed; attributions must equal Captum's fp32 numbers.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        self.module = _load_module(spec).to(self.device).eval()
        # Reduced-precision forward/backward (autocast), per model: "" / "float32" (default), "bfloat16", "float16".
        self.autocast_dtype = _AUTOCAST.get(spec.precision)
        if spec.precision not in _AUTOCAST:
            raise InvalidArgument(
                f"model {spec.name!r}: precision {spec.precision!r} is not one of {', '.join(repr(k) for k in _AUTOCAST)}"
            )
        self.max_batch_rows = spec.max_batch_rows or default_max_batch_rows
        self.max_queue_delay_s = (spec.max_queue_delay_us or default_max_queue_delay_us) / 1e6
        self.is_torchscript = isinstance(self.module, torch.jit.ScriptModule)
        self.layers = [name for name, _ in self.module.named_modules() if name]
        # Per-example shape of the explained output, learned at warm-up or first pass.
        self.output_shape: tuple[int, ...] | None = None
        self.ready = False
        # Algorithms that failed on this model at warm-up, with why.
        self.unsupported: dict[str, str] = {}
        # Algorithm.refusal's answers by (algorithm, input dtypes): capability rules run once per model.
        self.refusals: dict[tuple, str | None] = {}
        # Rows per second by pass size, when max_batch_rows was measured at load (tuning.py).
        self.batch_probe: dict[int, float] = {}
        for p in self.module.parameters():
            p.requires_grad_(False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)

    def forward(self, *args: Tensor) -> Tensor:
        """Run the model and pick the explained output (tuple index or dict key)."""
        if self.autocast_dtype is None:
            out: Any = self.module(*args)
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = self.module(*args)
            out = _float32(out)
        key, index = self.spec.output_key, self.spec.output_index
        if isinstance(out, dict):
            if key is None and len(out) != 1:
                raise InvalidArgument(f"model {self.name!r} returns a dict with keys {sorted(out)}; set output.key in its config")
            if key is not None and key not in out:
                raise InvalidArgument(f"model {self.name!r} returns a dict with keys {sorted(out)}; output.key {key!r} is not one")
            out = out[key if key is not None else next(iter(out))]
        elif key is not None:
            raise InvalidArgument(f"model {self.name!r} returns {type(out).__name__}, not a dict; output.key {key!r} does not apply")
        elif isinstance(out, (tuple, list)):
            if not -len(out) <= (index or 0) < len(out):
                raise InvalidArgument(f"model {self.name!r} returns {len(out)} outputs; output.index {index} is out of range")
            out = out[index or 0]
        elif index not in (None, 0):
            raise InvalidArgument(f"model {self.name!r} returns one tensor, config asks for output {index}")
        if not isinstance(out, Tensor):
            raise InvalidArgument(f"model {self.name!r} returned {type(out).__name__}, not a tensor")
        if out.dim() == 0 or out.shape[0] != args[0].shape[0]:
            raise InvalidArgument(f"model {self.name!r} returned shape {tuple(out.shape)}; the output's dim 0 must index examples")
        if self.output_shape is None:
            self.output_shape = tuple(out.shape[1:])
        return out

    def example_inputs(self) -> tuple[Tensor, ...] | None:
        """One zero example per input when the config pins every dim; None otherwise."""
        specs = self.spec.inputs
        if not specs or not all(s.dims is not None and all(d > 0 for d in s.dims) for s in specs):
            return None
        return tuple(torch.zeros((1, *(s.dims or ())), dtype=s.dtype or torch.float32) for s in specs)  # dims: all set (checked above)

    def warm_up(self) -> None:
        """One forward on zero inputs (when the config pins the shapes), so readiness means the model runs."""
        inputs = self.example_inputs()
        if inputs is not None:
            with torch.no_grad():
                self.forward(*(x.to(self.device) for x in inputs))

    def check_inputs(self, inputs: tuple[Tensor, ...]) -> None:
        specs = self.spec.inputs
        if not specs:
            return
        if len(inputs) != len(specs):
            raise InvalidArgument(f"model {self.name!r} takes {len(specs)} inputs ({', '.join(s.name for s in specs)}), got {len(inputs)}")
        for i, (x, s) in enumerate(zip(inputs, specs)):
            label = f"inputs[{i}] ({s.name!r})"
            if s.dtype is not None and x.dtype != s.dtype:
                raise InvalidArgument(f"{label}: expected dtype {_dtype_name(s.dtype)}, got {_dtype_name(x.dtype)}")
            if s.dims is not None:
                dims = tuple(x.shape[1:])
                ok = len(dims) == len(s.dims) and all(d == -1 or d == g for d, g in zip(s.dims, dims))
                if not ok:
                    want = "(n, " + ", ".join("*" if d == -1 else str(d) for d in s.dims) + ")"
                    raise InvalidArgument(f"{label}: expected shape {want}, got {tuple(x.shape)}")


def _float32(out: Any) -> Any:
    """Autocast outputs back to float32, so targets, deltas and reductions run at full precision."""
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _float32(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_float32(v) for v in out)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class ServedModels:
    """Name/version → LoadedModel. Called from the service (load, lookup) and the engine worker (lookup)."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._default_version: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, model: LoadedModel) -> None:
        with self._lock:
            self._models[model.key] = model
            self._default_version.setdefault(model.name, model.version)

    def get(self, name: str, version: str = "") -> LoadedModel:
        with self._lock:
            if not version:
                version = self._default_version.get(name, "")
            model = self._models.get((name, version))
            if model is None:
                known = sorted({n for n, _ in self._models})
                if name in self._default_version:
                    raise NotFound(f"model {name!r} has no version {version!r}")
                raise NotFound(f"model {name!r} is not served; served models: {', '.join(known) or 'none'}")
            return model

    def all(self) -> list[LoadedModel]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.key)
