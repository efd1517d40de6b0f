"""A zoo of small real-architecture models, built from code (seeded random weights, nothing downloaded), and the
requests every attrserve algorithm makes of them, posed both as an AttributionJob and as the Captum 0.9.0 call.

tests/engine/test_model_zoo.py runs every (zoo model, algorithm) pair through the engine and through Captum.
The classes live in a real file because torch.jit.script reads their source.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

VOCAB = 16
SEQ = 6


def _bn(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm2d whose running statistics and affine parameters are not the identity (eval uses them)."""
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


# -- 1. torchvision-style ResNet -------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv-BN-ReLU-conv-BN, `out += identity`, ReLU, in place as torchvision writes it.

    shared_relu=True is torchvision exactly: one `self.relu` module applied twice. False gives each use its own
    module (relu1, relu2), the form Captum's DeepLift asks for; the weights are the same either way.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, shared_relu: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn(cout)
        if shared_relu:
            self.relu = nn.ReLU(inplace=True)
        else:
            self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout)
        if not shared_relu:
            self.relu2 = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout)) if stride != 1 or cin != cout else None
        self.shared_relu = shared_relu

    def forward(self, x):
        identity = x
        out = self.bn1(self.conv1(x))
        out = self.relu(out) if self.shared_relu else self.relu1(out)
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out) if self.shared_relu else self.relu2(out)


class ResNet(nn.Module):
    """Stem conv-BN-ReLU-MaxPool, a plain BasicBlock and a strided one with a 1x1 downsample, global average pool, fc."""

    def __init__(self, shared_relu: bool = False) -> None:
        super().__init__()
        torch.manual_seed(101)
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = _bn(4)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(4, 4, shared_relu=shared_relu)
        self.layer2 = BasicBlock(4, 6, stride=2, shared_relu=shared_relu)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(6, 3)
        with torch.no_grad():  # a confident head: GuidedGradCam (gradient x gradient) would otherwise be ~1e-5
            self.fc.weight.mul_(10.0)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# -- 2. VGG-style ----------------------------------------------------------------------------------------------


class VGG(nn.Module):
    """torchvision's VGG layout: `features` and `classifier` Sequentials (numbered layer paths), in-place ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(102)
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(4 * 4 * 4, 8), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(8, 3))
        with torch.no_grad():  # a confident head: GuidedGradCam (gradient x gradient) would otherwise be ~1e-6
            self.classifier[3].weight.mul_(20.0)

    def forward(self, x):
        return self.classifier(self.flatten(self.features(x)))


# -- 3. Transformer encoder classifiers ------------------------------------------------------------------------


class TransformerClassifier(nn.Module):
    """Token ids → nn.Embedding → one TransformerEncoderLayer (eval, no dropout) → mean over positions → Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(103)
        self.embedding = nn.Embedding(VOCAB, 8)
        self.encoder = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids):
        return self.head(self.encoder(self.embedding(input_ids)).mean(1))


