"""Hostile and malformed input: every field of AttributeRequest wrong in every way that matters, and bytes that are no
request at all. Each gets its exact status code (never INTERNAL or UNKNOWN) with a message under 2 KiB that names the
field; the server goes on serving correct answers. Values Captum accepts (explicit zeros where it takes them) are
accepted and answered with Captum's numbers."""

from __future__ import annotations

import math
import warnings

import grpc
import numpy as np
import pytest
import torch
from captum.attr import (
    DeepLift,
    FeatureAblation,
    IntegratedGradients,
    KernelShap,
    LayerConductance,
    Lime,
    NoiseTunnel,
    Saliency,
    ShapleyValueSampling,
)
from captum.metrics import infidelity, sensitivity_max
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import tensor_pb2
from attrserve_client import Attribution, AttributionClient, build_request, to_tensor_proto
from oracle import MODELS, assert_all_close
from servers import scrape

X = np.array([[0.1, 0.2, 0.3]], dtype=np.float32)
X2 = np.array([[0.3, -0.2, 0.9], [1.0, 0.5, -0.4]], dtype=np.float32)
F32 = tensor_pb2.DATA_TYPE_FLOAT32
MB = "m" * 1_000_000  # a 1 MB name: quoted whole, its status would pass grpc's 16 KiB trailer limit
INT = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
SERVICE = "/attrserve.v1.AttributionService/"


def T(array) -> tensor_pb2.Tensor:  # noqa: N802 - reads like the type it builds
    return to_tensor_proto(np.asarray(array))


def raw(shape, data=b"", dtype=F32) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def req(**fields) -> pb.AttributeRequest:
    """Saliency of `toy` on one example, target 0, with `fields` replaced (a valid request without them)."""
    base = dict(model="toy", algorithm=pb.ALGORITHM_SALIENCY, inputs=[T(X)], target=pb.Target(index=0))
    base.update(fields)
    return pb.AttributeRequest(**base)


def ig(**fields) -> pb.AttributeRequest:
    return req(algorithm=pb.ALGORITHM_INTEGRATED_GRADIENTS, **fields)


def alg(algorithm: int, **fields) -> pb.AttributeRequest:
    return req(algorithm=algorithm, **fields)


def custom(params: dict, name: str = "integrated_gradients", **fields) -> pb.AttributeRequest:
    r = req(algorithm=pb.ALGORITHM_UNSPECIFIED, custom_algorithm=name, **fields)
    r.custom_params.update(params)
    return r


def spec(algorithm: int = pb.ALGORITHM_UNSPECIFIED, params: dict | None = None, **fields) -> pb.AlgorithmSpec:
    s = pb.AlgorithmSpec(algorithm=algorithm, **fields)
    if params is not None:
        s.params.update(params)
    return s


