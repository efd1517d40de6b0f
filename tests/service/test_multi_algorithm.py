"""Several algorithms on one input in one request: each equals Captum's answer, as its own request does, and their rows share passes."""

from __future__ import annotations

import captum.attr as ca
import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attrserve_client import AttributionClient
from oracle import MODELS, assert_all_close, assert_close, assert_metric_close, captum_quality, example_inputs


def captum_answers(x: torch.Tensor, target: list[int], baseline: float, seed: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Captum 0.9.0 for the primary (IG) and each `also` entry below, seeded as a request with `seed` is."""
    model = MODELS["conv"]().eval()
    b = torch.full((1, *x.shape[1:]), baseline)

    def seeded(run):
        torch.manual_seed(seed)
        np.random.seed(seed)
        out = run()
        return (out[0].detach(), out[1].detach()) if isinstance(out, tuple) else (out.detach(), None)

    return [
        seeded(lambda: ca.IntegratedGradients(model).attribute(x.clone(), b, target=target, n_steps=16, return_convergence_delta=True)),
        seeded(lambda: ca.Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=False)),
        seeded(lambda: ca.DeepLift(model).attribute(x.clone(), b, target=target, return_convergence_delta=True)),
        seeded(lambda: ca.GradientShap(model).attribute(x.clone(), b, target=target, n_samples=4, stdevs=0.2)),
        seeded(lambda: ca.LayerGradCam(model, model.conv2).attribute(x.clone(), target=target, relu_attributions=True)),
        seeded(lambda: ca.NoiseTunnel(ca.Saliency(model)).attribute(x.clone(), nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=target)),
    ]


def test_several_algorithms_in_one_request_equal_separate_requests(fusing_server) -> None:
    """IG with five more algorithms in one request, and each alone: all equal Captum's answers. The combined request
    is one stage whose blocks go to four batch keys (input gradients 32 + 2 + 8 + 6 rows, the layer's gradients 2,
    DeepLift's pairs 4, the deltas' forwards 4 + 4), so it takes exactly 4 passes where the six separate requests take 8."""
    (x,), _ = example_inputs("conv", 2, seed=21)
    target, baseline, seed = [0, 2], 0.1, 3
    common = dict(target=target, baselines=baseline, seed=seed)
    also = [
        {"algorithm": "saliency", "params": {"abs": False}},
        {"algorithm": "deep_lift", "return_convergence_delta": True},
        {"algorithm": "gradient_shap", "params": {"n_samples": 4, "stdevs": 0.2}},
        {"algorithm": "layer_grad_cam", "layer": "conv2", "params": {"relu_attributions": True}},
        {"algorithm": "saliency", "noise_tunnel": {"nt_type": "smoothgrad", "nt_samples": 3, "stdevs": 0.1}},
    ]
    with AttributionClient(fusing_server.address) as client:
        combined = client.attribute("conv", "integrated_gradients", x.numpy(), params={"n_steps": 16}, return_convergence_delta=True, also=also, **common)
        alone = client.attribute("conv", "integrated_gradients", x.numpy(), params={"n_steps": 16}, return_convergence_delta=True, **common)
        separate = []
        for spec in also:
            kwargs = dict(common)
            if spec["algorithm"] in ("saliency", "layer_grad_cam"):
                kwargs.pop("baselines")
            separate.append(
                client.attribute(
                    "conv", spec["algorithm"], x.numpy(), params=spec.get("params"), layer=spec.get("layer"),
                    noise_tunnel=spec.get("noise_tunnel"), return_convergence_delta=spec.get("return_convergence_delta", False), **kwargs,
                )
            )
    want = captum_answers(x, target, baseline, seed)
    assert [a.algorithm for a in combined.also] == [s["algorithm"] for s in also]
    combined_answers = [(combined.attributions, combined.convergence_delta)] + [(a.attributions, a.convergence_delta) for a in combined.also]
    separate_answers = [(r.attributions, r.convergence_delta) for r in [alone, *separate]]
    for answers in (combined_answers, separate_answers):
        for (got, got_delta), (w, w_delta) in zip(answers, want, strict=True):
            assert_all_close((torch.from_numpy(got),), (w,))
            if w_delta is None:
                assert got_delta is None
            else:
                assert_close(torch.from_numpy(got_delta), w_delta)
    rows = [16 * 2 + 2 * 2, 2, 2 * 2 + 2 * 2, 4 * 2, 2, 3 * 2]  # IG + delta, Saliency, DeepLift pairs + delta, GradientShap, Grad-CAM, NoiseTunnel
    assert [r.timing["rows"] for r in [alone, *separate]] == rows
    assert [r.timing["passes"] for r in [alone, *separate]] == [2, 1, 2, 1, 1, 1]
    assert (combined.timing["rows"], combined.timing["passes"], combined.timing["pass_rows"], combined.timing["pass_requests"]) == (sum(rows), 4, sum(rows), 1)


def test_bad_also_entries_are_named(server) -> None:
    x = np.zeros((1, 6), np.float32)
    with AttributionClient(server.address) as client:
        with pytest.raises(grpc.RpcError) as bad:
            client.attribute("mlp", "saliency", x, target=0, also=[{"algorithm": "integrated_gradients", "params": {"n_steps": -3}}])
        with pytest.raises(grpc.RpcError) as layer:
            client.attribute("mlp", "saliency", x, target=0, also=[{"algorithm": "layer_activation", "layer": "nope"}])
        # checked against the inputs when the engine prepares the entry, not at the edge: still named by its index
        with pytest.raises(grpc.RpcError) as window:
            client.attribute("mlp", "saliency", x, target=0, also=[{"algorithm": "saliency"}, {"algorithm": "occlusion", "params": {"sliding_window_shapes": [[2, 2]]}}])
        got = client.attribute("mlp", "saliency", x + 0.5, target=0, also=[{"algorithm": "occlusion", "params": {"sliding_window_shapes": [[2]]}}])
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n_steps" in bad.value.details()
    assert layer.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in layer.value.details()
    assert window.value.code() == grpc.StatusCode.INVALID_ARGUMENT and window.value.details().startswith("also[1]: occlusion.sliding_window_shapes"), window.value.details()
    # and the server still serves correct answers, and says so
    model, xt = MODELS["mlp"]().eval(), torch.from_numpy(x + 0.5)
    assert_all_close((torch.from_numpy(got.attributions),), (ca.Saliency(model).attribute(xt.clone().requires_grad_(), target=0).detach(),))
    assert_all_close((torch.from_numpy(got.also[0].attributions),), (ca.Occlusion(model).attribute(xt, sliding_window_shapes=(2,), target=0),))
    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="attrserve.v1.AttributionService"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_quality_metrics_in_the_same_request(server) -> None:
    """infidelity and sensitivity_max through the server equal captum.metrics for the same seed; asking for them leaves
    the attributions as they are without."""
    (x,), _ = example_inputs("conv", 2, seed=22)
    target, seed = [1, 0], 4
    infid, sens = {"n_perturb_samples": 3, "noise_scale": 0.02}, {"n_perturb_samples": 2, "perturb_radius": 0.03}
    with AttributionClient(server.address) as client:
        got = client.attribute("conv", "integrated_gradients", x.numpy(), target=target, params={"n_steps": 10}, seed=seed,
                               evaluate={"infidelity": infid, "sensitivity_max": sens})
        plain = client.attribute("conv", "integrated_gradients", x.numpy(), target=target, params={"n_steps": 10}, seed=seed)
    model = MODELS["conv"]().eval()
    want, want_infid, want_sens = captum_quality(model, ca.IntegratedGradients(model), {"n_steps": 10}, None, (x,), (), target, seed, infid, sens)
    assert_all_close((torch.from_numpy(got.attributions),), (want[0].detach(),))
    assert_all_close((torch.from_numpy(plain.attributions),), (want[0].detach(),))
    assert got.infidelity.shape == got.sensitivity_max.shape == (2,) and plain.infidelity is None and plain.sensitivity_max is None
    assert_metric_close(torch.from_numpy(got.infidelity), want_infid)
    assert_metric_close(torch.from_numpy(got.sensitivity_max), want_sens)