class MaskedTransformerClassifier(TransformerClassifier):
    """The same with a key padding mask (bool, True = pad) as a second forward argument, used by attention and pooling."""

    def forward(self, input_ids, padding_mask):
        h = self.encoder(self.embedding(input_ids), src_key_padding_mask=padding_mask)
        keep = (~padding_mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


# -- 4. Recurrent text classifiers -----------------------------------------------------------------------------


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(104)
        self.embedding = nn.Embedding(VOCAB, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, input_ids):
        _, (h, _) = self.lstm(self.embedding(input_ids))
        return self.head(h[-1])


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(105)
        self.embedding = nn.Embedding(VOCAB, 6)
        self.gru = nn.GRU(6, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, input_ids):
        _, h = self.gru(self.embedding(input_ids))
        return self.head(h[-1])


# -- 5. LayerNorm, GELU, SiLU (no module DeepLift or LRP has a rule for, besides Linear) ---------------------------


class NormActModel(nn.Module):
    """(n, 4, 6) float input: per-position Linear → LayerNorm → GELU → Linear → SiLU, mean over positions, Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(106)
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(8, 8)
        self.act2 = nn.SiLU()
        self.head = nn.Linear(8, 3)
        with torch.no_grad():  # a confident head: GuidedGradCam (gradient x gradient) would otherwise be ~1e-5
            self.head.weight.mul_(10.0)

    def forward(self, x):
        return self.head(self.act2(self.fc2(self.act1(self.norm(self.fc1(x))))).mean(1))


# -- 6. Dict and tuple outputs ---------------------------------------------------------------------------------


class DictOutput(nn.Module):
    """A small image model returning {"features": ..., "logits": ...}; served with output_key="logits"."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(107)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 2 * 2, 3)
        with torch.no_grad():  # a confident head: GuidedGradCam (gradient x gradient) would otherwise be ~1e-4
            self.fc.weight.mul_(5.0)

    def forward(self, x):
        features = self.pool(self.relu(self.conv(x))).flatten(1)
        return {"features": features, "logits": self.fc(features)}


class TupleOutput(nn.Module):
    """(n, 2, 6) input → per-row Linear → Tanh → flatten → Linear; returns (features, logits), served with output_index=1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(108)
        self.fc1 = nn.Linear(6, 5)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        features = self.act(self.fc1(x))
        return features, self.fc2(features.flatten(1))


# -- 7. More than one output dim per example -------------------------------------------------------------------


class GridModel(nn.Module):
    """(n, 2, 5) input → Linear → ELU → sum over rows → (n, 2, 3) output: targets are (i, j) index pairs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(109)
        self.fc = nn.Linear(5, 6)
        self.act = nn.ELU()

    def forward(self, x):
        return self.act(self.fc(x)).sum(1).view(-1, 2, 3) * 2.0


# -- 8. TorchScript ---------------------------------------------------------------------------------------------


class ScriptedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(110)
        self.fc1 = nn.Linear(6, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def scripted_mlp() -> torch.jit.ScriptModule:
    return torch.jit.script(ScriptedMLP().eval())


class Select(nn.Module):
    """Captum's view of a model served with output_key / output_index: the original as a child (so hooks reach its
    modules; layer paths gain a `model.` prefix), returning the selected output."""

    def __init__(self, model: nn.Module, key: Any) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, *args):
        return self.model(*args)[self.key]


# -- the zoo's catalogue ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooModel:
    """A zoo model and how each family of algorithm is posed on it.

    layer: the layer of the layer methods; cam_layer: GuidedGradCam's; lrp_layer: LayerLRP's (a layer with an LRP rule);
    neuron: (layer, selector) of the neuron methods. masks: feature ids (<= 4 groups) broadcast over the examples;
    window: Occlusion's window (= stride) for the one input.
    """

    name: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]  # per example
    tokens: bool = False  # int64 token ids
    layer: str = ""
    cam_layer: str = ""
    lrp_layer: str = ""
    neuron: tuple[str, tuple[int, ...]] = ("", ())
    mask: Callable[[], Tensor] | None = None
    window: tuple[int, ...] = ()
    padding_mask: bool = False
    output_key: str | None = None
    output_index: int | None = None
    grid: bool = False  # output (n, 2, 3)

    @property
    def dtype(self) -> torch.dtype:
        return torch.int64 if self.tokens else torch.float32

    def captum_model(self) -> nn.Module:
        """A fresh instance as Captum sees it (wrapped where the engine selects an output)."""
        model = self.build().eval()
        if self.output_key is not None:
            return Select(model, self.output_key).eval()
        if self.output_index is not None:
            return Select(model, self.output_index).eval()
        return model

    def captum_layer(self, model: nn.Module, path: str) -> nn.Module:
        prefix = "model." if isinstance(model, Select) else ""
        return model.get_submodule(prefix + path)


