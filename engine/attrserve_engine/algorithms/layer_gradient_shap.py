"""LayerGradientShap (Captum's): GradientShap's random path points, with gradients and activation differences at a layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attrserve_engine.algorithms.base import Limits, check_positive, check_stdevs, delta_block, delta_from, per_input_values
from attrserve_engine.algorithms.gradient_shap import add_noise, draw_baselines
from attrserve_engine.algorithms.layer import LayerAlgorithm, layer_block
from attrserve_engine.plan import Attribution, Block, PassKind, Plan, Task, interleave_rows, repeat_rows


@dataclass(frozen=True)
class LayerGradientShapParams:
    n_samples: int = 5
    stdevs: tuple = (0.0,)
    multiply_by_inputs: bool = True
    attribute_to_layer_input: bool = False


class LayerGradientShap(LayerAlgorithm):
    name = "layer_gradient_shap"
    params_type = LayerGradientShapParams
    has_convergence_delta = True
    uses_baselines = True
    baseline_distribution = True
    needs_input_gradients = True  # noise and path points are drawn in input space: float inputs only

    def check_params(self, params: LayerGradientShapParams, limits: Limits) -> None:
        check_positive(params.n_samples, "layer_gradient_shap.n_samples", limits.max_nt_samples)
        check_stdevs(params.stdevs, "layer_gradient_shap.stdevs")

    def rows(self, task: Task, n_examples: int) -> int:
        # gradients at the path points, then the layer at the noisy inputs and at the drawn baselines
        return 3 * task.params.n_samples * n_examples

    def delta_rows(self, task: Task, n_examples: int) -> int:
        return 2 * task.params.n_samples * n_examples

    def plan(self, task: Task) -> Plan:
        p: LayerGradientShapParams = task.params
        ns, n = p.n_samples, task.n
        stdevs = per_input_values(p.stdevs, len(task.inputs), "layer_gradient_shap.stdevs")
        # Captum wraps LayerInputBaselineXGradient in NoiseTunnel (layer_gradient_shap.py:303-324).
        # NOTE: Captum's draw order — np.random.choice (baselines), torch.normal (noise), np.random.uniform (path points).
        baselines = draw_baselines(task, ns)  # (n * ns, ...) per input
        inputs = add_noise(task, stdevs, ns)  # (n * ns, ...) example-major
        x0 = inputs[0]
        rand = torch.tensor(task.rng.numpy_gen.uniform(0.0, 1.0, x0.shape[0]), dtype=x0.dtype).to(x0.device)  # (n * ns,)
        scaled = tuple(
            rand.view((x.shape[0],) + (1,) * (x.dim() - 1)) * x + (1.0 - rand.view((x.shape[0],) + (1,) * (x.dim() - 1))) * b
            for x, b in zip(inputs, baselines)
        )
        args = tuple(interleave_rows(a, ns) for a in task.args)
        target = interleave_rows(task.target, ns)
        rows = n * ns
        blocks = [
            # layer_gradient_shap.py:429: gradients w.r.t. the layer at the path points
            layer_block(task, scaled, args, target, gradients=True),
            # layer_gradient_shap.py:440-454: the layer at the baselines and at the noisy inputs; rows [inputs; baselines]
            Block(
                kind=PassKind.FORWARD,
                inputs=tuple(torch.cat([x, b]) for x, b in zip(inputs, baselines)),
                args=tuple(repeat_rows(a, 2) for a in args),
                target=repeat_rows(target, 2),
                layer=task.layer,
                layer_input=p.attribute_to_layer_input,
                select=False,
            ),
        ]
        if task.return_convergence_delta:  # LayerInputBaselineXGradient's delta: per noisy example
            blocks.append(delta_block(inputs, baselines, args, target))
        results = yield blocks
        grads = results[0].layer_grads  # (n * ns, *layer_shape) each
        acts = results[1].layer_activations  # (2 * n * ns, *layer_shape) each
        per_sample = tuple((a[:rows] - a[rows:]) * g for a, g in zip(acts, grads)) if p.multiply_by_inputs else tuple(grads)
        # smoothgrad over samples: (n, ns, ...) summed over ns, times 1 / ns (NoiseTunnel's order of operations)
        attributions = tuple(a.view((n, ns) + tuple(a.shape[1:])).sum(dim=1) * 1 / ns for a in per_sample)
        delta = delta_from(results[2], per_sample) if task.return_convergence_delta else None
        return Attribution(attributions, delta)


ALGORITHM = LayerGradientShap
