"""The models an engine serves: loads model folders (eager `model.py`, TorchScript `model.pt` or a torch.export program
`model.pt2`) and keeps them resident."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attrserve_engine.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, shown
from attrserve_engine.events import ModelState, version_order
from attrserve_engine.job import InputCast
from attrserve_engine.limits import cpu_limit
from attrserve_engine.user_code import import_file

log = logging.getLogger(__name__)


@dataclass
class InputSpec:
    name: str
    dtype: torch.dtype | None = None  # None: any dtype
    dims: tuple[int, ...] | None = None  # per example; -1 = any size; None: any shape

    def dims_problem(self, i: int) -> str | None:
        """What is wrong with the dims of this input (inputs[`i`]): a dim other than a positive size or -1; None: nothing.
        The engine (LoadedModel) and the repository (a config.pbtxt, as it is read) refuse it with it."""
        bad = [(j, d) for j, d in enumerate(self.dims or ()) if d != -1 and d <= 0]
        if not bad:
            return None
        j, d = bad[0]
        return f"inputs[{i}] ({self.name!r}) dims[{j}] is {d}: each dim is a positive size, or -1 for any size"


@dataclass
class ModelSpec:
    """Everything the engine needs to load and serve one model version.

    The service builds it from `config.pbtxt`; tests may pass `module` directly.
    """

    name: str
    version: str = "1"
    path: Path | None = None  # model folder
    platform: str = ""  # "pytorch_eager" | "torchscript" | "torch_export" | "" (detect from the folder)
    inputs: list[InputSpec] = field(default_factory=list)
    max_batch_rows: int = 0  # 0: engine default
    max_queue_delay_us: int = 0  # 0: engine default
    device: str = ""  # "auto" | "cpu" | "cuda[:i]" | "" (engine default)
    output_index: int | None = None
    output_key: str | None = None
    description: str = ""
    precision: str = ""  # autocast dtype for passes: "" / "float32", "bfloat16", "float16"
    max_queued_rows: int = 0  # admission bound on rows accepted and not computed; 0: server default
    max_queued_bytes: int = 0  # admission bound on their estimated bytes; 0: server default
    strict_input_dtypes: bool = False  # refuse, rather than cast, a floating input in another floating dtype
    intra_op_threads: int = 0  # torch intra-op threads of the model's CPU passes; 0: the engine's
    instances: int = 0  # copies of the model that run passes at the same time; 0: one
    memory_format: str = ""  # layout of 4-D tensors in passes: MEMORY_FORMATS (tuning.choose_memory_format)
    module: nn.Module | None = None  # an already-built model (tests, embedding in other programs)
    # Names, sizes and modification times of the files it was read from (the repository's); "" when unknown (a module
    # built in code). Equal fingerprints: the same model, so an earlier load's pass-size rates hold
    # (tuning.probe_key).
    fingerprint: str = ""
    # The model repository that holds it: what clients read of its failure names its files from there ("m/1/model.py");
    # None: from its folder's parent
    repository: Path | None = None


_AUTOCAST = {"": None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_FORMATS = ("", "auto", "contiguous", "channels_last_forward", "channels_last")


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
    detected = [p for f, p in (("model.pt", "torchscript"), ("model.pt2", "torch_export")) if (folder / f).exists()]
    platform = spec.platform or (detected + ["pytorch_eager"])[0]
    if platform == "torchscript":
        if not (folder / "model.pt").exists():
            raise NotFound(f"model folder {folder} is configured as TorchScript but has no model.pt")
        return torch.jit.load(str(folder / "model.pt"), map_location="cpu")
    if platform == "torch_export":
        # torch.export.save(torch.export.export(model.eval(), args, dynamic_shapes=...), "model.pt2"): one graph, hooks
        # only on the whole module (its layers are inlined), the train/eval mode fixed at export.
        path = folder / "model.pt2"
        if not path.exists():
            raise NotFound(f"model folder {folder} is configured as a torch.export program but has no model.pt2")
        program = torch.export.load(str(path))
        for node in program.graph.find_nodes(op="placeholder"):
            if node.name not in program.graph_signature.user_inputs or not isinstance(node.meta.get("val"), Tensor):
                continue
            batch = node.meta["val"].shape[0] if node.meta["val"].dim() else None
            limits = program.range_constraints.get(batch.node.expr) if isinstance(batch, torch.SymInt) else None
            bounded = limits is not None and float(limits.upper) != float("inf")
            if not isinstance(batch, torch.SymInt) or bounded:
                raise InvalidArgument(
                    f"{path}: input {node.name!r} has a {'bounded' if bounded else 'fixed'} batch size (dim 0: {batch}); the "
                    "server runs passes of any number of rows, so export with an unbounded dynamic dim 0 from an example "
                    'of 2 or more rows: dynamic_shapes=({0: torch.export.Dim("batch")},)'
                )
        from torch.export.passes import move_to_device_pass  # rewrites the devices the graph names, as .to() does not

        module = move_to_device_pass(program, resolve_device(spec.device)).module()

        def exported_mode(mode: bool = True) -> nn.Module:  # .module() makes eval() raise; the mode is the one exported
            return module

        module.eval = exported_mode  # type: ignore[method-assign,assignment]
        return module
    source = folder / "model.py"
    if not source.exists():
        raise NotFound(f"model folder {folder} is configured as eager PyTorch but has no model.py")
    py_module = import_file(source, f"attrserve_model_{spec.name}")
    build: Callable[[], nn.Module] | None = getattr(py_module, "build_model", None)
    if build is None:
        raise InvalidArgument(f"{source} defines no build_model()")
    model = build()
    if not isinstance(model, nn.Module):  # (a build_model() without its `return`: None)
        raise InvalidArgument(f"{source}: build_model() returned {type(model).__name__}, not a torch.nn.Module")
    weights = folder / "weights.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model


@contextlib.contextmanager
def _torch_defaults_kept() -> Iterator[None]:
    """torch's process-wide defaults put back as they were after a model's code ran: a model.py that sets them
    (torch.set_default_dtype(torch.float64), torch.set_float32_matmul_precision("high")) set them for every model the
    process serves and for the engine's own tensors, and the loads after it failed."""
    dtype, precision = torch.get_default_dtype(), torch.get_float32_matmul_precision()
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)
        torch.set_float32_matmul_precision(precision)