def _image_quadrants(h: int, w: int) -> Tensor:
    r, c = torch.arange(h).view(h, 1), torch.arange(w).view(1, w)
    return ((r // (h // 2)) * 2 + c // (w // 2)).view(1, 1, h, w)


ZOO: dict[str, ZooModel] = {
    z.name: z
    for z in [
        ZooModel(
            "resnet",
            ResNet,
            (3, 8, 8),
            layer="layer2",
            cam_layer="layer1",
            lrp_layer="layer2.conv1",
            neuron=("layer1.bn2", (1, 2, 1)),
            mask=lambda: _image_quadrants(8, 8),
            window=(3, 4, 4),
        ),
        ZooModel(  # torchvision's BasicBlock exactly: one ReLU module used twice per block
            "resnet_shared_relu",
            functools.partial(ResNet, shared_relu=True),
            (3, 8, 8),
            layer="layer2",
            cam_layer="layer1",
            lrp_layer="layer2.conv1",
            neuron=("layer1.bn2", (1, 2, 1)),
            mask=lambda: _image_quadrants(8, 8),
            window=(3, 4, 4),
        ),
        ZooModel(
            "vgg",
            VGG,
            (3, 8, 8),
            layer="features.2",
            cam_layer="features.2",
            lrp_layer="features.2",
            neuron=("classifier.0", (2,)),
            mask=lambda: _image_quadrants(8, 8),
            window=(3, 4, 4),
        ),
        ZooModel(
            "transformer",
            TransformerClassifier,
            (SEQ,),
            tokens=True,
            layer="embedding",
            cam_layer="embedding",
            lrp_layer="head",
            neuron=("embedding", (2, 3)),
            mask=lambda: (torch.arange(SEQ) // 2).view(1, SEQ),
            window=(2,),
        ),
        ZooModel(
            "transformer_masked",
            MaskedTransformerClassifier,
            (SEQ,),
            tokens=True,
            padding_mask=True,
            layer="encoder.norm1",
            cam_layer="encoder.linear1",
            lrp_layer="head",
            neuron=("encoder.linear1", (1, 5)),
            mask=lambda: (torch.arange(SEQ) // 2).view(1, SEQ),
            window=(2,),
        ),
        ZooModel(
            "lstm",
            LSTMClassifier,
            (SEQ,),
            tokens=True,
            layer="embedding",
            cam_layer="embedding",
            lrp_layer="head",
            neuron=("embedding", (4, 1)),
            mask=lambda: (torch.arange(SEQ) // 2).view(1, SEQ),
            window=(2,),
        ),
        ZooModel(
            "gru",
            GRUClassifier,
            (SEQ,),
            tokens=True,
            layer="embedding",
            cam_layer="embedding",
            lrp_layer="head",
            neuron=("head", (1,)),
            mask=lambda: (torch.arange(SEQ) // 2).view(1, SEQ),
            window=(2,),
        ),
        ZooModel(
            "norm_act",
            NormActModel,
            (4, 6),
            layer="norm",
            cam_layer="act1",
            lrp_layer="fc1",
            neuron=("fc2", (1, 3)),
            mask=lambda: torch.arange(4).view(1, 4, 1).repeat(1, 1, 6),
            window=(1, 6),
        ),
        ZooModel(
            "dict_output",
            DictOutput,
            (2, 4, 4),
            output_key="logits",
            layer="conv",
            cam_layer="conv",
            lrp_layer="conv",
            neuron=("conv", (1, 2, 1)),
            mask=lambda: _image_quadrants(4, 4),
            window=(2, 2, 2),
        ),
        ZooModel(
            "tuple_output",
            TupleOutput,
            (2, 6),
            output_index=1,
            layer="fc1",
            cam_layer="act",
            lrp_layer="fc1",
            neuron=("fc1", (1, 3)),
            mask=lambda: (torch.arange(2).view(2, 1) * 2 + torch.arange(6).view(1, 6) // 3).view(1, 2, 6),
            window=(1, 3),
        ),
        ZooModel(
            "grid",
            GridModel,
            (2, 5),
            grid=True,
            layer="fc",
            cam_layer="act",
            lrp_layer="fc",
            neuron=("fc", (1, 1)),
            mask=lambda: (torch.arange(2).view(2, 1) * 2 + (torch.arange(5).view(1, 5) >= 3)).view(1, 2, 5),
            window=(1, 5),
        ),
        ZooModel(
            "scripted",
            scripted_mlp,
            (6,),
            layer="fc1",
            cam_layer="fc1",
            lrp_layer="fc1",
            neuron=("fc1", (2,)),
            mask=lambda: (torch.arange(6) // 2).view(1, 6),
            window=(2,),
        ),
    ]
}


# -- algorithms: how each is posed (Captum's class and parameter names) ----------------------------------------


@dataclass(frozen=True)
class Algo:
    captum: str  # class in captum.attr
    kind: str = "input"  # input | layer | cam (GuidedGradCam) | lrp_layer | neuron
    params: dict[str, Any] = field(default_factory=dict)  # Captum's call parameters (the engine takes the same names)
    baselines: str = "none"  # none | row | distribution
    mask: bool = False
    target: bool = True


ALGOS: dict[str, Algo] = {
    "deconvolution": Algo("Deconvolution"),
    "deep_lift": Algo("DeepLift", baselines="row"),
    "deep_lift_shap": Algo("DeepLiftShap", baselines="distribution"),
    "feature_ablation": Algo("FeatureAblation", baselines="row", mask=True),
    "feature_permutation": Algo("FeaturePermutation", mask=True),
    "gradient_shap": Algo("GradientShap", params={"n_samples": 4, "stdevs": 0.1}, baselines="distribution"),
    "guided_backprop": Algo("GuidedBackprop"),
    "guided_grad_cam": Algo("GuidedGradCam", "cam"),
    "input_x_gradient": Algo("InputXGradient"),
    "integrated_gradients": Algo("IntegratedGradients", params={"n_steps": 6}, baselines="row"),
    "internal_influence": Algo("InternalInfluence", "layer", {"n_steps": 6}, baselines="row"),
    "kernel_shap": Algo("KernelShap", params={"n_samples": 10}, mask=True),
    "layer_activation": Algo("LayerActivation", "layer", target=False),
    "layer_conductance": Algo("LayerConductance", "layer", {"n_steps": 6}, baselines="row"),
    "layer_deep_lift": Algo("LayerDeepLift", "layer", baselines="row"),
    "layer_deep_lift_shap": Algo("LayerDeepLiftShap", "layer", baselines="distribution"),
    "layer_feature_ablation": Algo("LayerFeatureAblation", "layer"),
    "layer_grad_cam": Algo("LayerGradCam", "layer"),
    "layer_gradient_shap": Algo("LayerGradientShap", "layer", {"n_samples": 4, "stdevs": 0.1}, baselines="distribution"),
    "layer_gradient_x_activation": Algo("LayerGradientXActivation", "layer"),
    "layer_integrated_gradients": Algo("LayerIntegratedGradients", "layer", {"n_steps": 6}, baselines="row"),
    "layer_lrp": Algo("LayerLRP", "lrp_layer"),
    "lime": Algo("Lime", params={"n_samples": 10, "alpha": 0.001}, mask=True),
    "lrp": Algo("LRP"),
    "neuron_conductance": Algo("NeuronConductance", "neuron", {"n_steps": 6}, baselines="row"),
    "neuron_deconvolution": Algo("NeuronDeconvolution", "neuron", target=False),
    "neuron_deep_lift": Algo("NeuronDeepLift", "neuron", baselines="row", target=False),
    "neuron_deep_lift_shap": Algo("NeuronDeepLiftShap", "neuron", baselines="distribution", target=False),
    "neuron_feature_ablation": Algo("NeuronFeatureAblation", "neuron", baselines="row", mask=True, target=False),
    "neuron_gradient": Algo("NeuronGradient", "neuron", target=False),
    "neuron_gradient_shap": Algo("NeuronGradientShap", "neuron", {"n_samples": 4, "stdevs": 0.1}, baselines="distribution", target=False),
    "neuron_guided_backprop": Algo("NeuronGuidedBackprop", "neuron", target=False),
    "neuron_integrated_gradients": Algo("NeuronIntegratedGradients", "neuron", {"n_steps": 6}, baselines="row", target=False),
    "occlusion": Algo("Occlusion", baselines="row"),
    "saliency": Algo("Saliency"),
    "shapley_value_sampling": Algo("ShapleyValueSampling", params={"n_samples": 3}, mask=True),
    "shapley_values": Algo("ShapleyValues", mask=True),
}

N_EXAMPLES = 3
DISTRIBUTION_ROWS = 3


@dataclass
class Request:
    """One (zoo model, algorithm) request, as both sides take it."""

    zoo: ZooModel
    algorithm: str
    inputs: Tensor
    args: tuple[Tensor, ...]
    baselines: Tensor | None
    mask: Tensor | None
    targets: list  # Captum's per-example targets (ints, or index tuples for the grid)
    layer: str
    params: dict[str, Any]  # the engine's params (Captum's names; neuron_selector included)
    seed: int
    delta: bool

    @property
    def algo(self) -> Algo:
        return ALGOS[self.algorithm]


def make_request(zoo: ZooModel, algorithm: str, seed: int, delta: bool, n: int = N_EXAMPLES) -> Request:
    algo = ALGOS[algorithm]
    g = torch.Generator().manual_seed(1000)  # the same examples for every algorithm; baselines by the seed
    inputs = torch.randint(1, VOCAB, (n, *zoo.shape), generator=g) if zoo.tokens else torch.randn((n, *zoo.shape), generator=g)
    args: tuple[Tensor, ...] = ()
    if zoo.padding_mask:  # True = pad: example i has i padded positions at the end (example 0 none)
        pad = torch.arange(SEQ).view(1, SEQ) >= (SEQ - torch.arange(n).view(n, 1))
        inputs = inputs.masked_fill(pad, 0)
        args = (pad,)
    g = torch.Generator().manual_seed(2000 + seed)
    rows = {"none": 0, "row": 1, "distribution": DISTRIBUTION_ROWS}[algo.baselines]
    baselines = None
    if rows:
        baselines = (
            torch.randint(1, VOCAB, (rows, *zoo.shape), generator=g) if zoo.tokens else 0.1 * torch.randn((rows, *zoo.shape), generator=g)
        )
    targets = [(i % 2, (i + 1) % 3) for i in range(n)] if zoo.grid else [i % 3 for i in range(n)]
    params = dict(algo.params)
    layer = ""
    if algo.kind == "layer":
        layer = zoo.layer
    elif algo.kind == "cam":
        layer = zoo.cam_layer
    elif algo.kind == "lrp_layer":
        layer = zoo.lrp_layer
    elif algo.kind == "neuron":
        layer = zoo.neuron[0]
        params["neuron_selector"] = list(zoo.neuron[1])
    if algorithm == "occlusion":
        params = {"sliding_window_shapes": [list(zoo.window)], "strides": [list(zoo.window)]}
    mask = zoo.mask() if algo.mask and zoo.mask is not None else None
    return Request(zoo, algorithm, inputs, args, baselines, mask, targets, layer, params, seed, delta)


def job_for(req: Request, model_name: str | None = None):
    from attrserve_engine import AttributionJob

    target = torch.tensor([list(t) if isinstance(t, tuple) else [t] for t in req.targets], dtype=torch.int64) if req.algo.target else None
    return AttributionJob(
        model=model_name or req.zoo.name,
        algorithm=req.algorithm,
        inputs=(req.inputs,),
        baselines=() if req.baselines is None else (req.baselines,),
        target=target,
        additional_forward_args=req.args,
        params=dict(req.params),
        layer=req.layer,
        feature_masks=() if req.mask is None else (req.mask,),
        return_convergence_delta=req.delta,
        seed=req.seed,
    )


def captum_attribute(req: Request) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """The oracle: Captum 0.9.0 on the same request, seeded right before `attribute`. Raises where Captum raises."""
    import captum.attr as ca

    algo, zoo = req.algo, req.zoo
    model = zoo.captum_model()
    cls = getattr(ca, algo.captum)
    kwargs: dict[str, Any] = {k: v for k, v in req.params.items() if k not in ("alpha", "kernel_width")}
    if algo.captum == "Lime":
        from captum._utils.models.linear_model import SkLearnLasso
        from captum.attr._core.lime import get_exp_kernel_similarity_function

        method = cls(
            model,
            interpretable_model=SkLearnLasso(alpha=req.params.get("alpha", 0.01)),
            similarity_func=get_exp_kernel_similarity_function("cosine", req.params.get("kernel_width", 1.0)),
        )
    elif algo.kind == "input":
        method = cls(model)
    else:
        method = cls(model, zoo.captum_layer(model, req.layer))
    if algo.kind == "neuron":
        kwargs["neuron_selector"] = tuple(kwargs["neuron_selector"])
    if req.algorithm == "occlusion":
        kwargs = {"sliding_window_shapes": tuple(zoo.window), "strides": tuple(zoo.window)}
    if algo.target:
        kwargs["target"] = list(req.targets)
    if req.args:
        kwargs["additional_forward_args"] = req.args
    if req.baselines is not None:
        kwargs["baselines"] = req.baselines
    if req.mask is not None:
        kwargs["feature_mask"] = req.mask
    if req.delta:
        kwargs["return_convergence_delta"] = True
    torch.manual_seed(req.seed)
    np.random.seed(req.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = method.attribute(req.inputs.clone(), **kwargs)
    delta = None
    if req.delta:
        out, delta = out
    out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return tuple(o.detach() for o in out), (None if delta is None else delta.detach())