def nested(depth: int) -> dict:
    value: dict = {"leaf": 1.0}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def ld(field: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, by hand (for bytes the message classes refuse to build)."""
    out, n = bytearray([(field << 3) | 2]), len(payload)
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out) + payload


def deep_struct_request(depth: int) -> bytes:
    """model "toy", custom_params {"a": [[[... 1.0 ...]]]} nested `depth` lists deep: past protobuf's recursion limit."""
    value = b"\x11" + b"\x00" * 8  # Value.number_value = 0.0
    for _ in range(depth):
        value = ld(6, ld(1, value))  # Value.list_value → ListValue.values
    return ld(2, b"toy") + ld(27, ld(1, ld(1, b"a") + ld(2, value)))


VALID = req().SerializeToString()
NEURON = dict(layer="lin1")


def also_req(*specs: pb.AlgorithmSpec, **fields) -> pb.AttributeRequest:
    return req(algorithm=pb.ALGORITHM_INTEGRATED_GRADIENTS, also=list(specs), **fields)


# (rpc, request or raw bytes, exact code, a substring naming the field)
CASES: dict[str, tuple[str, pb.AttributeRequest | bytes | pb.GetModelRequest, grpc.StatusCode, str]] = {
    # -- model, model_version ------------------------------------------------------------------------
    "model unknown": ("Attribute", req(model="nope"), NOT_FOUND, "model 'nope' is not served"),
    "model empty": ("Attribute", req(model=""), INT, "model is empty"),
    "model 1 MB": ("Attribute", req(model=MB), NOT_FOUND, "(1000000 characters) is not served"),
    "model_version unknown": ("Attribute", req(model_version="7"), NOT_FOUND, "has no version '7'"),
    "model_version 1 MB": ("Attribute", req(model_version=MB), NOT_FOUND, "version 'mmm"),
    # -- algorithm -------------------------------------------------------------------------------------
    "algorithm unspecified": ("Attribute", req(algorithm=pb.ALGORITHM_UNSPECIFIED), INT, "algorithm is ALGORITHM_UNSPECIFIED"),
    "algorithm out of range": ("Attribute", req(algorithm=999), INT, "algorithm 999 is not known"),
    "custom_algorithm unknown": ("Attribute", custom({}, "no_such_method"), INT, "unknown algorithm 'no_such_method'"),
    "custom_algorithm 1 MB": ("Attribute", custom({}, MB), INT, "unknown algorithm 'mmm"),
    "custom_algorithm and algorithm": ("Attribute", req(custom_algorithm="saliency"), INT, "custom_algorithm is set"),
    "params of another algorithm": ("Attribute", req(deep_lift=pb.DeepLiftParams(eps=1e-3)), INT, "params are for deep_lift"),
    # -- inputs ------------------------------------------------------------------------------------------
    "inputs none": ("Attribute", req(inputs=[]), INT, "inputs is empty"),
    "inputs count": ("Attribute", req(model="fragile", inputs=[T(X), T(X)]), INT, "takes 1 inputs (x), got 2"),
    "inputs examples differ": ("Attribute", req(model="multi", inputs=[T(np.zeros((1, 4), np.float32)), T(X2)]), INT, "inputs[1] has 2 examples"),
    "inputs dtype unspecified": ("Attribute", req(inputs=[raw([1, 3], b"\0" * 12, 0)]), INT, "inputs[0].dtype"),
    "inputs dtype out of range": ("Attribute", req(inputs=[raw([1, 3], b"\0" * 12, 77)]), INT, "inputs[0].dtype is 77"),
    "inputs integer for gradients": ("Attribute", req(inputs=[T(np.array([[1, 2, 3]]))]), INT, "inputs[0] has dtype int64"),
    "inputs shape": ("Attribute", req(model="fragile", inputs=[T(np.zeros((1, 4), np.float32))]), INT, "inputs[0] ('x'): expected shape"),
    "inputs scalar": ("Attribute", req(inputs=[raw([], b"\0" * 4)]), INT, "inputs[0] is a scalar"),
    "inputs no examples": ("Attribute", req(inputs=[raw([0, 3])]), INT, "inputs have 0 examples"),
    "inputs byte length": ("Attribute", req(inputs=[raw([1, 3], b"\0" * 8)]), INT, "inputs[0]: shape [1, 3] of DATA_TYPE_FLOAT32 needs 12"),
    "inputs dims overflow": ("Attribute", req(inputs=[raw([2**32, 2**32])]), INT, "inputs[0].shape [4294967296, 4294967296]"),
    "inputs dims wrap to 0": ("Attribute", req(inputs=[raw([2**33, 2**31, 4])]), INT, "inputs[0].shape"),
    # empty, but its nonzero dims span 2**63 bytes: numpy refuses to shape it ("array is too big"), so the edge does
    "inputs empty past numpy's bytes": (
        "Attribute", req(inputs=[raw([0, 2**61])]), INT, "inputs[0].shape [0, 2305843009213693952] of DATA_TYPE_FLOAT32",
    ),
    "inputs empty past numpy's bytes, float64": (
        "Attribute", req(inputs=[raw([0, 2**60], dtype=tensor_pb2.DATA_TYPE_FLOAT64)]),
        INT, "inputs[0].shape [0, 1152921504606846976] of DATA_TYPE_FLOAT64",
    ),
    "inputs dims negative": ("Attribute", req(inputs=[raw([1, -3])]), INT, "inputs[0].shape [1, -3] has a negative dim"),
    "inputs too many dims": ("Attribute", req(inputs=[raw([1] * 40, b"\0" * 4)]), INT, "inputs[0].shape has 40 dims"),
    # -- baselines -----------------------------------------------------------------------------------------
    "baselines count": ("Attribute", ig(baselines=[pb.Baseline(scalar=0), pb.Baseline(scalar=1)]), INT, "one baseline per input (1) or none, got 2"),
    "baselines shape": ("Attribute", ig(baselines=[pb.Baseline(tensor=T(np.zeros((1, 4), np.float32)))]), INT, "baselines[0] has shape (1, 4)"),
    "baselines rows": (
        "Attribute", ig(inputs=[T(X2)], target=pb.Target(index=0), baselines=[pb.Baseline(tensor=T(np.zeros((3, 3), np.float32)))]),
        INT, "baselines[0] has 3 rows",
    ),
    "baselines bytes": ("Attribute", ig(baselines=[pb.Baseline(tensor=raw([1, 3], b"\0"))]), INT, "baselines[0].tensor: shape [1, 3]"),
    "baselines where none are taken": ("Attribute", req(baselines=[pb.Baseline(scalar=1)]), INT, "saliency takes no baselines"),
    # -- target --------------------------------------------------------------------------------------------
    "target out of range": ("Attribute", req(target=pb.Target(index=5)), INT, "target index 5 is out of range"),
    "target negative out of range": ("Attribute", req(target=pb.Target(index=-3)), INT, "target index -3 is out of range"),
    "target count": (
        "Attribute", req(target=pb.Target(per_example=pb.TargetIndexList(indices=[pb.TargetIndex(index=[0])] * 2))),
        INT, "target.per_example has 2 entries; there are 1 examples",
    ),
    "target too many indices": ("Attribute", req(target=pb.Target(tuple=pb.TargetIndex(index=[0, 0]))), INT, "target has 2 indices"),
    "target huge tuple": ("Attribute", req(target=pb.Target(tuple=pb.TargetIndex(index=[0] * 100_000))), INT, "target.tuple has 100000 indices"),
    "target missing": ("Attribute", req(target=None), INT, "target must select one value per example"),
    "target where none is taken": ("Attribute", alg(pb.ALGORITHM_LAYER_ACTIVATION, **NEURON), INT, "takes no target"),
    # -- additional_forward_args ---------------------------------------------------------------------------
    "additional_forward_args dim 0": (
        "Attribute", req(model="text", inputs=[T(np.zeros((2, 4, 6), np.float32))], additional_forward_args=[T(np.ones((3, 4), np.float32))]),
        INT, "additional_forward_args[0] has shape (3, 4)",
    ),
    "additional_forward_args bytes": ("Attribute", req(additional_forward_args=[raw([1, 4], b"\0")]), INT, "additional_forward_args[0]: shape"),
    # -- layer ---------------------------------------------------------------------------------------------
    "layer unknown": ("Attribute", alg(pb.ALGORITHM_LAYER_INTEGRATED_GRADIENTS, layer="nope"), NOT_FOUND, "has no layer 'nope'"),
    "layer 1 MB": ("Attribute", alg(pb.ALGORITHM_LAYER_INTEGRATED_GRADIENTS, layer=MB), NOT_FOUND, "has no layer 'mmm"),
    "layer missing": ("Attribute", alg(pb.ALGORITHM_LAYER_INTEGRATED_GRADIENTS), INT, "layer_integrated_gradients needs `layer`"),
    "layer on an input method": ("Attribute", req(layer="lin1"), INT, "layer is only for layer methods"),
    # -- params: explicit zeros where Captum raises, caps, NaN and negative stdevs, bad strings ------------------
    "integrated_gradients.n_steps 0": ("Attribute", ig(integrated_gradients=pb.IntegratedGradientsParams(n_steps=0)), INT, "integrated_gradients.n_steps must be at least 1, got 0"),
    "integrated_gradients.n_steps 1 riemann": (
        "Attribute", ig(integrated_gradients=pb.IntegratedGradientsParams(n_steps=1, method="riemann_left")), INT, "integrated_gradients.n_steps must be at least 2",
    ),
    "integrated_gradients.n_steps over the cap": (
        "Attribute", ig(integrated_gradients=pb.IntegratedGradientsParams(n_steps=501)), INT, "integrated_gradients.n_steps is 501, over this server's limit of 500",
    ),
    "integrated_gradients.method": ("Attribute", ig(integrated_gradients=pb.IntegratedGradientsParams(method="simpson")), INT, "integrated_gradients.method must be one of"),
    "integrated_gradients.method 1 MB": ("Attribute", ig(integrated_gradients=pb.IntegratedGradientsParams(method=MB)), INT, "integrated_gradients.method must be one of"),
    "layer_integrated_gradients.n_steps 0": (
        "Attribute", alg(pb.ALGORITHM_LAYER_INTEGRATED_GRADIENTS, layer="lin1", layer_integrated_gradients=pb.LayerIntegratedGradientsParams(n_steps=0)),
        INT, "layer_integrated_gradients.n_steps must be at least 1",
    ),
    "layer_conductance.n_steps 0 riemann": (
        "Attribute", alg(pb.ALGORITHM_LAYER_CONDUCTANCE, layer="lin1", layer_conductance=pb.LayerConductanceParams(n_steps=0, method="riemann_left")),
        INT, "layer_conductance.n_steps must be at least 1, got 0",
    ),
    "internal_influence.n_steps 0": (
        "Attribute", alg(pb.ALGORITHM_INTERNAL_INFLUENCE, layer="lin1", internal_influence=pb.InternalInfluenceParams(n_steps=0)),
        INT, "internal_influence.n_steps must be at least 1",
    ),
    "neuron_integrated_gradients.n_steps 0": (
        "Attribute", alg(pb.ALGORITHM_NEURON_INTEGRATED_GRADIENTS, target=None, layer="lin1",
                         neuron_integrated_gradients=pb.NeuronIntegratedGradientsParams(neuron_selector=[0], n_steps=0)),
        INT, "neuron_integrated_gradients.n_steps must be at least 1",
    ),
    "neuron_conductance.n_steps 1": (
        "Attribute", alg(pb.ALGORITHM_NEURON_CONDUCTANCE, layer="lin1", neuron_conductance=pb.NeuronConductanceParams(neuron_selector=[0], n_steps=1)),
        INT, "neuron_conductance.n_steps must be at least 2",
    ),
    "gradient_shap.n_samples 0": ("Attribute", alg(pb.ALGORITHM_GRADIENT_SHAP, gradient_shap=pb.GradientShapParams(n_samples=0)), INT, "gradient_shap.n_samples must be at least 1"),
    "gradient_shap.stdevs negative": ("Attribute", alg(pb.ALGORITHM_GRADIENT_SHAP, gradient_shap=pb.GradientShapParams(stdevs=[-1.0])), INT, "gradient_shap.stdevs must be >= 0"),
    "gradient_shap.stdevs NaN": ("Attribute", alg(pb.ALGORITHM_GRADIENT_SHAP, gradient_shap=pb.GradientShapParams(stdevs=[math.nan])), INT, "gradient_shap.stdevs must be >= 0"),
    "gradient_shap.stdevs count": ("Attribute", alg(pb.ALGORITHM_GRADIENT_SHAP, gradient_shap=pb.GradientShapParams(stdevs=[1, 2, 3])), INT, "gradient_shap.stdevs: give one value"),
    "layer_gradient_shap.stdevs negative": (
        "Attribute", alg(pb.ALGORITHM_LAYER_GRADIENT_SHAP, layer="lin1", layer_gradient_shap=pb.LayerGradientShapParams(stdevs=[0.1, -0.5])),
        INT, "layer_gradient_shap.stdevs[1] must be >= 0",
    ),
    "layer_gradient_shap.n_samples 0": (
        "Attribute", alg(pb.ALGORITHM_LAYER_GRADIENT_SHAP, layer="lin1", layer_gradient_shap=pb.LayerGradientShapParams(n_samples=0)),
        INT, "layer_gradient_shap.n_samples must be at least 1",
    ),
    "neuron_gradient_shap.stdevs NaN": (
        "Attribute", alg(pb.ALGORITHM_NEURON_GRADIENT_SHAP, target=None, layer="lin1",
                         neuron_gradient_shap=pb.NeuronGradientShapParams(neuron_selector=[0], stdevs=[math.nan])),
        INT, "neuron_gradient_shap.stdevs must be >= 0",
    ),
    "neuron_gradient_shap.n_samples 0": (
        "Attribute", alg(pb.ALGORITHM_NEURON_GRADIENT_SHAP, target=None, layer="lin1",
                         neuron_gradient_shap=pb.NeuronGradientShapParams(neuron_selector=[0], n_samples=0)),
        INT, "neuron_gradient_shap.n_samples must be at least 1",
    ),
    "neuron_gradient.neuron_selector missing": ("Attribute", alg(pb.ALGORITHM_NEURON_GRADIENT, target=None, layer="lin1"), INT, "neuron_gradient.neuron_selector is required"),
    "neuron_gradient.neuron_selector huge": (
        "Attribute", alg(pb.ALGORITHM_NEURON_GRADIENT, target=None, layer="lin1", neuron_gradient=pb.NeuronGradientParams(neuron_selector=[0] * 100_000)),
        INT, "neuron_gradient.neuron_selector has 100000 indices",
    ),
    "feature_ablation.perturbations_per_eval 0": (
        "Attribute", alg(pb.ALGORITHM_FEATURE_ABLATION, feature_ablation=pb.FeatureAblationParams(perturbations_per_eval=0)),
        INT, "feature_ablation.perturbations_per_eval must be at least 1, got 0",
    ),
    "feature_permutation.perturbations_per_eval 0": (
        "Attribute", alg(pb.ALGORITHM_FEATURE_PERMUTATION, feature_permutation=pb.FeaturePermutationParams(perturbations_per_eval=0)),
        INT, "feature_permutation.perturbations_per_eval must be at least 1",
    ),
    "occlusion.perturbations_per_eval 0": (
        "Attribute", alg(pb.ALGORITHM_OCCLUSION, occlusion=pb.OcclusionParams(sliding_window_shapes=[pb.IntList(values=[1])], perturbations_per_eval=0)),
        INT, "occlusion.perturbations_per_eval must be at least 1",
    ),
    "occlusion.sliding_window_shapes missing": ("Attribute", alg(pb.ALGORITHM_OCCLUSION), INT, "occlusion.sliding_window_shapes is required"),
    "occlusion.sliding_window_shapes 0": (
        "Attribute", alg(pb.ALGORITHM_OCCLUSION, occlusion=pb.OcclusionParams(sliding_window_shapes=[pb.IntList(values=[0])])),
        INT, "occlusion.sliding_window_shapes[0] must be positive",
    ),
    "shapley_value_sampling.perturbations_per_eval 0": (
        "Attribute", alg(pb.ALGORITHM_SHAPLEY_VALUE_SAMPLING, shapley_value_sampling=pb.ShapleyValueSamplingParams(perturbations_per_eval=0)),
        INT, "shapley_value_sampling.perturbations_per_eval must be at least 1",
    ),
    "shapley_values.perturbations_per_eval 0": (
        "Attribute", alg(pb.ALGORITHM_SHAPLEY_VALUES, shapley_values=pb.ShapleyValuesParams(perturbations_per_eval=0)),
        INT, "shapley_values.perturbations_per_eval must be at least 1",
    ),
    "lime.n_samples 0": ("Attribute", alg(pb.ALGORITHM_LIME, lime=pb.LimeParams(n_samples=0)), INT, "lime.n_samples must be at least 1, got 0"),
    "lime.kernel_width 0": ("Attribute", alg(pb.ALGORITHM_LIME, lime=pb.LimeParams(kernel_width=0.0)), INT, "lime.kernel_width must be a nonzero number"),
    "lime.kernel_width NaN": ("Attribute", alg(pb.ALGORITHM_LIME, lime=pb.LimeParams(kernel_width=math.nan)), INT, "lime.kernel_width"),
    "lime.alpha negative": ("Attribute", alg(pb.ALGORITHM_LIME, lime=pb.LimeParams(alpha=-1.0)), INT, "lime.alpha must be a finite number >= 0"),
    "kernel_shap.n_samples 0": ("Attribute", alg(pb.ALGORITHM_KERNEL_SHAP, kernel_shap=pb.KernelShapParams(n_samples=0)), INT, "kernel_shap.n_samples must be at least 1"),
    "layer_feature_ablation.perturbations_per_eval 0": (
        "Attribute", alg(pb.ALGORITHM_LAYER_FEATURE_ABLATION, layer="lin1", layer_feature_ablation=pb.LayerFeatureAblationParams(perturbations_per_eval=0)),
        INT, "layer_feature_ablation.perturbations_per_eval must be at least 1",
    ),
    "neuron_feature_ablation.perturbations_per_eval 0": (
        "Attribute", alg(pb.ALGORITHM_NEURON_FEATURE_ABLATION, target=None, layer="lin1",
                         neuron_feature_ablation=pb.NeuronFeatureAblationParams(neuron_selector=[0], perturbations_per_eval=0)),
        INT, "neuron_feature_ablation.perturbations_per_eval must be at least 1",
    ),
    "occlusion.sliding_window_shapes huge": (
        "Attribute", alg(pb.ALGORITHM_OCCLUSION, occlusion=pb.OcclusionParams(sliding_window_shapes=[pb.IntList(values=[1] * 100_000)])),
        INT, "occlusion.sliding_window_shapes[0] is (1, 1, 1",
    ),
    "lime on inputs without scalars": ("Attribute", alg(pb.ALGORITHM_LIME, inputs=[raw([1, 0])]), INT, "inputs have no scalars after dim 0"),
    "shapley_value_sampling on inputs without scalars": (
        "Attribute", alg(pb.ALGORITHM_SHAPLEY_VALUE_SAMPLING, inputs=[raw([1, 0])]), INT, "inputs have no scalars after dim 0",
    ),
    "guided_grad_cam.interpolate_mode": (
        "Attribute", alg(pb.ALGORITHM_GUIDED_GRAD_CAM, layer="lin1", guided_grad_cam=pb.GuidedGradCamParams(interpolate_mode="x" * 5000)),
        INT, "guided_grad_cam.interpolate_mode must be one of",
    ),
    # -- numbers past what their field's integers or tensors hold (a Struct's whole double becomes a Python int) ---------
    "custom_params neuron_selector 1e19": (
        "Attribute", custom({"neuron_selector": [1e19]}, "neuron_gradient", target=None, layer="lin1"),
        INT, "neuron_gradient.neuron_selector index 10000000000000000000 is out of range",
    ),
    "also[0] neuron_selector 1e300": (
        "Attribute", req(also=[spec(custom_algorithm="neuron_gradient", layer="lin1", params={"neuron_selector": 1e300})]),
        INT, "also[0]: neuron_gradient.neuron_selector index 10000000000000000525047602552044202487044685811081591549158541155118",
    ),
    "baselines scalar 1e300 in float32": (
        "Attribute", ig(baselines=[pb.Baseline(scalar=1e300)]), INT, "baselines[0] is 1e+300, which float32",
    ),
    "layer_feature_ablation.layer_baselines 1e300": (
        "Attribute",
        alg(pb.ALGORITHM_LAYER_FEATURE_ABLATION, layer="lin1", layer_feature_ablation=pb.LayerFeatureAblationParams(layer_baselines=1e300)),
        INT, "layer_feature_ablation.layer_baselines is 1e+300",
    ),
    "evaluate.sensitivity_max.perturb_radius 1e300": (
        "Attribute", req(evaluate=pb.Evaluate(sensitivity_max=pb.SensitivityMax(perturb_radius=1e300))),
        INT, "evaluate.sensitivity_max.perturb_radius is 1e+300",
    ),
    # -- an empty baseline distribution: nothing to draw from ------------------------------------------------------
    "gradient_shap baselines of 0 rows": (
        "Attribute", alg(pb.ALGORITHM_GRADIENT_SHAP, baselines=[pb.Baseline(tensor=T(np.zeros((0, 3), np.float32)))]),
        INT, "baselines[0] has 0 rows",
    ),
    "noise_tunnel draw_baseline_from_distrib of 0 rows": (
        "Attribute",
        req(baselines=[pb.Baseline(tensor=T(np.zeros((0, 3), np.float32)))],
            noise_tunnel=pb.NoiseTunnel(nt_samples=2, draw_baseline_from_distrib=True)),
        INT, "baselines[0] has 0 rows",
    ),
    # -- noise_tunnel --------------------------------------------------------------------------------------
    "noise_tunnel.nt_type": ("Attribute", req(noise_tunnel=pb.NoiseTunnel(nt_type="blur")), INT, "noise_tunnel.nt_type must be one of"),
    "noise_tunnel.nt_type 1 MB": ("Attribute", req(noise_tunnel=pb.NoiseTunnel(nt_type=MB)), INT, "noise_tunnel.nt_type must be one of"),
    "noise_tunnel.nt_samples 0": ("Attribute", req(noise_tunnel=pb.NoiseTunnel(nt_samples=0)), INT, "noise_tunnel.nt_samples must be at least 1, got 0"),
    "noise_tunnel.nt_samples over the cap": ("Attribute", req(noise_tunnel=pb.NoiseTunnel(nt_samples=1001)), INT, "noise_tunnel.nt_samples is 1001, over"),
    "noise_tunnel.stdevs NaN": ("Attribute", req(noise_tunnel=pb.NoiseTunnel(stdevs=[math.nan])), INT, "noise_tunnel.stdevs must be >= 0"),
    "noise_tunnel.stdevs negative": ("Attribute", req(noise_tunnel=pb.NoiseTunnel(stdevs=[-0.1])), INT, "noise_tunnel.stdevs must be >= 0"),
    # -- feature_masks -------------------------------------------------------------------------------------
    "feature_masks shape": ("Attribute", alg(pb.ALGORITHM_FEATURE_ABLATION, feature_masks=[T(np.zeros((1, 4), np.int64))]), INT, "feature_masks[0] has shape (1, 4)"),
    "feature_masks dtype": ("Attribute", alg(pb.ALGORITHM_FEATURE_ABLATION, feature_masks=[T(np.zeros((1, 3), np.float32))]), INT, "feature_masks[0] must hold integer"),
    "feature_masks count": ("Attribute", alg(pb.ALGORITHM_FEATURE_ABLATION, feature_masks=[T(np.zeros((1, 3), np.int64))] * 2), INT, "one feature mask per input (1) or none, got 2"),
    "feature_masks id 2^40 lime": ("Attribute", alg(pb.ALGORITHM_LIME, feature_masks=[T(np.array([[0, 2**40, 1]]))]), INT, "feature_masks: lime takes one interpretable feature per id"),
    "feature_masks id 2^40 kernel_shap": ("Attribute", alg(pb.ALGORITHM_KERNEL_SHAP, feature_masks=[T(np.array([[0, 2**40, 1]]))]), INT, "feature_masks: kernel_shap"),
    "feature_masks id 2^40 shapley_value_sampling": ("Attribute", alg(pb.ALGORITHM_SHAPLEY_VALUE_SAMPLING, feature_masks=[T(np.array([[0, 2**40, 1]]))]), INT, "feature_masks use id 1099511627776"),
    "feature_masks where none are taken": ("Attribute", req(feature_masks=[T(np.zeros((1, 3), np.int64))]), INT, "feature_masks is only for perturbation methods"),
    # -- seed, priority --------------------------------------------------------------------------------------
    "seed out of range": ("Attribute", req(seed=2**40), INT, "seed must be in [0, 4294967295], got 1099511627776"),
    "priority out of range": ("Attribute", req(priority=7), INT, "priority 7 is not one of"),
    # -- also[] ----------------------------------------------------------------------------------------------
    "also[1] unknown algorithm": ("Attribute", also_req(spec(pb.ALGORITHM_SALIENCY), spec(custom_algorithm="nope")), INT, "also[1]: unknown algorithm 'nope'"),
    "also[0] algorithm and custom_algorithm": ("Attribute", also_req(spec(pb.ALGORITHM_SALIENCY, custom_algorithm="saliency")), INT, "also[0]: set exactly one"),
    "also[0] neither": ("Attribute", also_req(spec()), INT, "also[0]: set exactly one"),
    "also[1].algorithm out of range": ("Attribute", also_req(spec(pb.ALGORITHM_SALIENCY), spec(999)), INT, "also[1].algorithm 999 is not known"),
    "also[0] n_steps 0": ("Attribute", also_req(spec(pb.ALGORITHM_INTEGRATED_GRADIENTS, {"n_steps": 0})), INT, "also[0]: integrated_gradients.n_steps must be at least 1"),
    "also[1] stdevs NaN": ("Attribute", also_req(spec(pb.ALGORITHM_SALIENCY), spec(pb.ALGORITHM_GRADIENT_SHAP, {"stdevs": math.nan})), INT, "also[1].params.stdevs is nan"),
    "also[1] stdevs negative": ("Attribute", also_req(spec(pb.ALGORITHM_SALIENCY), spec(pb.ALGORITHM_GRADIENT_SHAP, {"stdevs": [-1.0]})), INT, "also[1]: gradient_shap.stdevs must be >= 0"),
    "also[1] stdevs lists of lists": (
        "Attribute", also_req(spec(pb.ALGORITHM_SALIENCY), spec(pb.ALGORITHM_GRADIENT_SHAP, {"stdevs": [[1.0]]})), INT,
        "also[1]: gradient_shap.stdevs must be a number or a list of numbers, got [[1.0]]",
    ),
    "also[0] params too deep": ("Attribute", also_req(spec(pb.ALGORITHM_SALIENCY, nested(9))), INT, "also[0].params.a.a.a.a.a.a.a.a is nested more than 8 levels"),
    "also[0] params unknown key": ("Attribute", also_req(spec(pb.ALGORITHM_SALIENCY, {"k" * 5000: 1.0})), INT, "also[0].params has a key of 5000 characters"),
    "also[0] noise_tunnel.nt_samples 0": (
        "Attribute", also_req(spec(pb.ALGORITHM_SALIENCY, noise_tunnel=pb.NoiseTunnel(nt_samples=0))), INT, "also[0]: noise_tunnel.nt_samples must be at least 1",
    ),
    "also[1] layer unknown": (
        "Attribute", also_req(spec(pb.ALGORITHM_SALIENCY), spec(pb.ALGORITHM_LAYER_CONDUCTANCE, layer=MB)), NOT_FOUND, "also[1]: model 'toy' has no layer 'mmm",
    ),
    "also[0] convergence delta": ("Attribute", also_req(spec(pb.ALGORITHM_SALIENCY, return_convergence_delta=True)), INT, "also[0]: saliency has no convergence delta"),
    # -- evaluate --------------------------------------------------------------------------------------------
    "evaluate.infidelity.n_perturb_samples 0": (
        "Attribute", req(evaluate=pb.Evaluate(infidelity=pb.Infidelity(n_perturb_samples=0))), INT, "evaluate.infidelity.n_perturb_samples must be at least 1",
    ),
    "evaluate.sensitivity_max.n_perturb_samples 0": (
        "Attribute", req(evaluate=pb.Evaluate(sensitivity_max=pb.SensitivityMax(n_perturb_samples=0))), INT, "evaluate.sensitivity_max.n_perturb_samples must be at least 1",
    ),
    "evaluate.sensitivity_max.perturb_radius negative": (
        "Attribute", req(evaluate=pb.Evaluate(sensitivity_max=pb.SensitivityMax(perturb_radius=-1))), INT, "evaluate.sensitivity_max.perturb_radius must be a finite number >= 0",
    ),
    "evaluate.infidelity.noise_scale negative": (
        "Attribute", req(evaluate=pb.Evaluate(infidelity=pb.Infidelity(noise_scale=-0.1))), INT, "evaluate.infidelity.noise_scale must be a finite number >= 0",
    ),
    "evaluate.infidelity.noise_scale NaN": (
        "Attribute", req(evaluate=pb.Evaluate(infidelity=pb.Infidelity(noise_scale=math.nan))), INT, "evaluate.infidelity.noise_scale",
    ),
    # -- custom_params (a Struct: bounded, finite) -------------------------------------------------------------
    "custom_params NaN": ("Attribute", custom({"n_steps": math.nan}), INT, "custom_params.n_steps is nan"),
    "custom_params inf": ("Attribute", custom({"n_steps": math.inf}), INT, "custom_params.n_steps is inf"),
    "custom_params -inf in a list": ("Attribute", custom({"stdevs": [0.1, -math.inf]}, "gradient_shap"), INT, "custom_params.stdevs[1] is -inf"),
    "custom_params stdevs lists of lists": (  # was INTERNAL (a TypeError comparing a list with 0)
        "Attribute", custom({"stdevs": [[1.0], [2.0]]}, "gradient_shap"), INT,
        "gradient_shap.stdevs must be a number or a list of numbers, got [[1.0], [2.0]]",
    ),
    "custom_params too deep": ("Attribute", custom(nested(12)), INT, "is nested more than 8 levels deep"),
    "custom_params too many values": ("Attribute", custom({"stdevs": [0.1] * 2000}, "gradient_shap"), INT, "custom_params.stdevs holds more than 1000 values"),
    "custom_params string too long": ("Attribute", custom({"method": "g" * 5000}), INT, "custom_params.method is a string of 5000 characters"),
    "custom_params unknown key": ("Attribute", custom({"steps": 5.0}), INT, "integrated_gradients: unknown parameter(s) steps"),
    "custom_params n_steps 0": ("Attribute", custom({"n_steps": 0}), INT, "integrated_gradients.n_steps must be at least 1"),
    "custom_params n_steps text": ("Attribute", custom({"n_steps": "ten"}), INT, "integrated_gradients.n_steps must be an integer, got 'ten'"),
    "custom_params without custom_algorithm": ("Attribute", (lambda r: (r.custom_params.update({"a": 1.0}), r)[1])(req()), INT, "custom_params is only for custom_algorithm"),
    # -- bytes that are no request ------------------------------------------------------------------------------
    "garbage": ("Attribute", b"\xff\xff\xff\xff garbage", INT, "not a valid attrserve.v1.AttributeRequest"),
    "truncated": ("Attribute", VALID[:-5], INT, "not a valid attrserve.v1.AttributeRequest"),
    "nested past protobuf's limit": ("Attribute", deep_struct_request(200), INT, "not a valid attrserve.v1.AttributeRequest"),
    "invalid UTF-8 in a string": ("Attribute", ld(2, b"\xff\xfe"), INT, "not a valid attrserve.v1.AttributeRequest"),
    "GetModel garbage": ("GetModel", b"\x0a\xff\x01", INT, "not a valid attrserve.v1.GetModelRequest"),
    "ListModels garbage": ("ListModels", b"\xff", INT, "not a valid attrserve.v1.ListModelsRequest"),
    "RepositoryIndex garbage": ("RepositoryIndex", b"\x08", INT, "not a valid attrserve.v1.RepositoryIndexRequest"),
    # -- GetModel ---------------------------------------------------------------------------------------------
    "GetModel unknown": ("GetModel", pb.GetModelRequest(model="nope"), NOT_FOUND, "model 'nope' is not served"),
    "GetModel 1 MB": ("GetModel", pb.GetModelRequest(model=MB), NOT_FOUND, "(1000000 characters) is not served"),
    "GetModel version 1 MB": ("GetModel", pb.GetModelRequest(model="toy", model_version=MB), NOT_FOUND, "has no version 'mmm"),
}


def call(address: str, rpc: str, request) -> tuple[grpc.StatusCode, str]:
    """The RPC's status and message; `request` goes out as its bytes (raw bytes as they are)."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    service = "/attrserve.v1.ModelRepositoryService/" if rpc == "RepositoryIndex" else SERVICE
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)]) as channel:
        method = channel.unary_unary(service + rpc, request_serializer=None, response_deserializer=None)
        try:
            method(data, timeout=60)
        except grpc.RpcError as e:
            return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


def test_matrix_is_big_enough() -> None:
    assert len(CASES) >= 60


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_its_status_naming_the_field(server, name: str) -> None:
    rpc, request, code, field = CASES[name]
    got, details = call(server.address, rpc, request)
    assert got not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), details
    assert got == code, details
    assert field in details, details
    assert len(details.encode()) < 2048, len(details)


def test_stream_answers_garbage_with_an_error_entry_and_goes_on(server) -> None:
    """Four messages on one AttributeStream: garbage, a good request, a message whose request is garbage, another good
    one. The bad ones get INVALID_ARGUMENT entries (request_id: their position), the good ones Captum's answers."""
    good = [
        build_request("toy", "integrated_gradients", X2, target=1, request_id="a", params={"n_steps": 20}),
        build_request("toy", "saliency", X2 * 2, target=0, request_id="b"),
    ]
    messages = [
        b"\xff\xff\xff\xff",
        pb.AttributeStreamRequest(request=good[0]).SerializeToString(),
        ld(1, b"\xff\xff\xff"),
        pb.AttributeStreamRequest(request=good[1]).SerializeToString(),
    ]
    with grpc.insecure_channel(server.address) as channel:
        stream = channel.stream_stream(
            SERVICE + "AttributeStream", request_serializer=None, response_deserializer=pb.AttributeStreamResponse.FromString
        )
        responses = {r.request_id: r for r in stream(iter(messages), timeout=60)}
    assert set(responses) == {"0", "a", "2", "b"}
    for position in ("0", "2"):
        entry = responses[position]
        assert entry.WhichOneof("result") == "error"
        assert entry.error.code == INT.value[0]
        assert "not a valid attrserve.v1.AttributeStreamRequest" in entry.error.message
    toy = MODELS["toy"]()
    want_a = IntegratedGradients(toy).attribute(torch.from_numpy(X2), target=1, n_steps=20)
    want_b = Saliency(toy).attribute(torch.from_numpy(X2 * 2).requires_grad_(), target=0)
    for request_id, want in (("a", want_a), ("b", want_b)):
        assert responses[request_id].WhichOneof("result") == "response"
        got = Attribution.from_response(responses[request_id].response, single=True).attributions
        assert_all_close((torch.from_numpy(got),), (want.detach(),), atol=1e-5)


def test_requests_that_do_not_parse_are_counted(server) -> None:
    before = scrape(server.running.metrics_port)
    for _ in range(3):
        assert call(server.address, "Attribute", b"\xff\xff")[0] == INT
    after = scrape(server.running.metrics_port)
    labels = dict(grpc_code="INVALID_ARGUMENT", grpc_method="Attribute", grpc_service="attrserve.v1.AttributionService", grpc_type="unary")
    key = ("grpc_server_handled_total", frozenset(labels.items()))
    assert after[key] - before.get(key, 0.0) == 3
    completed = ("attrserve_attributions_completed_total", frozenset(dict(model="unknown", algorithm="unknown", grpc_code="INVALID_ARGUMENT").items()))
    assert after[completed] - before.get(completed, 0.0) == 3


# -- values Captum accepts: accepted, with Captum's numbers ---------------------------------------------------------


def _toy() -> torch.nn.Module:
    return MODELS["toy"]()


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def _captum_infidelity(inputs: torch.Tensor, seed: int) -> torch.Tensor:
    toy = _toy()
    _seeded(seed)
    attributions = Saliency(toy).attribute(inputs.clone().requires_grad_(), target=0)

    def perturb(x):
        noise = torch.randn(x.shape) * 0.0  # noise_scale 0
        return noise, x - noise

    return infidelity(toy, perturb, inputs, attributions, target=0, n_perturb_samples=10)


def _captum_sensitivity(inputs: torch.Tensor, seed: int) -> torch.Tensor:
    toy = _toy()
    _seeded(seed)
    Saliency(toy).attribute(inputs.clone().requires_grad_(), target=0)
    return sensitivity_max(Saliency(toy).attribute, inputs, target=0, perturb_radius=0.0, n_perturb_samples=10)


ACCEPTED = {
    "layer_conductance.n_steps 0": (
        dict(algorithm="layer_conductance", layer="lin1", params={"n_steps": 0}, return_convergence_delta=True),
        None,  # below: Captum's answer and its delta
    ),
    "shapley_value_sampling.n_samples 0 (NaN, as Captum)": (
        dict(algorithm="shapley_value_sampling", params={"n_samples": 0}),
        lambda m, x: ShapleyValueSampling(m).attribute(x, target=1, n_samples=0),
    ),
    "lime.perturbations_per_eval 0": (
        dict(algorithm="lime", params={"perturbations_per_eval": 0}),
        lambda m, x: Lime(m).attribute(x, target=1, perturbations_per_eval=0),
    ),
    "kernel_shap.perturbations_per_eval 0": (
        dict(algorithm="kernel_shap", params={"perturbations_per_eval": 0}),
        lambda m, x: KernelShap(m).attribute(x, target=1, perturbations_per_eval=0),
    ),
    "deep_lift.eps 0": (dict(algorithm="deep_lift", params={"eps": 0.0}), lambda m, x: DeepLift(m, eps=0.0).attribute(x, target=1)),
    "deep_lift.eps negative": (dict(algorithm="deep_lift", params={"eps": -1.0}), lambda m, x: DeepLift(m, eps=-1.0).attribute(x, target=1)),
    "noise_tunnel.stdevs 0": (
        dict(algorithm="saliency", noise_tunnel={"stdevs": 0.0, "nt_samples": 3}),
        lambda m, x: NoiseTunnel(Saliency(m)).attribute(x, target=1, stdevs=0.0, nt_samples=3),
    ),
    "feature id 2^40 on feature_ablation": (
        dict(algorithm="feature_ablation", feature_mask=np.array([[0, 2**40, 0]])),
        lambda m, x: FeatureAblation(m).attribute(x, target=1, feature_mask=torch.tensor([[0, 2**40, 0]])),
    ),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_values_captum_accepts_get_captums_numbers(server, name: str) -> None:
    kwargs, captum = ACCEPTED[name]
    kwargs = dict(kwargs)
    algorithm = kwargs.pop("algorithm")
    with AttributionClient(server.address) as client:
        got = client.attribute("toy", algorithm, X2, target=1, seed=7, **kwargs)
    toy, x = _toy(), torch.from_numpy(X2)
    _seeded(7)  # after building the model: its Linear layers draw from the global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if algorithm == "layer_conductance":
            want, delta = LayerConductance(toy, toy.lin1).attribute(x, target=1, n_steps=0, return_convergence_delta=True)
            assert_all_close((torch.from_numpy(got.convergence_delta),), (delta.detach(),), atol=1e-5, informative=False)
        else:
            want = captum(toy, x.clone().requires_grad_() if algorithm in ("deep_lift", "saliency") else x)
    got_t, want_t = torch.from_numpy(np.asarray(got.attributions)), want.detach()
    if name.startswith("shapley_value_sampling"):
        assert bool(torch.isnan(got_t).all()) and bool(torch.isnan(want_t).all()) and got_t.shape == want_t.shape
    else:
        assert_all_close((got_t,), (want_t,), atol=1e-5, informative=False)


def test_occlusion_through_a_struct_is_captums(server) -> None:
    """custom_params (a Struct: every number a double) give Occlusion its windows as whole numbers."""
    from captum.attr import Occlusion

    request = custom({"sliding_window_shapes": [2], "strides": 1}, "occlusion", inputs=[T(X2)], target=pb.Target(index=1))
    with AttributionClient(server.address) as client:
        got = Attribution.from_response(client._stub.Attribute(request, timeout=60), single=True).attributions
    want = Occlusion(_toy()).attribute(torch.from_numpy(X2), target=1, sliding_window_shapes=(2,), strides=1)
    assert_all_close((torch.from_numpy(got),), (want.detach(),), atol=1e-5)


@pytest.mark.parametrize("metric", ["infidelity", "sensitivity_max"])
def test_metric_zero_noise_is_captums(server, metric: str) -> None:
    """noise_scale 0 and perturb_radius 0: no perturbation, as Captum computes it (0 for this model)."""
    evaluate = {"infidelity": {"noise_scale": 0.0}} if metric == "infidelity" else {"sensitivity_max": {"perturb_radius": 0.0}}
    with AttributionClient(server.address) as client:
        got = client.attribute("toy", "saliency", X2, target=0, seed=3, evaluate=evaluate)
    want = _captum_infidelity(torch.from_numpy(X2), 3) if metric == "infidelity" else _captum_sensitivity(torch.from_numpy(X2), 3)
    np.testing.assert_allclose(getattr(got, metric), want.detach().numpy(), atol=1e-5)


# -- the client names the field ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(params={"n_steps": "ten"}), TypeError, "params.n_steps: expected an integer, got 'ten'"),
    (dict(params={"n_steps": 2.5}), ValueError, "params.n_steps: expected an integer, got 2.5"),
    (dict(params={"n_steps": -1}), ValueError, "params.n_steps: expected an integer in [0, 4294967295], got -1"),
    (dict(params={"method": 3}), TypeError, "params.method: expected a string, got 3"),
    (dict(params={"multiply_by_inputs": "yes"}), TypeError, "params.multiply_by_inputs: expected a bool, got 'yes'"),
    (dict(noise_tunnel={"stdevs": ["a"]}), TypeError, "noise_tunnel.stdevs: expected a number, got 'a'"),
    (dict(noise_tunnel={"nt_samples": None, "nt_type": 1}), TypeError, "noise_tunnel.nt_type: expected a string, got 1"),
    (dict(evaluate={"infidelity": {"n_perturb_samples": "x"}}), TypeError, "evaluate.infidelity.n_perturb_samples: expected an integer"),
    (dict(also=[{"algorithm": "saliency"}, {"algorithm": "saliency", "noise_tunnel": {"nt_samples": "x"}}]), TypeError, "also[1].noise_tunnel.nt_samples"),
    (dict(also=[{"algorithm": "gradient_shap", "params": {"stdevs": object()}}]), TypeError, "also[0].params.stdevs"),
    (dict(seed="s"), TypeError, "seed: expected an integer"),
    (dict(target=("a",)), TypeError, "target: expected an integer, got 'a'"),
    (dict(layer=3), TypeError, "layer: expected a string, got 3"),
    (dict(return_outputs="yes"), TypeError, "return_outputs: expected a bool, got 'yes'"),
    (dict(model_version=7), TypeError, "model_version: expected a string, got 7"),
    (dict(also=[{"algorithm": "saliency", "layer": 5}]), TypeError, "also[0].layer: expected a string, got 5"),
])
def test_client_errors_name_the_field(kwargs, error, message) -> None:
    with pytest.raises(error) as raised:
        build_request("toy", "integrated_gradients", X, **kwargs)
    assert message in str(raised.value)


