"""The plan interface: an algorithm is a generator that yields blocks of rows and receives their results.

A plan yields a `Block` (or a list of blocks, run concurrently) and is resumed
with the matching `BlockResult` (or list). It returns an `Attribution`. The
scheduler never needs to know which algorithm a row belongs to.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Generator, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from attrserve_engine.events import PassKind


class RulePass(Protocol):
    """Hooks that replace gradients for one pass (installed before the forward, removed after the backward)."""

    def install(self) -> None: ...

    def remove(self) -> None: ...


class RuleOptions(Protocol):
    """A rule pass's settings: a frozen, hashable dataclass (it is part of the batch key) that builds its hooks.

    `rows_per_segment` says how the pass's rows split into requests (rules that look beyond a row need it)."""

    def rules(self, model: nn.Module, rows_per_segment: list[int], device: torch.device) -> RulePass: ...


class Rows:
    """A block's rows made only when a pass takes them: `count` rows of `row_shape` and `dtype`, rows [start, stop)
    built by `make(start, stop)`.

    Perturbation plans yield one row per coalition (a feature ablated, an order's prefix, a window occluded), which
    can be tens of thousands of copies of the input; as Rows a request holds only the rows of the pass that runs them,
    as Captum's perturbations_per_eval holds only one evaluation's. A block field may be a Tensor or Rows; the
    scheduler slices Rows like a tensor (`rows[a:b]` stays lazy) and the executor builds them (`build_rows`).
    """

    def __init__(
        self, count: int, row_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, make: Callable[[int, int], Tensor]
    ) -> None:
        self.count, self.row_shape, self.dtype, self.device, self._make = count, tuple(row_shape), dtype, device, make

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.count, *self.row_shape))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rows: slice) -> Rows:
        start, stop, step = rows.indices(self.count)
        assert step == 1, "Rows are sliced in runs"
        stop = max(start, stop)
        return Rows(stop - start, self.row_shape, self.dtype, self.device, lambda a, b: self._make(start + a, start + b))

    def build(self) -> Tensor:
        return self._make(0, self.count)

    @staticmethod
    def of(t: Tensor) -> Rows:
        """A tensor's rows, as Rows (to join with lazy ones)."""
        return Rows(int(t.shape[0]), tuple(t.shape[1:]), t.dtype, t.device, lambda a, b: t[a:b])

    @staticmethod
    def cat(parts: list[Tensor | Rows]) -> Rows:
        """Parts one after the other (of one row shape and dtype), as torch.cat along dim 0 would join them."""
        lazy = [p if isinstance(p, Rows) else Rows.of(p) for p in parts]
        ends = list(itertools.accumulate(p.count for p in lazy))

        def make(start: int, stop: int) -> Tensor:
            pieces, begin = [], 0
            for part, end in zip(lazy, ends):
                if start < end and stop > begin:
                    pieces.append(part._make(max(start, begin) - begin, min(stop, end) - begin))
                begin = end
            if not pieces:
                return torch.empty((0, *first.row_shape), dtype=first.dtype, device=first.device)
            return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

        first = lazy[0]
        return Rows(ends[-1], first.row_shape, first.dtype, first.device, make)

    @staticmethod
    def repeated(t: Tensor, times: int) -> Rows:
        """`repeat_rows(t, times)` built per pass: row r is t[r % n]."""
        n = int(t.shape[0])
        return Rows(n * times, tuple(t.shape[1:]), t.dtype, t.device, lambda a, b: t[torch.arange(a, b, device=t.device) % n])


# Rows of at most this many bytes are built when the plan yields them: building a pass's share per segment costs
# Python on every pass (bench W4, Occlusion's 65 rows of 12 KiB per request: 3-5% fewer requests per second).
EAGER_ROWS_BYTES = 1 << 20


def settled(rows: Tensor | Rows) -> Tensor | Rows:
    """`rows`, built now when they are small (EAGER_ROWS_BYTES), else left to build a pass at a time."""
    if isinstance(rows, Rows) and rows.count * math.prod(rows.row_shape) * rows.dtype.itemsize <= EAGER_ROWS_BYTES:
        return rows.build()
    return rows


def _rows(**kwargs: Any) -> Any:
    """A Block field holding row tensors: in the batch key by per-row shape and dtype, not by value."""
    return field(metadata={"rows": True}, **kwargs)


