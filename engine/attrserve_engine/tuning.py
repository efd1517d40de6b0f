"""Batch-size probe: measure a model's rows per second at a few pass sizes at load and pick max_batch_rows.

Bigger passes are not always faster (docs/ARCHITECTURE.md, "Pass size": a small CNN on a 2-core CPU peaks
at 100–200 rows and is 3× slower at 1,600), so the size is measured per model
and device, not guessed.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from attrserve_engine.errors import AttributionError
from attrserve_engine.executor import run_pass
from attrserve_engine.models import LoadedModel
from attrserve_engine.plan import Block, PassKind

log = logging.getLogger(__name__)

SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Pick the smallest size within this share of the best throughput: same work, shorter waits.
GOOD_ENOUGH = 0.9


def probe_batch_rows(model: LoadedModel, budget_s: float = 1.5) -> dict[int, float] | None:
    """Rows per second of a gradient pass (forward pass for integer inputs) at each size; None if it cannot run."""
    example = model.example_inputs()
    if example is None or model.output_shape is None:
        return None
    k = len(model.output_shape) if math.prod(model.output_shape) > 1 else 0
    float_inputs = all(x.is_floating_point() for x in example)
    g = torch.Generator().manual_seed(0)
    measured: dict[int, float] = {}
    spent = 0.0
    for size in SIZES:
        inputs = tuple(
            (
                torch.randn((size, *x.shape[1:]), generator=g, dtype=x.dtype)
                if x.is_floating_point()
                else x.expand(size, *x.shape[1:]).clone()
            ).to(model.device)
            for x in example
        )
        block = Block(
            kind=PassKind.GRADIENT if float_inputs else PassKind.FORWARD,
            inputs=inputs,
            args=(),
            target=torch.zeros((size, k), dtype=torch.int64, device=model.device),
        )
        times = []
        for _ in range(3):  # first run warms the kernels for this shape
            start = time.perf_counter()
            outcome = run_pass(model, [block])[0]
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            times.append(time.perf_counter() - start)
            if isinstance(outcome, AttributionError):
                log.info("batch probe for %s stopped at %d rows: %s", model.name, size, outcome)
                return measured or None
        measured[size] = size / min(times[1:])
        spent += sum(times)
        best = max(measured.values())
        if spent > budget_s or measured[size] < 0.7 * best:  # out of time, or well past the peak
            break
    return measured


def pick_batch_rows(measured: dict[int, float]) -> int:
    best = max(measured.values())
    return min(size for size, rate in measured.items() if rate >= GOOD_ENOUGH * best)
