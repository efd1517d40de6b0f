"""DeepLiftShap (Captum's DeepLiftShap): DeepLift against every baseline of a distribution, averaged per example."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attrserve_engine.algorithms.base import Algorithm
from attrserve_engine.algorithms.deep_lift import DeepLift, DeepLiftParams
from attrserve_engine.errors import InvalidArgument
from attrserve_engine.plan import Attribution, PassKind, Plan, Task, interleave_rows, repeat_rows


@dataclass(frozen=True)
class DeepLiftShapParams:
    multiply_by_inputs: bool = True


def check_distribution(baselines: tuple[Tensor, ...], owner: str = "deep_lift_shap", single: str = "deep_lift") -> None:
    """Captum asserts a distribution of more than one row; with one baseline, `single` (DeepLift) is the method."""
    m = int(baselines[0].shape[0])
    if m < 2:
        raise InvalidArgument(
            f"{owner} needs a baseline distribution with at least 2 rows per input (got {m}); for a single baseline use {single}"
        )
    for i, b in enumerate(baselines):
        if b.shape[0] != m:
            raise InvalidArgument(
                f"baselines[{i}] has {b.shape[0]} rows but baselines[0] has {m}; give every input the same number of baseline rows"
            )


class DeepLiftShap(Algorithm):
    name = "deep_lift_shap"
    pass_kind = PassKind.DEEPLIFT
    params_type = DeepLiftShapParams
    has_convergence_delta = True
    needs_module_hooks = True
    uses_baselines = True
    baseline_distribution = True

    def rows(self, task: Task, n_examples: int) -> int:
        if n_examples == task.n:
            # Not inside NoiseTunnel (whose drawing can grow a 1-row distribution):
            # refuse here, when the engine validates the request, not later on the worker.
            check_distribution(task.baselines)
        return 2 * n_examples * self._baselines_per_example(task, n_examples)

    def delta_rows(self, task: Task, n_examples: int) -> int:
        return 2 * n_examples * self._baselines_per_example(task, n_examples)

    @staticmethod
    def _baselines_per_example(task: Task, n_examples: int) -> int:
        m = int(task.baselines[0].shape[0])
        # Inside NoiseTunnel, one baseline per example (or a draw from a 1-row distribution) becomes
        # one per noisy example, and each noisy example meets all of them. (A draw from a larger
        # distribution does too; rows cannot tell it apart, so it counts m.)
        if n_examples != task.n and m in (1, task.n):
            return n_examples
        return m

    def plan(self, task: Task) -> Plan:
        n, m = task.n, int(task.baselines[0].shape[0])
        check_distribution(task.baselines)
        # Captum's _expand_inputs_baselines_targets: each example against every baseline, example-major.
        expanded = task.replace(
            inputs=tuple(interleave_rows(x, m) for x in task.inputs),  # (n * m, *feature_shape)
            baselines=tuple(repeat_rows(b, n) for b in task.baselines),  # (n * m, *feature_shape)
            target=interleave_rows(task.target, m),
            args=tuple(interleave_rows(a, m) for a in task.args),
            # Captum's DeepLiftShap keeps DeepLift's default eps.
            params=DeepLiftParams(multiply_by_inputs=task.params.multiply_by_inputs),
        )
        # NOTE: DeepLift yields the whole expansion as ONE paired block — Captum's one
        # batch — so the Softmax and MaxPool rules see exactly what Captum's do.
        result: Attribution = yield from DeepLift().plan(expanded)
        attributions = tuple(
            torch.mean(a.view((n, m) + tuple(a.shape[1:])), dim=1)
            for a in result.attributions  # (n, *feature_shape)
        )
        # The delta stays per (example, baseline) pair, (n * m,), as Captum returns it.
        return Attribution(attributions, result.convergence_delta)


ALGORITHM = DeepLiftShap
