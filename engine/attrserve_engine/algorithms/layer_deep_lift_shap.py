"""LayerDeepLiftShap (Captum's): LayerDeepLift against every baseline of a distribution, averaged per example."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attrserve_engine.algorithms.deep_lift_shap import DeepLiftShap, check_distribution
from attrserve_engine.algorithms.layer import LayerAlgorithm
from attrserve_engine.algorithms.layer_deep_lift import layer_deep_lift_plan
from attrserve_engine.plan import Attribution, PassKind, Plan, Task, interleave_rows, repeat_rows


@dataclass(frozen=True)
class LayerDeepLiftShapParams:
    multiply_by_inputs: bool = True
    attribute_to_layer_input: bool = False


def check_layer_distribution(task: Task) -> None:
    """Captum asserts more than one baseline row (layer_deep_lift.py:634); with one, LayerDeepLift is the method."""
    check_distribution(task.baselines, "layer_deep_lift_shap", "layer_deep_lift")


class LayerDeepLiftShap(LayerAlgorithm):
    name = "layer_deep_lift_shap"
    pass_kind = PassKind.DEEPLIFT
    params_type = LayerDeepLiftShapParams
    has_convergence_delta = True
    needs_module_hooks = True
    # Captum's _expand_inputs_baselines_targets (deep_lift.py:860) calls requires_grad_() on the expanded inputs.
    needs_input_gradients = True
    float_inputs_why = (
        "marks its expanded inputs as needing gradients, as Captum's LayerDeepLiftShap does, so they must be floating "
        "point (for token ids, use layer_deep_lift, one baseline per request)"
    )
    uses_baselines = True
    baseline_distribution = True

    def rows(self, task: Task, n_examples: int) -> int:
        if n_examples == task.n:  # not inside NoiseTunnel: refuse a 1-row distribution when the job is submitted
            check_layer_distribution(task)
        # each (example, baseline) pair twice (input and reference rows), then the baselines' activations
        return 3 * n_examples * DeepLiftShap._baselines_per_example(task, n_examples)

    def delta_rows(self, task: Task, n_examples: int) -> int:
        return 2 * n_examples * DeepLiftShap._baselines_per_example(task, n_examples)

    def plan(self, task: Task) -> Plan:
        n, m = task.n, int(task.baselines[0].shape[0])
        check_layer_distribution(task)
        # Captum's _expand_inputs_baselines_targets (deep_lift.py:848): each example against every baseline, example-major.
        expanded = task.replace(
            inputs=tuple(interleave_rows(x, m) for x in task.inputs),  # (n * m, *feature_shape)
            target=interleave_rows(task.target, m),
            args=tuple(interleave_rows(a, m) for a in task.args),
        )
        baselines = tuple(repeat_rows(b, n) for b in task.baselines)  # (n * m, *feature_shape)
        # NOTE: one paired block for the whole expansion — Captum's one batch — so the
        # Softmax and MaxPool rules see exactly what Captum's do.
        result: Attribution = yield from layer_deep_lift_plan(expanded, baselines, task.params.multiply_by_inputs)
        attributions = tuple(
            torch.mean(a.view((n, m) + tuple(a.shape[1:])), dim=1)
            for a in result.attributions  # (n, *layer_shape)
        )
        # The delta stays per (example, baseline) pair, (n * m,), as Captum returns it.
        return Attribution(attributions, result.convergence_delta)


ALGORITHM = LayerDeepLiftShap
