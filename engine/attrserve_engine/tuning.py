"""Batch-size probe: measure a model's rows per second at a few pass sizes at load and pick max_batch_rows.

Bigger passes are not always faster (docs/ARCHITECTURE.md, "Pass size": a small CNN on a 2-core CPU peaks
at 100–200 rows and is 3× slower at 1,600), so the size is measured per model
and device, not guessed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch

from attrserve_engine.errors import AttributionError
from attrserve_engine.executor import run_pass
from attrserve_engine.models import LoadedModel
from attrserve_engine.plan import Block, PassKind

log = logging.getLogger(__name__)

SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Pick the smallest size within this share of the best throughput: same work, shorter waits.
GOOD_ENOUGH = 0.9
# Timed runs per size after a warm-up run; the fastest counts (noise only ever slows a run down).
RUNS = 4
# The probe stops past the peak only after this many sizes in a row fall under 70% of the best: one slow
# measurement (another process woke up) must not end it early.
DIPS = 2
# Then the sizes near the best are timed again, in turns, this many rounds: on a plateau (a CNN gains little from
# 256 to 1,024 rows) one noisy sweep would otherwise pick a different size on every start.
CONFIRM_ROUNDS = 3


def first_float_layer(model: LoadedModel, example: tuple[torch.Tensor, ...]) -> str:
    """The first module, in the order a forward calls them, whose output is a floating tensor: for a model of token ids
    its embedding, the layer its gradient methods (LayerIntegratedGradients, ...) take gradients at. "" when there is
    none or hooks cannot see the modules (TorchScript, exported programs)."""
    if model.is_exported or isinstance(model.module, torch.jit.ScriptModule):
        return ""
    names = {m: name for name, m in model.module.named_modules() if name}
    found: list[str] = []

    def seen(module: torch.nn.Module, args: object, output: object) -> None:
        if not found and isinstance(output, torch.Tensor) and output.is_floating_point():
            found.append(names[module])

    model.hooked_forward([(m, seen) for m in names], example)
    return found[0] if found else ""


def _probe_block(inputs: tuple[torch.Tensor, ...], k: int, gradient: bool, layer: str) -> Block:
    """One probe pass of `inputs`' rows, all at target 0: gradients (w.r.t. `layer` when set) or a forward pass."""
    rows, device = inputs[0].shape[0], inputs[0].device
    return Block(
        kind=PassKind.GRADIENT if gradient else PassKind.FORWARD,
        inputs=inputs,
        args=(),
        target=torch.zeros((rows, k), dtype=torch.int64, device=device),
        layer=layer,
        grad_wrt_layer=bool(layer),
    )


def probe_batch_rows(model: LoadedModel, budget_s: float = 1.5) -> dict[int, float] | None:
    """Rows per second of a gradient pass at each size (for integer inputs, gradients at the first floating layer, as
    layer methods take them; forward passes where hooks cannot see one); None if it cannot run."""
    example = model.example_inputs()
    if example is None or model.output_shape is None:
        return None
    k = len(model.output_shape) if math.prod(model.output_shape) > 1 else 0
    float_inputs = all(x.is_floating_point() for x in example)
    layer = "" if float_inputs else first_float_layer(model, example)
    if layer:  # a layer the gradient pass refuses (it runs twice per forward, ...): forward passes, as for TorchScript
        one = _probe_block(tuple(x.to(model.device) for x in example), k, True, layer)
        if isinstance(run_pass(model, [one])[0], AttributionError):
            layer = ""
    g = torch.Generator().manual_seed(0)
    measured: dict[int, float] = {}
    blocks: dict[int, Block] = {}
    spent = 0.0
    dips = 0

    def timed(size: int) -> float | AttributionError:
        start = time.perf_counter()
        outcome = run_pass(model, [blocks[size]])[0]
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return outcome if isinstance(outcome, AttributionError) else time.perf_counter() - start

    for size in SIZES:
        inputs = tuple(
            (
                torch.randn((size, *x.shape[1:]), generator=g, dtype=x.dtype)
                if x.is_floating_point()
                else x.expand(size, *x.shape[1:]).clone()
            ).to(model.device)
            for x in example
        )
        blocks[size] = _probe_block(inputs, k, float_inputs or bool(layer), layer)
        times = []
        for _ in range(1 + RUNS):  # the first run warms the kernels for this shape
            took = timed(size)
            if isinstance(took, AttributionError):
                log.info("batch probe for %s stopped at %d rows: %s", model.name, size, took)
                del blocks[size]
                return _confirmed(measured, blocks, timed, budget_s) if measured else None
            times.append(took)
        measured[size] = size / min(times[1:])
        spent += sum(times)
        best = max(measured.values())
        dips = dips + 1 if measured[size] < 0.7 * best else 0
        if spent > budget_s or dips >= DIPS:  # out of time, or well past the peak
            break
    return _confirmed(measured, blocks, timed, budget_s)


def _confirmed(
    measured: dict[int, float], blocks: dict[int, Block], timed: Callable[[int], float | AttributionError], budget_s: float
) -> dict[int, float]:
    """Time the sizes within reach of the best again, in turns (CONFIRM_ROUNDS, within another `budget_s`), keeping
    each size's fastest run: the choice then rests on each size's best, not on one sweep's luck."""
    spent = 0.0
    for _ in range(CONFIRM_ROUNDS):
        best = max(measured.values())
        for size in [s for s, rate in measured.items() if rate >= 0.75 * best]:
            took = timed(size)
            if isinstance(took, AttributionError):
                return measured
            measured[size] = max(measured[size], size / took)
            spent += took
            if spent > budget_s:
                return measured
    return measured


def pick_batch_rows(measured: dict[int, float]) -> int:
    best = max(measured.values())
    return min(size for size, rate in measured.items() if rate >= GOOD_ENOUGH * best)