@dataclass
class Block:
    """Rows of work of one plan, all of one pass kind.

    NOTE: the batch key (`pass_key`) is every field of this class: settings by value, row tensors by their
    per-row shapes and dtypes. A new field is part of it without further work — rows that differ in it
    never share a pass.
    """

    kind: PassKind
    inputs: tuple[Tensor | Rows, ...] = _rows()  # each (rows, *feature_shape)
    args: tuple[Tensor | Rows, ...] = _rows()  # additional forward args, each (rows, ...)
    target: Tensor = _rows()  # (rows, k) int64 index into the output after dim 0
    # DEEPLIFT: reference rows paired one-to-one with `inputs` (Captum runs
    # cat([inputs, refs]) through the model).
    refs: tuple[Tensor, ...] | None = _rows(default=None)
    # Rule passes: their settings (DeepLiftOptions, GuidedOptions, LrpOptions), which build the hooks.
    options: RuleOptions | None = None
    # Layer passes: the hooked module (dotted path), its input instead of its output,
    # values to substitute for its activations (one per activation tensor, rows
    # aligned with `inputs`), and whether gradients are taken w.r.t. the layer.
    layer: str = ""
    layer_input: bool = False
    layer_values: tuple[Tensor | Rows, ...] | None = _rows(default=None)
    grad_wrt_layer: bool = False
    # False: the plan needs no output at a target (LayerActivation), so none is selected.
    select: bool = True
    # True: the objective is the layer's first activation tensor at `target` (a neuron), not the model's output.
    objective_layer: bool = False
    # True: the plan takes a bool output as numbers (Lime and KernelShap regress on it, cast to float as Captum casts
    # it); other plans are refused a bool output (Captum subtracts or differentiates outputs, and raises).
    bool_output: bool = False

    @property
    def rows(self) -> int:
        n = int(self.inputs[0].shape[0])
        return 2 * n if self.refs is not None else n

    @property
    def splittable(self) -> bool:
        # NOTE: DeepLift's Softmax/MaxPool rules look at the whole Captum batch,
        # so a paired block must run in one pass to reproduce Captum.
        return self.refs is None

    @property
    def pass_key(self) -> tuple[Hashable, ...]:
        """What rows must share to be fused: every field (see the class NOTE)."""
        return tuple(_row_signature(getattr(self, f.name)) if f.metadata.get("rows") else getattr(self, f.name) for f in _BLOCK_FIELDS)


def _row_signature(value: Tensor | Rows | tuple[Tensor | Rows, ...] | None) -> Hashable:
    if value is None:
        return None
    if isinstance(value, (Tensor, Rows)):
        return (tuple(value.shape[1:]), value.dtype)
    return tuple((tuple(t.shape[1:]), t.dtype) for t in value)


_BLOCK_FIELDS = dataclasses.fields(Block)


@dataclass
class BlockResult:
    outputs: Tensor  # (rows, *output_shape) the explained model output, detached
    selected: Tensor | None  # (rows,) the output at each row's target; None for blocks with select=False
    grads: tuple[Tensor, ...] | None = None  # GRADIENT/DEEPLIFT: d selected / d inputs, per input
    layer_activations: tuple[Tensor, ...] | None = None  # layer passes: the layer's activations (or the substituted values)
    layer_grads: tuple[Tensor, ...] | None = None  # grad_wrt_layer: d selected / d activations


@dataclass
class Attribution:
    """What a plan returns."""

    attributions: tuple[Tensor, ...]
    convergence_delta: Tensor | None = None
    outputs: Tensor | None = None  # the model's explained output for the inputs, when asked for


# An algorithm's plan yields a Block or a list of blocks (run concurrently) and gets the matching BlockResult(s);
# the engine drives every plan through `concurrently`, so the scheduler only ever sees lists.
PlanYield = Block | list
_R = TypeVar("_R")
PlanOf = Generator[PlanYield, Any, _R]  # a plan that returns _R (a metric's returns a tensor)
Plan = PlanOf[Attribution]  # an algorithm's plan
# What the scheduler drives: `concurrently` over a job's plans, which returns each plan's value in order.
JobPlan = Generator[list[Block], list[BlockResult], list]


@dataclass
class RequestRNG:
    """A request's own generators, seeded like Captum's global ones.

    NOTE: draws must happen in Captum's order (numpy then torch, per method)
    for a seeded request to reproduce Captum exactly.
    """

    seed: int

    @functools.cached_property
    def torch_gen(self) -> torch.Generator:
        # Built on first use, as numpy_gen: most methods never draw (a generator cost the engine's event loop 5% of its
        # samples at bench W1, IntegratedGradients: bench/RESULTS.md, issue 12 step 32).
        return torch.Generator(device="cpu").manual_seed(self.seed)

    @functools.cached_property
    def numpy_gen(self) -> np.random.RandomState:
        # Built on first use: seeding a RandomState costs ~0.13 ms, and most methods never draw from numpy.
        return np.random.RandomState(self.seed)