def test_occlusion_windows_from_the_client_name_the_field() -> None:
    with pytest.raises(TypeError, match=r"params.sliding_window_shapes\[0\]: expected an integer"):
        build_request("toy", "occlusion", X, params={"sliding_window_shapes": [("a",)]})


# -- and after all that, the server is fine -----------------------------------------------------------------------------


def test_server_still_serves_correct_answers_and_is_healthy(server) -> None:
    with AttributionClient(server.address) as client:
        got = client.attribute("toy", "integrated_gradients", X2, target=1, params={"n_steps": 25}, return_convergence_delta=True)
    want, delta = IntegratedGradients(_toy()).attribute(torch.from_numpy(X2), target=1, n_steps=25, return_convergence_delta=True)
    assert_all_close((torch.from_numpy(got.attributions),), (want.detach(),), atol=1e-5)
    np.testing.assert_allclose(got.convergence_delta, delta.detach().numpy(), atol=1e-5)
    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="attrserve.v1.AttributionService"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


# -- parsing costs O(the bounds), whatever the size -----------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["long list", "wide struct"])
def test_a_huge_struct_is_refused_without_converting_it(shape: str) -> None:
    """A Struct of 200,000 values (a 55 MB one blocked the event loop for 16 s through json_format) is refused at once."""
    import time

    from google.protobuf import struct_pb2

    from attrserve_engine import InvalidArgument
    from attrserve_service.convert import struct_to_dict

    struct = struct_pb2.Struct()
    if shape == "long list":
        struct.update({"stdevs": [0.5] * 200_000})
    else:
        struct.update({f"k{i}": 1.0 for i in range(200_000)})
    start = time.perf_counter()
    with pytest.raises(InvalidArgument, match="holds more than 1000 values"):
        struct_to_dict(struct, "custom_params")
    print(f"refused in {1e3 * (time.perf_counter() - start):.2f} ms")  # a figure for the README, not a timing assertion
