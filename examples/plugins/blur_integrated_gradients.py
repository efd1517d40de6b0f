"""Blur Integrated Gradients (Xu et al., 2020, "Attribution in Scale and Space"), an attrserve algorithm plugin.

Not in Captum. Integrated Gradients along a path of ever less blurred images
instead of a straight line from a baseline: the path starts at the input
blurred with `max_sigma` and ends at the input, so no baseline is needed and
no information the blur destroys is introduced:

    x(s) = gaussian_blur(x, s)                 for s from max_sigma down to 0
    attribution = Σ_i  ∇f(x(s_i)) · (x(s_i) − x(s_{i−1}))     (Riemann sum, n_steps points)

Serve it with `attrserve serve --plugins examples/plugins/blur_integrated_gradients.py`
and call it by name: `client.attribute(model, "blur_integrated_gradients", images, params={...})`.
Its rows are ordinary gradient rows, so the engine fuses them with every other request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attrserve_engine.algorithms.base import Algorithm, Limits, check_positive
from attrserve_engine.errors import InvalidArgument
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task, repeat_rows


@dataclass(frozen=True)
class BlurIntegratedGradientsParams:
    n_steps: int = 50
    max_sigma: float = 5.0  # blur of the path's start, in pixels


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (n, c, h, w) images with reflect padding; sigma 0 is the identity."""
    if sigma <= 0:
        return images
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()  # (2r+1,)
    c = images.shape[1]
    pad_h, pad_w = min(radius, images.shape[2] - 1), min(radius, images.shape[3] - 1)
    k_h = kernel[radius - pad_h : radius + pad_h + 1].view(1, 1, -1, 1).repeat(c, 1, 1, 1)  # (c, 1, kh, 1)
    k_w = kernel[radius - pad_w : radius + pad_w + 1].view(1, 1, 1, -1).repeat(c, 1, 1, 1)  # (c, 1, 1, kw)
    out = F.conv2d(F.pad(images, (0, 0, pad_h, pad_h), mode="reflect"), k_h / k_h.sum(dim=2, keepdim=True), groups=c)
    return F.conv2d(F.pad(out, (pad_w, pad_w, 0, 0), mode="reflect"), k_w / k_w.sum(dim=3, keepdim=True), groups=c)


def blur_path(images: Tensor, n_steps: int, max_sigma: float) -> Tensor:
    """The path points x(s_0..s_n), s_i = max_sigma·(1 − i/n): (n_steps + 1, n, c, h, w)."""
    return torch.stack([gaussian_blur(images, max_sigma * (1 - i / n_steps)) for i in range(n_steps + 1)])


class BlurIntegratedGradients(Algorithm):
    name = "blur_integrated_gradients"
    params_type = BlurIntegratedGradientsParams

    def check_params(self, params: BlurIntegratedGradientsParams, limits: Limits) -> None:
        check_positive(params.n_steps, f"{self.name}.n_steps", limits.max_n_steps)
        if not params.max_sigma > 0:
            raise InvalidArgument(f"{self.name}.max_sigma must be positive, got {params.max_sigma}")

    def rows(self, task: Task, n_examples: int) -> int:
        return task.params.n_steps * n_examples

    def plan(self, task: Task) -> Plan:
        p: BlurIntegratedGradientsParams = task.params
        for i, x in enumerate(task.inputs):
            if x.dim() != 4:
                raise InvalidArgument(f"{self.name} blurs images: inputs[{i}] must be (n, channels, height, width), got {tuple(x.shape)}")
        paths = [blur_path(x, p.n_steps, p.max_sigma) for x in task.inputs]  # each (n_steps + 1, n, c, h, w)
        # Gradients at the path points s_1..s_n, step-major like IG's rows.
        result = yield Block(
            kind=PassKind.GRADIENT,
            inputs=tuple(path[1:].reshape(-1, *path.shape[2:]) for path in paths),
            args=tuple(repeat_rows(a, p.n_steps) for a in task.args),
            target=repeat_rows(task.target, p.n_steps),
        )
        attributions = []
        for path, grad in zip(paths, result.grads):
            steps = path[1:] - path[:-1]  # (n_steps, n, c, h, w)
            attributions.append((grad.view_as(steps) * steps).sum(dim=0))  # (n, c, h, w)
        return Attribution(tuple(attributions))


ALGORITHM = BlurIntegratedGradients
