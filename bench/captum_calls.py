"""Captum, called the way a user calls it today: one request, one `attribute` call (B1 and B2).

`run_captum` is the whole per-request computation of both baselines. `PassCounter` counts the
model's forward calls (Captum's passes) and their rows through a forward hook on the root module,
per thread, so the baselines report passes and rows per pass like attrserve does.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients, Occlusion, Saliency

# The most an answer may differ from Captum's, relative to Captum's largest attribution: float round-off of a batched
# call, nothing more (bench/run.py's check, tests/bench/test_bench_numbers.py). Relative to the largest, not per
# element: an absolute tolerance would pass any error in attributions that are small throughout.
CHECK_TOLERANCE = 1e-4


def error_of(got: np.ndarray, want: np.ndarray) -> float:
    """The largest difference between an answer and Captum's, relative to Captum's largest attribution."""
    return float(np.abs(got - want).max()) / max(float(np.abs(want).max()), 1e-12)


class PassCounter:
    """Forward calls and rows of a model, counted per thread (B2 runs requests on a thread pool)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._local = threading.local()
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        local = self._local
        local.passes = getattr(local, "passes", 0) + 1
        local.rows = getattr(local, "rows", 0) + (int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 0)

    def take(self) -> tuple[int, int]:
        """(passes, rows) this thread ran since its last take()."""
        local = self._local
        passes, rows = getattr(local, "passes", 0), getattr(local, "rows", 0)
        local.passes = local.rows = 0
        return passes, rows


def run_captum(
    model: torch.nn.Module,
    algorithm: str,
    x: torch.Tensor,
    *,
    target: int | None,
    baselines: Any = None,
    params: dict[str, Any] | None = None,
    layer: str | None = None,
) -> torch.Tensor:
    """One Captum call with Captum's defaults for every parameter the request leaves out."""
    params = params or {}
    if isinstance(baselines, (int, float)):
        baselines = torch.full_like(x, baselines)  # token ids stay int64
    if algorithm == "integrated_gradients":
        return IntegratedGradients(model).attribute(
            x, baselines=baselines, target=target, n_steps=int(params.get("n_steps") or 50), method=params.get("method") or "gausslegendre"
        )
    if algorithm == "layer_integrated_gradients":
        lig = LayerIntegratedGradients(model, model.get_submodule(layer))
        return lig.attribute(
            x, baselines=baselines, target=target, n_steps=int(params.get("n_steps") or 50), method=params.get("method") or "gausslegendre"
        )
    if algorithm == "occlusion":
        return Occlusion(model).attribute(
            x,
            sliding_window_shapes=tuple(params["sliding_window_shapes"]),
            strides=tuple(params["strides"]),
            baselines=baselines,
            target=target,
            perturbations_per_eval=int(params.get("perturbations_per_eval") or 1),
        )
    if algorithm == "saliency":
        return Saliency(model).attribute(x, target=target, abs=bool(params.get("abs", True)))
    raise ValueError(f"the baselines implement integrated_gradients, layer_integrated_gradients, occlusion and saliency, not {algorithm!r}")


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True))