def example_bytes(tensors: tuple[Tensor, ...]) -> int:
    """Bytes of one example of `tensors` (each (n, ...), the n examples of a request): what each row of its work holds."""
    n = max(int(tensors[0].shape[0]), 1) if tensors else 1
    return sum(t.numel() * t.element_size() for t in tensors) // n


_RNN_MODES = ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")


def _is_rnn(module: nn.Module) -> bool:
    """An nn.LSTM/GRU/RNN, or one compiled by torch.jit.script whose training mode changes nothing but dropout: in
    TorchScript dropout is a constant, so a scripted RNN counts only where it drops nothing (dropout 0 or one
    layer); one that would drop (`_drops_when_trained`) is left in eval mode."""
    if isinstance(module, nn.RNNBase):
        return True
    return _is_scripted_rnn(module) and not _drops_when_trained(module)


def _is_scripted_rnn(module: nn.Module) -> bool:
    scripted = isinstance(module, torch.jit.ScriptModule)
    return scripted and getattr(module, "mode", None) in _RNN_MODES and hasattr(module, "_flat_weights_names")


def _drops_when_trained(module: nn.Module) -> bool:
    """A scripted RNN whose constant dropout would drop in training mode (more than one layer, dropout > 0)."""
    return _is_scripted_rnn(module) and bool(module.dropout) and getattr(module, "num_layers", 1) > 1


