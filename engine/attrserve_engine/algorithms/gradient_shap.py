"""GradientShap (Captum's GradientShap): expected gradients over noisy inputs and random points toward
baselines drawn from a distribution."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attrserve_engine.algorithms.base import Algorithm, Limits, check_positive, check_stdevs, delta_block, delta_from, per_input_values
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task, interleave_rows


@dataclass(frozen=True)
class GradientShapParams:
    n_samples: int = 5
    stdevs: tuple = (0.0,)
    multiply_by_inputs: bool = True


def draw_baselines(task: Task, n_samples: int) -> tuple[Tensor, ...]:
    """NoiseTunnel's draw_baseline_from_distrib: n_samples * n rows per input, drawn with np.random.choice."""
    drawn = []
    for b in task.baselines:  # (never empty: formatting.format_baselines refuses an empty distribution)
        idx = task.rng.numpy_gen.choice(b.shape[0], n_samples * task.n).tolist()
        drawn.append(b[idx])  # (n * n_samples, *feature_shape)
    return tuple(drawn)


def add_noise(task: Task, stdevs: tuple[float, ...], n_samples: int) -> tuple[Tensor, ...]:
    """NoiseTunnel's _add_noise_to_input: each example repeated n_samples times plus N(0, stdev) noise."""
    noisy = []
    for x, stdev in zip(task.inputs, stdevs):
        size = (x.shape[0] * n_samples,) + tuple(x.shape[1:])
        std = torch.tensor(stdev).repeat(size)  # float32 on CPU, as Captum draws it
        noise = torch.normal(0, std, generator=task.rng.torch_gen)
        noisy.append(interleave_rows(x, n_samples) + noise.to(x.device))
    return tuple(noisy)


class GradientShap(Algorithm):
    name = "gradient_shap"
    params_type = GradientShapParams
    has_convergence_delta = True
    uses_baselines = True
    baseline_distribution = True

    def check_params(self, params: GradientShapParams, limits: Limits) -> None:
        check_positive(params.n_samples, "gradient_shap.n_samples", limits.max_nt_samples)
        check_stdevs(params.stdevs, "gradient_shap.stdevs")

    def rows(self, task: Task, n_examples: int) -> int:
        per_input_values(task.params.stdevs, len(task.inputs), "gradient_shap.stdevs")  # early: before any work
        return task.params.n_samples * n_examples

    def delta_rows(self, task: Task, n_examples: int) -> int:
        return 2 * task.params.n_samples * n_examples

    def plan(self, task: Task) -> Plan:
        p: GradientShapParams = task.params
        ns, n = p.n_samples, task.n
        stdevs = per_input_values(p.stdevs, len(task.inputs), "gradient_shap.stdevs")
        # NOTE: Captum's draw order — np.random.choice (baselines), torch.normal (noise), np.random.uniform (path points).
        baselines = draw_baselines(task, ns)
        inputs = add_noise(task, stdevs, ns)  # (n * ns, ...) example-major
        x0 = inputs[0]
        rand = torch.tensor(task.rng.numpy_gen.uniform(0.0, 1.0, x0.shape[0]), dtype=x0.dtype).to(x0.device)
        scaled = tuple(
            rand.view((x.shape[0],) + (1,) * (x.dim() - 1)) * x + (1.0 - rand.view((x.shape[0],) + (1,) * (x.dim() - 1))) * b
            for x, b in zip(inputs, baselines)
        )
        args = tuple(interleave_rows(a, ns) for a in task.args)
        target = interleave_rows(task.target, ns)
        blocks = [Block(kind=PassKind.GRADIENT, inputs=scaled, args=args, target=target)]
        if task.return_convergence_delta:  # InputBaselineXGradient's delta: per noisy example
            blocks.append(delta_block(inputs, baselines, args, target))
        results = yield blocks
        grads = results[0].grads
        per_sample = tuple((x - b) * g for x, b, g in zip(inputs, baselines, grads)) if p.multiply_by_inputs else tuple(grads)
        # smoothgrad over samples: (n, ns, ...) summed over ns, times 1 / ns (Captum's order of operations)
        attributions = tuple(a.view((n, ns) + tuple(a.shape[1:])).sum(dim=1) * 1 / ns for a in per_sample)
        delta = delta_from(results[1], per_sample) if task.return_convergence_delta else None
        return Attribution(attributions, delta)


ALGORITHM = GradientShap
