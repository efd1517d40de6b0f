"""build_request turns each Captum-style argument form into the exact proto fields."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import AsyncAttributionClient, AttributionClient, build_request, to_tensor_proto

CLIENT_ROOT = pathlib.Path(__file__).resolve().parents[2] / "clients" / "python"

X = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]], dtype=np.float32)
Y = np.array([[1.0], [2.0]], dtype=np.float64)


def req(algorithm="integrated_gradients", inputs=X, **kwargs):
    return build_request("toy", algorithm, inputs, **kwargs)


@pytest.mark.parametrize("name, value", [
    ("integrated_gradients", pb.ALGORITHM_INTEGRATED_GRADIENTS),
    ("saliency", pb.ALGORITHM_SALIENCY),
    ("input_x_gradient", pb.ALGORITHM_INPUT_X_GRADIENT),
    ("deep_lift", pb.ALGORITHM_DEEP_LIFT),
    ("gradient_shap", pb.ALGORITHM_GRADIENT_SHAP),
    ("Gradient_Shap", pb.ALGORITHM_GRADIENT_SHAP),
])
def test_algorithm_names_map_to_the_enum(name, value):
    assert req(name).algorithm == value


@pytest.mark.parametrize("name", ["unspecified", "blur ig", "IntegratedGradients", ""])
def test_unknown_algorithm_lists_the_valid_ones(name):
    with pytest.raises(ValueError, match="valid: integrated_gradients, saliency, input_x_gradient, "
                                         "deep_lift, gradient_shap"):
        req(name)


def test_minimal_request_sets_only_what_was_given():
    assert req() == pb.AttributeRequest(
        model="toy", algorithm=pb.ALGORITHM_INTEGRATED_GRADIENTS, inputs=[to_tensor_proto(X)])
    r = req()
    for field in ("target", "noise_tunnel", "seed", "params"):
        assert not (r.HasField(field) if field != "params" else r.WhichOneof("params"))


def test_scalar_fields():
    r = req(layer="net.fc1", model_version="3", request_id="r-1", seed=0,
            return_convergence_delta=True, return_outputs=True)
    assert (r.layer, r.model_version, r.request_id) == ("net.fc1", "3", "r-1")
    assert r.HasField("seed") and r.seed == 0
    assert r.return_convergence_delta and r.return_outputs


@pytest.mark.parametrize("inputs, expected", [
    (X, [X]),
    (X.tolist(), [X]),  # nested lists are data
    ((X,), [X]),
    ((X, Y), [X, Y]),
    ([X, Y], [X, Y]),  # a list of arrays is one per input
])
def test_inputs_forms(inputs, expected):
    assert list(req(inputs=inputs).inputs) == [to_tensor_proto(e) for e in expected]


@pytest.mark.parametrize("baselines, inputs, expected", [
    (None, X, []),
    (0, X, [pb.Baseline(scalar=0.0)]),
    (0.5, (X, Y), [pb.Baseline(scalar=0.5), pb.Baseline(scalar=0.5)]),  # a number serves every input
    (np.float32(0.25), X, [pb.Baseline(scalar=0.25)]),
    (X * 0, X, [pb.Baseline(tensor=to_tensor_proto(X * 0))]),
    ([[0.0, 0.0, 0.0]], X, [pb.Baseline(tensor=to_tensor_proto(np.zeros((1, 3), np.float32)))]),
    ((None, 1.0), (X, Y), [pb.Baseline(), pb.Baseline(scalar=1.0)]),
    ((Y, None), (X, Y), [pb.Baseline(tensor=to_tensor_proto(Y)), pb.Baseline()]),
    ((None, None), (X, Y), []),
    ((None,), X, []),
])
def test_baselines_forms(baselines, inputs, expected):
    assert list(req(inputs=inputs, baselines=baselines).baselines) == expected


def test_baselines_need_one_per_input():
    with pytest.raises(ValueError, match="baselines has 1 entries for 2 inputs"):
        req(inputs=(X, Y), baselines=X)
    with pytest.raises(ValueError, match="baselines has 3 entries for 2 inputs"):
        req(inputs=(X, Y), baselines=(0, 0, 0))


def idx(*values):
    return pb.TargetIndex(index=list(values))


@pytest.mark.parametrize("target, expected", [
    (0, pb.Target(index=0)),
    (np.int64(2), pb.Target(index=2)),
    ((1, 2), pb.Target(tuple=idx(1, 2))),
    ([0, 1], pb.Target(per_example=pb.TargetIndexList(indices=[idx(0), idx(1)]))),
    ([(0, 1), 2], pb.Target(per_example=pb.TargetIndexList(indices=[idx(0, 1), idx(2)]))),
    ([[0, 1], [1, 0]], pb.Target(per_example=pb.TargetIndexList(indices=[idx(0, 1), idx(1, 0)]))),
    (np.array([1, 0]), pb.Target(per_example=pb.TargetIndexList(indices=[idx(1), idx(0)]))),
])
def test_target_forms(target, expected):
    r = req(target=target)
    assert r.HasField("target") and r.target == expected


def test_a_target_array_or_tensor_of_one_element_is_one_index_as_in_captum():
    """Captum reads a target tensor with one element as one index for all examples (torch.tensor(1), a label picked
    from a tensor of labels); it was refused ("got ndarray"), or sent as one per-example entry for all the examples."""
    import torch

    for target in (torch.tensor(1), torch.tensor([1]), np.array(1), np.array([[1]], dtype=np.uint8), torch.tensor([5, 1])[1]):
        assert req(target=target).target == pb.Target(index=1), target
    assert req(target=torch.tensor([1, 0])).target == pb.Target(per_example=pb.TargetIndexList(indices=[idx(1), idx(0)]))


@pytest.mark.parametrize("target", [True, 1.5, "0", np.array([0.5]), {"a": 1}])
def test_bad_targets_are_rejected(target):
    with pytest.raises(ValueError, match="target must be"):
        req(target=target)


def test_integrated_gradients_params():
    r = req(params={"n_steps": 50, "method": "riemann_trapezoid", "multiply_by_inputs": False})
    assert r.WhichOneof("params") == "integrated_gradients"
    assert r.integrated_gradients == pb.IntegratedGradientsParams(
        n_steps=50, method="riemann_trapezoid", multiply_by_inputs=False)
    assert r.integrated_gradients.HasField("multiply_by_inputs")


@pytest.mark.parametrize("algorithm, params, expected", [
    ("saliency", {"abs": False}, pb.SaliencyParams(abs=False)),
    ("deep_lift", {"eps": 1e-6}, pb.DeepLiftParams(eps=1e-6)),
    ("gradient_shap", {"n_samples": 3, "stdevs": 0.1}, pb.GradientShapParams(n_samples=3, stdevs=[0.1])),
    ("gradient_shap", {"stdevs": [0.1, 0.2]}, pb.GradientShapParams(stdevs=[0.1, 0.2])),
    ("gradient_shap", {"stdevs": np.array([1, 2])}, pb.GradientShapParams(stdevs=[1.0, 2.0])),
    ("gradient_shap", {"n_samples": None}, pb.GradientShapParams()),  # None keeps the default
])
def test_params_go_to_the_algorithms_oneof_field(algorithm, params, expected):
    r = req(algorithm, params=params)
    assert r.WhichOneof("params") == algorithm
    assert getattr(r, algorithm) == expected


def _lists(r, field):
    return [list(v.values) for v in getattr(r.occlusion, field)]


@pytest.mark.parametrize("inputs, strides, expected", [
    ((X,), 2, [[2]]),  # Captum: one input's every dim
    ((X,), np.int64(2), [[2]]),
    ((X,), (2,), [[2]]),
    ((X,), (1, 2), [[1, 2]]),  # one input's dims
    ((X, Y), (2, 1), [[2], [1]]),  # Captum: one int per input, for its every dim
    ((X, Y), (2, (1,)), [[2], [1]]),
    ((X, Y), ((1, 2), (1,)), [[1, 2], [1]]),
    ((X, Y), 2, [[2]]),  # Captum refuses an int for two inputs; so does the server ("give one per input")
])
def test_occlusion_strides_take_captums_forms(inputs, strides, expected):
    r = req("occlusion", inputs=inputs, params={"sliding_window_shapes": (1, 2), "strides": strides})
    assert _lists(r, "strides") == expected


def test_occlusion_window_shapes_are_lists_as_in_captum():
    assert _lists(req("occlusion", inputs=(X, Y), params={"sliding_window_shapes": ((1, 2), (1,))}), "sliding_window_shapes") == [[1, 2], [1]]
    with pytest.raises(TypeError, match="params.sliding_window_shapes: expected a list of integers per input, got 2"):
        req("occlusion", params={"sliding_window_shapes": 2})  # Captum: 'int' object is not subscriptable
    with pytest.raises(TypeError, match=r"params.strides\[1\]: expected a list of integers, got 'a'"):
        req("occlusion", inputs=(X, Y), params={"sliding_window_shapes": ((1, 2), (1,)), "strides": (1, "a")})


def test_unknown_params_name_the_valid_fields():
    with pytest.raises(ValueError, match="unknown integrated_gradients params steps; "
                                         "valid: n_steps, method, multiply_by_inputs"):
        req(params={"steps": 5})


def test_params_for_an_algorithm_without_params_message():
    with pytest.raises(ValueError, match="'input_x_gradient' takes no params"):
        req("input_x_gradient", params={"n_steps": 5})
    assert req("input_x_gradient", params={}).WhichOneof("params") is None


def test_noise_tunnel():
    r = req(noise_tunnel={"nt_type": "smoothgrad", "nt_samples": 10, "stdevs": 0.1,
                          "draw_baseline_from_distrib": False})
    assert r.noise_tunnel == pb.NoiseTunnel(nt_type="smoothgrad", nt_samples=10, stdevs=[0.1])
    assert req(noise_tunnel={"stdevs": (0.1, 0.2)}).noise_tunnel.stdevs == [0.1, 0.2]
    assert req(noise_tunnel={}).HasField("noise_tunnel")  # defaults: SmoothGrad
    with pytest.raises(ValueError, match="unknown noise_tunnel fields n_sample; valid: nt_type"):
        req(noise_tunnel={"n_sample": 3})


def test_feature_masks():
    mask = np.array([[0, 0, 1]])
    assert list(req(feature_mask=mask).feature_masks) == [to_tensor_proto(mask)]
    both = req(inputs=(X, Y), feature_mask=(mask, np.array([[2]]))).feature_masks
    assert list(both) == [to_tensor_proto(mask), to_tensor_proto(np.array([[2]]))]
    with pytest.raises(ValueError, match="feature_mask has 1 entries for 2 inputs"):
        req(inputs=(X, Y), feature_mask=mask)


def test_additional_forward_args():
    extra = np.array([[1], [0]])
    assert list(req(additional_forward_args=extra).additional_forward_args) == [to_tensor_proto(extra)]
    both = req(additional_forward_args=(extra, Y)).additional_forward_args
    assert list(both) == [to_tensor_proto(extra), to_tensor_proto(Y)]


def test_build_request_is_on_both_clients():
    assert AttributionClient.build_request("toy", "saliency", X) == build_request("toy", "saliency", X)
    assert AsyncAttributionClient.build_request is build_request


def test_client_does_not_import_torch():
    code = ("import sys, attrserve_client, attrserve_client.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CLIENT_ROOT, timeout=120)


def test_other_snake_case_names_are_plugins_with_struct_params():
    r = req("blur_integrated_gradients", params={"n_steps": 20, "max_sigma": np.float32(4.0), "shape": (3, 4)})
    assert r.algorithm == pb.ALGORITHM_UNSPECIFIED
    assert r.custom_algorithm == "blur_integrated_gradients"
    assert dict(r.custom_params) == {"n_steps": 20.0, "max_sigma": 4.0, "shape": pytest.approx([3.0, 4.0])}
    assert r.WhichOneof("params") is None
