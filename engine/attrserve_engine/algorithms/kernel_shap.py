"""KernelShap (Captum's KernelShap): Lime with Shapley-kernel sampling and a weighted least-squares surrogate.

Captum 0.9.0 (captum/attr/_core/kernel_shap.py) subclasses Lime with
`SkLearnLinearRegression()` (kernel_shap.py:40) and its own sampler and weights:

- patterns, per example (kernel_shap_perturb_generator, kernel_shap.py:357): all features on,
  all off, then for each further sample k ~ Categorical(p), p_k ∝ (F-1) / (k(F-k)), p_0 = 0
  (kernel_shap.py:281), and the k features whose `torch.randn(1, F)` draws exceed the
  (F-k)-th smallest (kernel_shap.py:363). Draw order: multinomial, randn, sample after sample.
- between examples, the draws of Lime's fit (`skip_fit_draws`).
- weights: 10⁶ for the all-on and all-off patterns, 1 otherwise (kernel_shap.py:320), so the
  fit all but enforces f(x) - f(baseline) = Σ coefficients.

Everything else (rows, one fit per example, spreading over the mask) is Lime's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attrserve_engine.algorithms.base import Limits, check_positive
from attrserve_engine.algorithms.lime import MAX_N_SAMPLES, Lime, skip_fit_draws
from attrserve_engine.algorithms.linear_models import weighted_least_squares
from attrserve_engine.errors import InvalidArgument
from attrserve_engine.plan import Task

ENDPOINT_WEIGHT = 1000000.0  # Captum's inf_weight (kernel_shap.py:44)


@dataclass(frozen=True)
class KernelShapParams:
    n_samples: int = 25
    perturbations_per_eval: int = 1


def _multinomial_is_exponential_argmax() -> bool:
    """Whether this torch draws one multinomial sample as argmax(p / Exp(1)) — its fast path since 1.9."""
    probs = torch.tensor([[0.0, 0.5, 0.3, 0.2]])
    a, b = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    return all(
        torch.equal(
            torch.multinomial(probs, 1, True, generator=a),
            (probs / torch.empty_like(probs).exponential_(generator=b)).argmax(1, keepdim=True),
        )
        for _ in range(32)
    )


_EXPONENTIAL_ARGMAX = _multinomial_is_exponential_argmax()


def draw_category(probs: Tensor, gen: torch.Generator) -> Tensor:
    """torch.multinomial(probs, 1, True): (1, 1) int64. Its own validation costs ~8x the draw, so where this
    torch draws by the exponential trick (checked at import) we draw the same numbers directly."""
    if _EXPONENTIAL_ARGMAX:
        return (probs / torch.empty_like(probs).exponential_(generator=gen)).argmax(1, keepdim=True)
    return torch.multinomial(probs, 1, True, generator=gen)


class KernelShap(Lime):
    name = "kernel_shap"
    params_type = KernelShapParams

    def check_params(self, params: KernelShapParams, limits: Limits) -> None:  # type: ignore[override]  # Lime's plan, not its params (as in Captum)
        # NOTE: Captum's KernelShap takes any perturbations_per_eval (it only sizes its forward calls): so does this one.
        check_positive(params.n_samples, f"{self.name}.n_samples", MAX_N_SAMPLES)

    def check_features(self, n_interp: int) -> None:
        if n_interp < 2:
            # Captum's sampling distribution is 0/0 for F = 1 and Categorical rejects it.
            raise InvalidArgument(f"{self.name} needs at least 2 interpretable features; the feature mask gives {n_interp}")

    def draw_patterns(self, task: Task, n_interp: int) -> Tensor:
        """kernel_shap_perturb_generator, restarted per example: (n, S, F) int64."""
        n, s, f = task.n, task.params.n_samples, n_interp
        gen = task.rng.torch_gen
        sizes = torch.arange(f, dtype=torch.float)
        probs = torch.tensor(f - 1) / (sizes * (f - sizes))  # (F,) float32, inf at 0
        probs[0] = 0.0
        probs = (probs / probs.sum(-1, keepdim=True)).reshape(1, f)  # Categorical's normalisation
        drawn = max(s - 2, 0)
        counts, scores = [], []
        for _ in range(n):
            for _ in range(drawn):
                counts.append(draw_category(probs, gen))  # Categorical.sample(): (1, 1)
                scores.append(torch.randn(1, f, generator=gen))  # (1, F)
            skip_fit_draws(task, f)
        ends = torch.stack([torch.ones(f, dtype=torch.int64), torch.zeros(f, dtype=torch.int64)]).expand(n, 2, f)
        if not drawn:
            return ends[:, :s]
        count = torch.cat(counts).reshape(n, drawn, 1)
        score = torch.cat(scores).reshape(n, drawn, f)
        # threshold = the (F-k)-th smallest score (kthvalue), so exactly k scores exceed it
        thresholds = score.sort(dim=2).values.gather(2, f - count - 1)  # (n, drawn, 1)
        return torch.cat([ends, (score > thresholds).long()], dim=1)  # (n, S, F)

    def pattern_weights(self, task: Task, inputs: tuple[Tensor, ...], patterns: Tensor, n_interp: int) -> Tensor:
        on = patterns.sum(2)  # (n, S)
        endpoint = (on == 0) | (on == n_interp)
        return torch.where(endpoint, ENDPOINT_WEIGHT, 1.0).float()

    def fit(self, task: Task, patterns: Tensor, outputs: Tensor, weights: Tensor) -> Tensor:
        """SkLearnLinearRegression per example, in float32 as Captum hands it the data (see linear_models.py)."""
        # NOTE: one solve per example, not one batched solve: MKL's batched gelsd rounds differently,
        # and an example's answer must not depend on the others in its request.
        return torch.stack([weighted_least_squares(patterns[i], outputs[i], weights[i]).coef for i in range(task.n)]).float()


ALGORITHM = KernelShap