class LoadedModel:
    """A model resident on its device, with what the engine knows about it."""

    def __init__(self, spec: ModelSpec, default_max_batch_rows: int, default_max_queue_delay_us: int, default_threads: int = 0) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = spec.version or "1"
        self.device = resolve_device(spec.device)
        # Torch intra-op threads of this model's passes (executor._fused_pass sets them on CPU), fixed for the model:
        # a convolution's numbers depend on the count, and a request's must not depend on its pass's company.
        cores = len(os.sched_getaffinity(0))
        for i, s in enumerate(spec.inputs):  # (a repository's config.pbtxt is checked as it is read: RepositoryError)
            if problem := s.dims_problem(i):
                raise InvalidArgument(f"model {spec.name!r}: {problem}")
        if spec.intra_op_threads < 0:
            raise InvalidArgument(
                f"model {spec.name!r}: intra_op_threads {spec.intra_op_threads}: use 0 (the engine's count) or a number of threads"
            )
        if spec.intra_op_threads > 4 * cores:
            raise InvalidArgument(
                f"model {spec.name!r}: intra_op_threads {spec.intra_op_threads} is more than 4 per core "
                f"({cores} cores here); 0 takes the engine's count"
            )
        usable = cpu_limit()
        if spec.intra_op_threads > math.ceil(usable):
            log.warning(
                "model %s: intra_op_threads %d is more than the %.3g cores this process may use (its CPU affinity and CPU "
                "quota): its passes' threads will wait for cores, or for the quota",
                spec.name,
                spec.intra_op_threads,
                usable,
            )
        self.intra_op_threads = spec.intra_op_threads or default_threads or torch.get_num_threads()
        if self.device.type == "cuda":
            # NOTE: TF32 convolutions trade ~1e-3 relative error for speed; attributions must equal Captum's fp32 numbers.
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        with _torch_defaults_kept():
            module = _load_module(spec)
        self.module = module.to(self.device).eval()
        # Reduced-precision forward/backward (autocast), per model: "" / "float32" (default), "bfloat16", "float16".
        self.autocast_dtype = _AUTOCAST.get(spec.precision)
        if spec.precision not in _AUTOCAST:
            raise InvalidArgument(
                f"model {spec.name!r}: precision {spec.precision!r} is not one of {', '.join(repr(k) for k in _AUTOCAST)}"
            )
        if spec.memory_format not in MEMORY_FORMATS:
            raise InvalidArgument(
                f"model {spec.name!r}: memory_format {spec.memory_format!r} is not one of {', '.join(repr(k) for k in MEMORY_FORMATS)}"
            )
        # Every pass lays 4-D floating tensors out channels_last (and the replicas' 4-D weights) when this is set (the
        # spec's opt-in); forward passes alone (not their weights) when the second is (tuning.choose_memory_format).
        self.channels_last = False
        self.forward_channels_last = False
        self.max_batch_rows = spec.max_batch_rows or default_max_batch_rows
        self.max_queue_delay_s = (spec.max_queue_delay_us or default_max_queue_delay_us) / 1e6
        self.is_torchscript = isinstance(self.module, torch.jit.ScriptModule)
        # A torch.export program's .module(): one graph (its layers inlined) that checks its arguments against the exported ones.
        self.is_exported = any(c.__name__ == "_StatefulGraphModule" for c in type(self.module).__mro__)
        # What a layer method may name (none in an exported program: its submodules are never called).
        self.layers = [] if self.is_exported else [name for name, _ in self.module.named_modules() if name]
        # Per-example shape of the explained output, learned at warm-up, and only there: where the config pins every
        # input dim (no other shape passes check_inputs). A client's pass may have inputs of any shape the model takes, and
        # its output then says nothing of the next request's (the first request's shape was kept for every later one).
        self.output_shape: tuple[int, ...] | None = None
        self.ready = False
        # Algorithms that failed on this model at warm-up, with why.
        self.unsupported: dict[str, str] = {}
        # Algorithm.refusal's answers by (algorithm, input dtypes): capability rules run once per model.
        self.refusals: dict[tuple, str | None] = {}
        # Rows per second by pass size, when max_batch_rows was measured at load (tuning.py).
        self.batch_probe: dict[int, float] = {}
        # Admission (Scheduler.submit): bounds on the work accepted and not yet computed (0 for rows: 2 s of
        # work at the measured rate, see Scheduler.row_bound), set by the engine from the spec or its limits.
        self.max_queued_rows = spec.max_queued_rows
        self.max_queued_bytes = spec.max_queued_bytes
        # Per layer (dotted path), the bytes of one example's output or input of it, whichever is larger: what a layer
        # method's row holds (measured at load when the inputs are pinned).
        self.layer_bytes: dict[str, int] = {}
        # Per layer, how many positional inputs its forward takes and how many outputs it returns (measured at load with
        # layer_bytes): a neuron method's selector indexes one tensor, so a layer of several is refused before any pass.
        self.layer_tensors: dict[str, tuple[int, int]] = {}
        # Measured rows/s of one replica: the probe's best, then every near-full pass of any kind (smoothed); None until
        # something ran. Admission and the pass budget read the scheduler's rates per pass kind, and this one only until
        # a pass ran (Scheduler._rate).
        self.rows_per_second: float | None = None
        # Seconds a row of its passes took, smoothed over every pass, small ones too (which pay fixed costs, so this
        # overstates a large pass's time: what the stuck-pass rule wants, Scheduler.give_up_stuck_pass); None until a
        # pass ran.
        self.row_seconds: float | None = None
        for p in self.module.parameters():
            p.requires_grad_(False)
        # Copies that run passes at the same time (ModelSpec.instances; the scheduler hands each pass a free one).
        # Hooks are module state, so two passes at once need two modules; the first copy is `module` itself.
        if spec.instances > 4 * cores:
            raise InvalidArgument(f"model {spec.name!r}: instances {spec.instances} is more than 4 per core ({cores} cores here)")
        try:
            self.replicas: list[nn.Module] = [self.module] + [copy.deepcopy(self.module) for _ in range(spec.instances - 1)]
        except Exception as e:
            why = f"instances {spec.instances} needs copies of the model, and it cannot be copied: {e}"
            raise InvalidArgument(f"model {spec.name!r}: {why}") from e
        self.instances = len(self.replicas)
        # Each replica's LSTM/GRU/RNN modules (executor.RnnTrainingMode: cuDNN takes their gradients in training mode only),
        # and the scripted ones that would drop there, which cuDNN cannot take a gradient of (executor.rnn_gradient_refusal).
        self._rnns = {id(r): [m for m in r.modules() if _is_rnn(m)] for r in self.replicas}
        self.dropping_rnns = [(name, m) for name, m in self.module.named_modules() if _drops_when_trained(m)]

    def lay_out(self, channels_last: bool) -> None:
        """Every replica's 4-D parameters and buffers in channels_last, or back in the contiguous layout."""
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        for replica in self.replicas:
            replica.to(memory_format=fmt)  # type: ignore[call-overload]  # Module.to takes it; its stubs do not say so
        self.channels_last = channels_last

    @property
    def memory_format(self) -> str:
        """The layout its passes run in, as a config names it (GetModel)."""
        return "channels_last" if self.channels_last else "channels_last_forward" if self.forward_channels_last else "contiguous"

    def laid_out(self, x: Tensor, forward: bool) -> Tensor:
        """A pass's input in the model's layout: a 4-D floating tensor in channels_last where the model runs so, every
        pass or (`forward`: a pass without gradients) its forward passes."""
        if (self.channels_last or (forward and self.forward_channels_last)) and x.dim() == 4 and x.is_floating_point():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def rnns(self, module: nn.Module) -> list[nn.Module]:
        """The recurrent modules (nn.LSTM, nn.GRU, nn.RNN, scripted or not) inside one of `replicas`."""
        return self._rnns.get(id(module), [])

    @property
    def key(self) -> tuple[str, str]:
        return (self.name, self.version)

    def forward(self, *args: Tensor, module: nn.Module | None = None) -> Tensor:
        """Run the model (or one of its `replicas`) and pick the explained output (tuple index or dict key)."""
        module = self.module if module is None else module
        if self.autocast_dtype is None:
            out: Any = module(*args)
        else:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = module(*args)
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
        return out

    def example_inputs(self) -> tuple[Tensor, ...] | None:
        """One zero example per input when the config pins every dim; None otherwise, and where forward needs more
        positional arguments than the inputs (additional_forward_args, such as a padding mask: no config describes them,
        so the load-time passes cannot make them up and the model is served as one with open shapes)."""
        specs = self.spec.inputs
        if not specs or not all(s.dims is not None and all(d > 0 for d in s.dims) for s in specs):
            return None
        if _required_positional(self.module) > len(specs):
            return None
        return tuple(torch.zeros((1, *(s.dims or ())), dtype=s.dtype or torch.float32) for s in specs)  # dims: all set (checked above)

    def warm_up(self) -> None:
        """One forward on zero inputs (when the config pins the shapes), so readiness means the model runs."""
        inputs = self.example_inputs()
        if inputs is not None:
            with torch.no_grad():
                self.output_shape = tuple(self.forward(*(x.to(self.device) for x in inputs)).shape[1:])

    def measure_layers(self) -> None:
        """`layer_bytes` for one example (pinned shapes only): every module's larger of its inputs' and outputs' bytes; and
        `layer_tensors`: how many inputs and outputs it has (as a layer hook sees them: positional inputs, a tuple's items)."""
        inputs = self.example_inputs()
        if inputs is None:
            return

        def nbytes(value: Any) -> int:
            return sum(
                t.numel() * t.element_size() for t in (value if isinstance(value, (tuple, list)) else (value,)) if isinstance(t, Tensor)
            )

        def count(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                self.layer_bytes[name] = max(self.layer_bytes.get(name, 0), nbytes(output), nbytes(args))
                self.layer_tensors[name] = (len(args), len(output) if isinstance(output, tuple) else 1)

            return hook

        named = [(name, m) for name, m in self.module.named_modules() if not isinstance(m, torch.jit.ScriptModule)]
        self.hooked_forward([(m, count(name)) for name, m in named], inputs)

    def hooked_forward(self, hooks: list[tuple[nn.Module, Callable[..., None]]], inputs: tuple[Tensor, ...]) -> None:
        """One forward of `inputs` without autograd, with each (module, forward hook) installed for it only."""
        handles = [module.register_forward_hook(hook) for module, hook in hooks]
        try:
            with torch.no_grad():
                self.forward(*(x.to(self.device) for x in inputs))
        finally:
            for h in handles:
                h.remove()

    def conform_inputs(self, inputs: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], tuple[InputCast, ...]]:
        """Check inputs against the pinned specs. A floating input in another floating dtype than the one pinned (numpy's
        default float64 for a float32 model) is cast to it, unless the config sets strict_input_dtypes; returns the
        inputs to compute on and the casts made. Integer inputs are never cast (token ids are not numbers)."""
        specs = self.spec.inputs
        if not specs:
            return inputs, ()
        if len(inputs) != len(specs):
            raise InvalidArgument(f"model {self.name!r} takes {len(specs)} inputs ({', '.join(s.name for s in specs)}), got {len(inputs)}")
        out, casts = list(inputs), []
        for i, (x, s) in enumerate(zip(inputs, specs)):
            label = f"inputs[{i}] ({s.name!r})"
            if s.dtype is not None and x.dtype != s.dtype:
                if not (x.dtype.is_floating_point and s.dtype.is_floating_point):
                    raise InvalidArgument(f"{label}: expected dtype {_dtype_name(s.dtype)}, got {_dtype_name(x.dtype)}")
                if self.spec.strict_input_dtypes:
                    raise InvalidArgument(
                        f"{label}: expected dtype {_dtype_name(s.dtype)}, got {_dtype_name(x.dtype)} "
                        f"(model {self.name!r} sets strict_input_dtypes, so floating inputs are not cast)"
                    )
                out[i] = x.to(s.dtype)
                casts.append(InputCast(i, _dtype_name(x.dtype), _dtype_name(s.dtype)))
            if s.dims is not None:
                dims = tuple(x.shape[1:])
                ok = len(dims) == len(s.dims) and all(d == -1 or d == g for d, g in zip(s.dims, dims))
                if not ok:
                    want = "(n, " + ", ".join("*" if d == -1 else str(d) for d in s.dims) + ")"
                    raise InvalidArgument(f"{label}: expected shape {want}, got {tuple(x.shape)}")
        return tuple(out), tuple(casts)


