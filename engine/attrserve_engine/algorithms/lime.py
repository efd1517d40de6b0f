"""Lime (Captum's Lime with its defaults): a Lasso surrogate fitted to the model on random on/off patterns of interpretable features.

Captum 0.9.0 (captum/attr/_core/lime.py) with `interpretable_model=SkLearnLasso(alpha)`,
the exponential kernel on cosine distance (`get_exp_kernel_similarity_function("cosine",
kernel_width)`), `default_perturb_func` and `return_input_shape=True`:

1) draw, per example, n_samples patterns z ∈ {0,1}^F (torch.bernoulli(0.5), lime.py:695);
2) build each pattern's input: the input where z is on, the baseline where it is off
   (default_from_interp_rep_transform, lime.py:593);
3) weight each pattern by exp(-d²/(2·kernel_width²)), d = 1 - cos(input, pattern input) (lime.py:678);
4) run every pattern of every example through the model in one FORWARD block;
5) per example, fit the Lasso (torch, linear_models.py) of the outputs on the patterns and
   spread its coefficients over the feature mask.

Captum explains a batch one example at a time (lime.py:1184, `_batch_example_iterator`), all
with the F of the whole batch's mask, so the draws run example after example and each
example gets its own fit. Captum's extra forward of the whole batch first (lime.py:1164)
only checks the output shape and is not repeated here; `perturbations_per_eval` only
sizes Captum's forward calls and changes no draw, so the scheduler's batching replaces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as functional
from torch import Tensor

from attrserve_engine.algorithms.base import Algorithm, Limits, check_positive, example_baselines
from attrserve_engine.algorithms.linear_models import lasso
from attrserve_engine.algorithms.perturbation import check_has_features, feature_masks_or_default, mask_id_range, n_features
from attrserve_engine.errors import InvalidArgument
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task, interleave_rows

MAX_N_SAMPLES = 100_000  # the per-request row cap (n_samples × examples) is the real bound
# Interpretable features (max id - min id + 1 of the masks): each is a column of every pattern, drawn and fitted,
# present in the masks or not. Refused past the inputs' scalars and this (the engine's default row cap) before any work.
MAX_FEATURES = 100_000


@dataclass(frozen=True)
class LimeParams:
    n_samples: int = 25  # Captum's Lime.attribute default (its docstring says 50; the code says 25)
    perturbations_per_eval: int = 1
    alpha: float = 0.01  # SkLearnLasso(alpha=0.01)
    kernel_width: float = 1.0


def interpretable_masks(task: Task) -> tuple[tuple[Tensor, ...], int]:
    """Captum's `construct_feature_mask` (lime.py:698): the masks shifted to start at 0, and F = max id + 1.

    Each mask is int64 (1 or n, *feature_shape); the default numbers every scalar across inputs.
    """
    masks = feature_masks_or_default(task)
    low = min(int(m.min()) for m in masks if m.numel())
    if low != 0:
        masks = tuple(m - low for m in masks)
    return masks, n_features(masks)


def check_feature_count(task: Task, owner: str) -> None:
    """Refuses masks whose ids span more interpretable features than the inputs have scalars and MAX_FEATURES,
    from the masks' min and max alone (no mask is shifted, nothing is allocated, no torch: `rows` runs on the event
    loop; perturbation.mask_id_range)."""
    ids = mask_id_range(task)
    if ids is None:
        return
    low, high = ids
    count, scalars = high - low + 1, sum(math.prod(x.shape[1:]) for x in task.inputs)
    if count > max(scalars, MAX_FEATURES):
        raise InvalidArgument(
            f"feature_masks: {owner} takes one interpretable feature per id from the smallest ({low}) to the largest ({high}), "
            f"{count} here, over this server's limit of {max(scalars, MAX_FEATURES)}; number the features 0 .. n_features - 1"
        )


def pattern_inputs(task: Task, masks: tuple[Tensor, ...], patterns: Tensor) -> tuple[Tensor, ...]:
    """Each pattern's model input: the input where its feature is on, the baseline where off.

    patterns: (n, S, F) int64. Returns per input (n * S, *feature_shape), example-major.
    NOTE: Captum writes on·x + off·b (lime.py:620), not torch.where: for finite values the same.
    """
    n, s = int(patterns.shape[0]), int(patterns.shape[1])
    device = task.inputs[0].device
    on = patterns.to(device).bool()  # (n, S, F)
    rows = []
    for x, b, m in zip(task.inputs, example_baselines(task), masks):
        positions = m.reshape(m.shape[0], 1, -1).expand(n, s, -1)  # (n, S, D) feature id of each scalar
        keep = on.gather(2, positions)  # (n, S, D)
        mixed = keep.to(x.dtype) * x.reshape(n, 1, -1) + (~keep).to(x.dtype) * b.reshape(n, 1, -1)  # (n, S, D)
        rows.append(mixed.reshape((n * s,) + tuple(x.shape[1:])))
    return tuple(rows)


def spread_coefficients(coefs: Tensor, masks: tuple[Tensor, ...], inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """Captum's `_convert_output_shape` (lime.py:1296): each scalar gets its feature's coefficient; float32 like Captum.

    coefs: (n, F) float32. Returns per input (n, *feature_shape).
    """
    n = int(coefs.shape[0])
    out = []
    for x, m in zip(inputs, masks):
        flat = m.reshape(m.shape[0], -1).expand(n, -1).to(coefs.device)  # (n, D)
        out.append(coefs.gather(1, flat).reshape(x.shape).to(x.device))
    return tuple(out)


def skip_fit_draws(task: Task, n_interp: int) -> None:
    """The draws Captum's fit of one example makes from the global torch generator, between its patterns and the next example's.

    NOTE: two hidden ones, both needed for the next example's patterns to match:
    1) LimeBase hands the fit a DataLoader (lime.py:515); iterating it draws the iterator's
       base seed (torch/utils/data/dataloader.py:690): one int64 `random_`;
    2) the fit then builds an `nn.Linear(F, 1)` to hold the coefficients
       (captum/_utils/models/linear_model/model.py:109), whose reset_parameters draws
       `uniform_` for its (1, F) weight and its (1,) bias before they are overwritten.
    """
    gen = task.rng.torch_gen
    torch.empty((), dtype=torch.int64).random_(generator=gen)
    torch.empty(1, n_interp).uniform_(generator=gen)
    torch.empty(1).uniform_(generator=gen)


class Lime(Algorithm):
    name = "lime"
    pass_kind = PassKind.FORWARD
    params_type: ClassVar[type] = LimeParams  # KernelShap, a subclass, has its own
    needs_input_gradients = False
    uses_feature_mask = True
    uses_baselines = True

    def check_params(self, params: LimeParams, limits: Limits) -> None:
        # NOTE: Captum's Lime takes any perturbations_per_eval (it only sizes its forward calls): so does this one.
        check_positive(params.n_samples, f"{self.name}.n_samples", MAX_N_SAMPLES)
        if not (math.isfinite(params.alpha) and params.alpha >= 0):  # SkLearnLasso refuses the others
            raise InvalidArgument(f"{self.name}.alpha must be a finite number >= 0, got {params.alpha}")
        # Captum's kernel divides by 2 * kernel_width ** 2 (any sign, infinity too); where that is 0, NaN or overflows,
        # its fit refuses the weights.
        try:
            square = params.kernel_width**2
        except OverflowError:
            square = math.nan
        if not square > 0:
            raise InvalidArgument(
                f"{self.name}.kernel_width must be a nonzero number whose square is finite or infinite, got {params.kernel_width}"
            )

    def rows(self, task: Task, n_examples: int) -> int:
        check_has_features(task, self.name)
        check_feature_count(task, self.name)
        return task.params.n_samples * n_examples

    def plan(self, task: Task) -> Plan:
        n, s = task.n, task.params.n_samples
        masks, f = interpretable_masks(task)
        self.check_features(f)
        patterns = self.draw_patterns(task, f)  # (n, S, F) int64, CPU
        inputs = pattern_inputs(task, masks, patterns)  # (n * S, ...) each
        weights = self.pattern_weights(task, inputs, patterns, f)  # (n, S) float32
        result = yield Block(
            kind=PassKind.FORWARD,
            inputs=inputs,
            args=tuple(interleave_rows(a, s) for a in task.args),
            target=interleave_rows(task.target, s),
            bool_output=True,  # (a bool decision is a 0/1 regression target, as in Captum)
        )
        outputs = result.selected.detach().float().reshape(n, s)  # Captum's combined_outputs.float()
        if not bool(torch.isfinite(outputs).all()):
            raise InvalidArgument(f"{self.name}: the model returned non-finite outputs for some patterns; the surrogate cannot be fitted")
        coefs = self.fit(task, patterns.float(), outputs.cpu(), weights.cpu())  # (n, F) float32
        return Attribution(spread_coefficients(coefs, masks, task.inputs))

    # -- the parts KernelShap replaces -------------------------------------
    def check_features(self, n_interp: int) -> None:
        """Lime takes any number of interpretable features."""

    def draw_patterns(self, task: Task, n_interp: int) -> Tensor:
        """default_perturb_func (lime.py:683): torch.bernoulli(0.5) per feature, one (1, F) call per sample, examples in turn.

        One (S, F) draw per example equals its S calls: bernoulli takes one number per element, in order.
        Returns (n, S, F) int64.
        """
        probs = torch.ones(task.params.n_samples, n_interp) * 0.5
        patterns = []
        for _ in range(task.n):
            patterns.append(torch.bernoulli(probs, generator=task.rng.torch_gen).long())
            skip_fit_draws(task, n_interp)
        return torch.stack(patterns)

    def pattern_weights(self, task: Task, inputs: tuple[Tensor, ...], patterns: Tensor, n_interp: int) -> Tensor:
        """The exponential kernel on cosine distance (lime.py:628): float32 arithmetic, exp in float64 like math.exp."""
        n, s = int(patterns.shape[0]), int(patterns.shape[1])
        original = torch.cat([x.reshape(n, -1) for x in task.inputs], dim=1).float()  # (n, D)
        perturbed = torch.cat([p.reshape(n, s, -1) for p in inputs], dim=2).float().contiguous()  # (n, S, D)
        distance = 1 - functional.cosine_similarity(original.unsqueeze(1), perturbed, dim=2)  # (n, S)
        exponent = -1 * (distance**2) / (2 * (task.params.kernel_width**2))
        weights = torch.exp(exponent.double()).float()
        usable = torch.isfinite(weights).all(1) & (weights != 0).any(1)  # (n,)
        if not bool(usable.all()):
            # Captum's fit refuses such weights too ("contains NaN", "must contain at least one non-zero number")
            i = int((~usable).nonzero()[0, 0])
            raise InvalidArgument(
                f"{self.name}: the similarity kernel gives example {i}'s patterns no usable weights (NaN, or all 0); "
                f"look at its inputs (NaN?) and kernel_width ({task.params.kernel_width})"
            )
        return weights

    def fit(self, task: Task, patterns: Tensor, outputs: Tensor, weights: Tensor) -> Tensor:
        """SkLearnLasso(alpha) per example; returns (n, F) float32 coefficients (Captum's FloatTensor(coef_))."""
        fits = [lasso(patterns[i], outputs[i], weights[i], task.params.alpha, deadline=task.deadline) for i in range(task.n)]
        return torch.stack([fit.coef for fit in fits]).float()


ALGORITHM = Lime
