"""NoiseTunnel (Captum's NoiseTunnel): SmoothGrad, SmoothGrad² and VarGrad around any algorithm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attrserve_engine.algorithms.base import Algorithm, Limits, check_positive, check_stdevs, parse_dataclass, per_input_values
from attrserve_engine.algorithms.gradient_shap import add_noise, draw_baselines
from attrserve_engine.errors import InvalidArgument, shown
from attrserve_engine.plan import Attribution, Plan, Task, interleave_rows

NT_TYPES = ("smoothgrad", "smoothgrad_sq", "vargrad")


@dataclass(frozen=True)
class NoiseTunnelParams:
    nt_type: str = "smoothgrad"
    nt_samples: int = 5
    stdevs: tuple = (1.0,)
    draw_baseline_from_distrib: bool = False


def parse_noise_tunnel(raw: dict, limits: Limits, seeded: bool = False) -> NoiseTunnelParams:
    """`seeded`: the request gave its seed, so its numbers must be Captum's under that seed. Captum draws the noise a
    chunk of nt_samples_batch_size samples at a time, so its seeded numbers depend on a chunk below nt_samples; this
    server draws every sample at once, the numbers Captum gives without the hint: refused then, as it cannot be equal."""
    params = parse_dataclass(NoiseTunnelParams, raw, "noise_tunnel", ("nt_samples_batch_size",))
    if params.nt_type not in NT_TYPES:
        raise InvalidArgument(f"noise_tunnel.nt_type must be one of {', '.join(NT_TYPES)}, got {shown(params.nt_type)}")
    check_positive(params.nt_samples, "noise_tunnel.nt_samples", limits.max_nt_samples)
    check_stdevs(params.stdevs, "noise_tunnel.stdevs")
    chunk = raw.get("nt_samples_batch_size")
    if seeded and chunk is not None and int(chunk) < params.nt_samples:
        raise InvalidArgument(
            f"noise_tunnel.nt_samples_batch_size {int(chunk)} is below nt_samples {params.nt_samples} in a seeded request: Captum "
            "draws the noise a chunk at a time, so its numbers under a seed depend on the chunk, and this server draws every "
            "sample at once; leave it out (the server cuts its own passes) or give at least nt_samples"
        )
    return params


def noise_tunnel_plan(inner: Algorithm, nt: NoiseTunnelParams, task: Task) -> Plan:
    """Expand each example into nt_samples noisy copies, run `inner` on them, then smooth.

    Rows are example-major (each example's samples adjacent), as in Captum.
    """
    ns, n = nt.nt_samples, task.n
    stdevs = per_input_values(nt.stdevs, len(task.inputs), "noise_tunnel.stdevs")
    # NOTE: Captum's order — baselines are expanded (and drawn, with numpy) before the noise (torch).
    if nt.draw_baseline_from_distrib:
        baselines = draw_baselines(task, ns)
    else:
        baselines = tuple(interleave_rows(b, ns) if b.shape[0] == n and n > 1 else b for b in task.baselines)
    noisy = add_noise(task, stdevs, ns)
    inner_task = task.replace(
        inputs=noisy,
        baselines=baselines,
        target=interleave_rows(task.target, ns),
        args=tuple(interleave_rows(a, ns) for a in task.args),
        # Captum's _expand_feature_mask: per-example masks follow their example's noisy copies.
        feature_masks=tuple(interleave_rows(m, ns) if m.shape[0] > 1 else m for m in task.feature_masks),
    )
    result: Attribution = yield from inner.plan(inner_task)
    smoothed = []
    for a in result.attributions:
        a = a.view((n, ns) + tuple(a.shape[1:]))  # (n, ns, *feature_shape)
        mean = a.sum(dim=1) * 1 / ns
        mean_sq = torch.sum(torch.pow(a, 2), dim=1) * 1 / ns
        smoothed.append({"smoothgrad": mean, "smoothgrad_sq": mean_sq, "vargrad": mean_sq - mean * mean}[nt.nt_type])
    return Attribution(tuple(smoothed), result.convergence_delta)