def _required_positional(module: nn.Module) -> int:
    """How many positional arguments `module`'s forward cannot do without (0 where its signature does not say)."""
    if isinstance(module, torch.jit.ScriptModule):
        schema = getattr(getattr(module, "forward", None), "schema", None)  # arguments[0] is self
        return sum(not a.has_default_value() and not a.kwarg_only for a in schema.arguments[1:]) if schema else 0
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return 0
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is inspect.Parameter.empty for p in parameters)


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


@dataclass(eq=False)
class LoadAttempt:
    """One load of a version (ServedModels.begin_load), from its start until it returns or is given up as stuck."""

    key: tuple[str, str]
    started: float  # time.monotonic()
    returned: bool = False
    given_up: bool = False


@dataclass
class ModelRecord:
    """One model version the engine knows of: its state, why it is not ready, and the load that serves."""

    name: str
    version: str
    state: ModelState
    reason: str = ""
    model: LoadedModel | None = None  # the load that serves (READY, UNLOADING, or READY while a reload runs)
    spec: ModelSpec | None = None  # what was asked for (None: its config could not even be read)
    attempt: LoadAttempt | None = None  # the last load that began for it (a stuck one serves if it returns: late_loaded)


class ServedModels:
    """(name, version) → ModelRecord. Loads and unloads change records from the service's threads; requests
    look models up from the event loop; the worker looks them up after a restart. One lock guards all.

    A request that names no version gets the newest READY one."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], ModelRecord] = {}
        self._lock = threading.Lock()
        # Rebuilt on every change (rare), read on every request: each name's records, oldest version first.
        self._by_name: dict[str, list[ModelRecord]] = {}
        self._names: frozenset[str] = frozenset()
        # Loads given up as stuck whose threads still run, by version: no new load of it starts until its returns.
        self._stuck: dict[tuple[str, str], LoadAttempt] = {}

    def _reindex(self) -> None:
        """After a change to _records (holding the lock)."""
        by_name: dict[str, list[ModelRecord]] = {}
        for (name, _), record in self._records.items():
            by_name.setdefault(name, []).append(record)
        for versions in by_name.values():
            versions.sort(key=lambda r: version_order(r.version))
        self._by_name, self._names = by_name, frozenset(by_name)

    # -- lifecycle (Engine.load / unload) ----------------------------------------
    def begin_load(self, spec: ModelSpec) -> LoadAttempt:
        """A load of spec's version starts; while a previous load serves, it keeps serving. FailedPrecondition while an
        earlier load of the version, given up as stuck, still runs: its code may still hold what a second one needs."""
        key = (spec.name, spec.version or "1")
        now = time.monotonic()
        with self._lock:
            stuck = self._stuck.get(key)
            if stuck is not None:
                raise FailedPrecondition(
                    f"model {key[0]!r} version {key[1]!r}: its load started {now - stuck.started:.0f} s ago was given up as "
                    "stuck and has not returned (it serves if it does); it is not loaded again until then (a restart ends it)"
                )
            attempt = LoadAttempt(key, now)
            record = self._records.get(key)
            if record is None or record.model is None or record.state != ModelState.READY:
                self._records[key] = ModelRecord(key[0], key[1], ModelState.LOADING, spec=spec, attempt=attempt)
                self._reindex()
            else:
                record.attempt = attempt
            return attempt

    def give_up_load(self, attempt: LoadAttempt) -> bool:
        """Give a load up as stuck, unless it has just returned (False). Its version is not loaded again until it does."""
        with self._lock:
            if attempt.returned:
                return False
            attempt.given_up = True
            self._stuck[attempt.key] = attempt
            return True

    def load_returned(self, attempt: LoadAttempt) -> bool:
        """A load's code returned (or raised): True while its caller still waits for it. False when it had been given
        up: its version may be loaded again, and what it built serves only through late_loaded."""
        with self._lock:
            attempt.returned = True
            if attempt.given_up:
                if self._stuck.get(attempt.key) is attempt:
                    del self._stuck[attempt.key]
                return False
            return True

    def late_loaded(self, model: LoadedModel, attempt: LoadAttempt) -> tuple[bool, LoadedModel | None]:
        """A load given up as stuck returned with `model`: it serves from now on, unless its version was unloaded or
        loaded again meanwhile. (Whether it serves, and the load it replaces.)"""
        with self._lock:
            record = self._records.get(attempt.key)
            if record is None or record.attempt is not attempt:
                return False, None
            return True, self._install(model)

    def loaded(self, model: LoadedModel) -> LoadedModel | None:
        """The load is warm: it serves from now on. Returns the load it replaces (to be drained), if any."""
        with self._lock:
            return self._install(model)

    def _install(self, model: LoadedModel) -> LoadedModel | None:
        previous = self._records.get(model.key)
        self._records[model.key] = ModelRecord(model.name, model.version, ModelState.READY, model=model, spec=model.spec)
        self._reindex()
        return previous.model if previous is not None and previous.model is not model else None

    def load_failed(self, name: str, version: str, reason: str, spec: ModelSpec | None = None) -> None:
        """A load failed: the version is UNAVAILABLE with the reason, unless a previous load still serves it."""
        key = (name, version or "1")
        with self._lock:
            record = self._records.get(key)
            if record is not None and record.model is not None and record.state == ModelState.READY:
                record.reason = f"its last reload failed, the previous load serves: {reason}"
            else:
                attempt = record.attempt if record is not None else None
                self._records[key] = ModelRecord(key[0], key[1], ModelState.UNAVAILABLE, reason=reason, spec=spec, attempt=attempt)
                self._reindex()

    def begin_unload(self, name: str, version: str) -> LoadedModel | None:
        """New requests for this version are refused from now on; returns the load to drain (None if none)."""
        with self._lock:
            record = self._records.get((name, version))
            if record is None:
                return None
            record.state, record.reason = ModelState.UNLOADING, "being unloaded"
            return record.model

    def remove(self, name: str, version: str) -> None:
        with self._lock:
            self._records.pop((name, version), None)
            self._reindex()

    # -- lookups -------------------------------------------------------------------
    def get(self, name: str, version: str = "") -> LoadedModel:
        """The load that serves a request: the named version, or the newest READY one."""
        with self._lock:
            record = self._find(name, version)
            if record.state == ModelState.READY and record.model is not None:
                return record.model
            if record.state == ModelState.LOADING:
                raise Unavailable(f"model {name!r} version {record.version!r} is still loading; retry")
            if record.state == ModelState.UNLOADING:
                raise Unavailable(f"model {name!r} version {record.version!r} is being unloaded")
            raise Unavailable(f"model {name!r} version {record.version!r} cannot serve: {record.reason}")

    def record(self, name: str, version: str = "") -> ModelRecord:
        """The record of the named version, or of the version a request naming none would get (GetModel)."""
        with self._lock:
            return self._find(name, version)

    def _find(self, name: str, version: str) -> ModelRecord:
        versions = self._by_name.get(name, [])
        if not versions:
            known = sorted(self._names)
            raise NotFound(f"model {shown(name)} is not served; served models: {', '.join(known) or 'none'}")
        if version:
            for record in versions:
                if record.version == version:
                    return record
            raise NotFound(f"model {name!r} has no version {shown(version)}; it has {', '.join(r.version for r in versions)}")
        ready = [r for r in versions if r.state == ModelState.READY]
        return (ready or versions)[-1]

    def records(self) -> list[ModelRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: (r.name, version_order(r.version)))

    def names(self) -> frozenset[str]:
        """The model names known (any state); read on every request, so kept ready-made."""
        return self._names

    def all(self) -> list[LoadedModel]:
        """The loads that serve (READY), by name and version."""
        return [r.model for r in self.records() if r.state == ModelState.READY and r.model is not None]