@dataclass
class Task:
    """A formatted request as algorithms see it; all tensors on the model's device."""

    inputs: tuple[Tensor, ...]  # each (n, *feature_shape)
    # One per input, each (b, *feature_shape) with b in {1, n, m}: a single
    # baseline, one per example, or (GradientShap) a distribution of m.
    baselines: tuple[Tensor, ...]
    target: Tensor  # (n, k) int64
    args: tuple[Tensor, ...]  # each (n, ...)
    params: Any
    rng: RequestRNG
    return_convergence_delta: bool = False
    # One per input or none: int64 feature ids, each (1 or n, *feature_shape) (perturbation methods).
    feature_masks: tuple[Tensor, ...] = ()
    layer: str = ""  # dotted module path (layer methods)
    deadline: float | None = None  # the request's (time.monotonic()); long reductions on the worker stop at it

    @property
    def n(self) -> int:
        return int(self.inputs[0].shape[0])

    def to(self, device: torch.device) -> Task:
        move = _mover(device)
        return self.replace(
            inputs=tuple(map(move, self.inputs)),
            baselines=tuple(map(move, self.baselines)),
            target=move(self.target),
            args=tuple(map(move, self.args)),
            feature_masks=tuple(map(move, self.feature_masks)),
        )

    def replace(self, **changes: Any) -> Task:
        values = dict(self.__dict__)
        values.update(changes)
        return Task(**values)


def repeat_rows(t: Tensor, times: int) -> Tensor:
    """Captum's ExpansionTypes.repeat: [t; t; ...] (step-major)."""
    return torch.cat([t] * times, dim=0) if times > 1 else t


def interleave_rows(t: Tensor, times: int) -> Tensor:
    """Captum's ExpansionTypes.repeat_interleave: each row `times` times in a row."""
    return t.repeat_interleave(times, dim=0) if times > 1 else t


def slice_block(block: Block, start: int, stop: int) -> Block:
    """Rows [start, stop) of a splittable block."""
    assert block.refs is None, "paired blocks are never split"
    return dataclasses.replace(
        block,
        inputs=tuple(x[start:stop] for x in block.inputs),
        args=tuple(a[start:stop] for a in block.args),
        target=block.target[start:stop],
        layer_values=None if block.layer_values is None else tuple(v[start:stop] for v in block.layer_values),
    )


def build_rows(block: Block) -> Block:
    """The block with its lazy fields (`Rows`) built into tensors; the block itself when it has none."""
    fields = {"inputs": block.inputs, "args": block.args, "layer_values": block.layer_values or ()}
    if not any(isinstance(t, Rows) for ts in fields.values() for t in ts):
        return block
    built = {name: tuple(t.build() if isinstance(t, Rows) else t for t in ts) for name, ts in fields.items()}
    return dataclasses.replace(
        block, inputs=built["inputs"], args=built["args"], layer_values=built["layer_values"] if block.layer_values is not None else None
    )


def concat_results(parts: list[BlockResult]) -> BlockResult:
    """Re-join the results of a block's slices, in row order."""
    if len(parts) == 1:
        return parts[0]

    def joined(field: str) -> tuple[Tensor, ...] | None:
        first = getattr(parts[0], field)
        return None if first is None else tuple(torch.cat([getattr(p, field)[i] for p in parts]) for i in range(len(first)))

    selected = [p.selected for p in parts if p.selected is not None]  # all or none: the parts of one block
    return BlockResult(
        outputs=torch.cat([p.outputs for p in parts]),
        selected=torch.cat(selected) if selected else None,
        grads=joined("grads"),
        layer_activations=joined("layer_activations"),
        layer_grads=joined("layer_grads"),
    )


def concurrently(plans: list[PlanOf[Any]]) -> JobPlan:
    """Drive several plans as one: each round yields every live plan's blocks together, so they share passes.

    Always yields a list (the scheduler's one protocol); returns each plan's return value, in order.
    """
    returned: list = [None] * len(plans)
    pending: dict[int, tuple[bool, list[Block]]] = {}  # plan index → (yielded a list?, its blocks)

    def advance(i: int, sent: Any) -> None:
        try:
            yielded = plans[i].send(sent)
        except StopIteration as stop:
            returned[i] = stop.value
            return
        pending[i] = (isinstance(yielded, list), yielded if isinstance(yielded, list) else [yielded])

    for i in range(len(plans)):
        advance(i, None)
    while pending:
        order = list(pending.items())
        results = yield [block for _, (_, blocks) in order for block in blocks]
        pending = {}
        offset = 0
        for i, (as_list, blocks) in order:
            mine = results[offset : offset + len(blocks)]
            offset += len(blocks)
            advance(i, mine if as_list else mine[0])
    return returned


def _mover(device: torch.device) -> Callable[[Tensor], Tensor]:
    """Host → device copies: through pinned memory and without blocking the worker when the device is a GPU."""
    if device.type != "cuda":
        return lambda t: t if t.device == device else t.to(device)

    def move(t: Tensor) -> Tensor:
        if t.device == device:
            return t
        resident = getattr(t, "device_copies", None)  # a shared constant (formatting.constant_baseline)
        if resident is not None:
            if device not in resident:
                resident[device] = t.to(device)
            return resident[device]
        return t.pin_memory().to(device, non_blocking=True)

    return move
