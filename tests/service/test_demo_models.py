"""The built-in demo model repository (service/attrserve_service/demo_models).

Each model is built the way the server's loader builds it (exec model.py by
path, load weights.pt, eval()), checked against its config.pbtxt, and then
explained with Captum as the oracle, which must recover the planted signal.
"""
import importlib.util
import pathlib
import sys

import pytest
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients
from google.protobuf import text_format

ROOT = pathlib.Path(__file__).resolve().parents[2]
REPO = ROOT / "service" / "attrserve_service" / "demo_models"
MODELS = ("toy", "tabular", "image", "text")

try:
    from attrserve.v1 import model_config_pb2, tensor_pb2
except ImportError:  # generated client code not on the path yet
    sys.path.insert(0, str(ROOT / "clients" / "python"))
    from attrserve.v1 import model_config_pb2, tensor_pb2


def _import_path(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(name):
    """Build a demo model as the loader does: model.py, weights.pt, eval()."""
    module = _import_path(f"test_demo_{name}_model", REPO / name / "model.py")
    model = module.build_model()
    weights = REPO / name / "weights.pt"
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    return model, module


def config(name):
    return text_format.Parse((REPO / name / "config.pbtxt").read_text(),
                             model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def data():
    """The training script's synthetic-data generators (held-out seeds)."""
    return _import_path("test_demo_train", REPO / "train.py")


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------
# Repository layout, configs, shapes
# --------------------------------------------------------------------------

def test_repository_constant_points_at_the_folder():
    init = _import_path("test_demo_models_pkg", REPO / "__init__.py")
    assert init.DEMO_MODEL_REPOSITORY.resolve() == REPO
    assert sorted(p.name for p in REPO.iterdir() if (p / "model.py").exists()) \
        == sorted(MODELS)


@pytest.mark.parametrize("name", MODELS)
def test_folder_contents(name):
    folder = REPO / name
    assert (folder / "model.py").is_file()
    assert (folder / "config.pbtxt").is_file()
    if name == "toy":
        assert not (folder / "weights.pt").exists()
    else:
        size = (folder / "weights.pt").stat().st_size
        assert 0 < size < 300_000
    # model.py imports only torch.
    source = (folder / "model.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in source.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports == {"torch"}


def _example_inputs(spec_list, batch, generator):
    inputs = []
    for spec in spec_list:
        dims = tuple(spec.dims)
        assert all(d > 0 for d in dims)
        if spec.dtype == tensor_pb2.DATA_TYPE_INT64:
            inputs.append(torch.randint(0, 50, (batch,) + dims, generator=generator))
        else:
            assert spec.dtype == tensor_pb2.DATA_TYPE_FLOAT32
            inputs.append(torch.randn((batch,) + dims, generator=generator))
    return inputs


@pytest.mark.parametrize("name", MODELS)
def test_config_and_output_shape(name):
    cfg = config(name)
    assert cfg.name == name
    assert cfg.description
    assert cfg.platform == model_config_pb2.PLATFORM_PYTORCH_EAGER
    assert len(cfg.inputs) == 1

    model, _ = build(name)
    assert not any(m.training for m in model.modules())

    # Every module runs at most once per forward (layer methods can hook any).
    calls = {}
    hooks = [m.register_forward_hook(
        lambda mod, i, o, key=n: calls.__setitem__(key, calls.get(key, 0) + 1))
        for n, m in model.named_modules() if n]
    g = torch.Generator().manual_seed(7)
    (x,) = _example_inputs(cfg.inputs, 5, g)
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    assert max(calls.values()) == 1
    assert not any(isinstance(m, (torch.nn.Dropout, torch.nn.modules.batchnorm._BatchNorm))
                   for m in model.modules())

    assert out.shape == (5, 2)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Each example's output depends only on that example.
    with torch.no_grad():
        single = torch.cat([model(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(single, out, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------
# Explanations recover the planted signals (Captum as oracle)
# --------------------------------------------------------------------------

def test_toy_integrated_gradients_matches_captum_overview():
    model, _ = build("toy")
    x = torch.tensor([[0.2961, 0.5166, 0.2517], [0.6886, 0.0740, 0.8665]])
    attr, delta = IntegratedGradients(model).attribute(
        x, baselines=torch.zeros_like(x), target=0, return_convergence_delta=True)
    expected = torch.tensor([[-0.5922, -1.5497, -1.0067],
                             [0.0000, -0.2219, -5.1991]])
    assert torch.allclose(attr, expected, atol=1e-4)
    assert delta.abs().max().item() < 1e-4
    # The model is positively homogeneous from a zero baseline, so IG is exact:
    # attribution = x * grad f(x).
    exact = torch.tensor([[-2.0, -3.0, -4.0], [0.0, -3.0, -6.0]]) * x
    torch.testing.assert_close(attr, exact, atol=1e-5, rtol=1e-5)
    # The tutorial's own (unrounded) input: torch.manual_seed(123); rand(2, 3).
    x = torch.tensor([[0.2961119, 0.5165623, 0.2516707],
                      [0.6885568, 0.0739725, 0.8665220]])
    attr = IntegratedGradients(model).attribute(x, torch.zeros_like(x), target=0)
    assert torch.allclose(attr, expected, atol=5e-5, rtol=0)


def test_tabular_attribution_finds_planted_features(data):
    model, module = build("tabular")
    g = torch.Generator().manual_seed(1234)
    x, y = data.make_tabular(512, g)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean().item() > 0.95
    x = x[y == 1][:64]
    attr = IntegratedGradients(model).attribute(
        x, baselines=torch.zeros_like(x), target=1)
    importance = attr.abs().mean(dim=0)
    top3 = set(importance.topk(3).indices.tolist())
    assert top3 == {2, 7, 11} == set(module.SIGNAL_FEATURES)
    others = [i for i in range(16) if i not in top3]
    assert importance[[2, 7, 11]].min() > 5 * importance[others].max()
    # Direction of the planted rule (1.5*x2 - 2*x7 + x11): per example, the
    # attribution's sign is that of coefficient * value.
    for feature, coef in ((2, 1.5), (7, -2.0), (11, 1.0)):
        agree = (attr[:, feature] * coef * x[:, feature] >= 0).float().mean()
        assert agree.item() > 0.9, (feature, agree)


def test_image_attribution_concentrates_on_patch(data):
    model, module = build("image")
    g = torch.Generator().manual_seed(1234)
    x, y = data.make_image(256, g)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean().item() > 0.95

    x = data.make_image(4, g, label=1)[0]
    with torch.no_grad():
        assert (model(x).argmax(1) == 1).all()
    attr = IntegratedGradients(model).attribute(
        x, baselines=torch.zeros_like(x), target=1).sum(dim=1)  # (4, 16, 16)
    positive = attr.clamp(min=0)
    (r0, r1), (c0, c1) = module.PATCH_ROWS, module.PATCH_COLS
    assert (r0, r1, c0, c1) == (2, 6, 9, 13)
    in_patch = positive[:, r0:r1, c0:c1].sum(dim=(1, 2))
    fraction = in_patch / positive.sum(dim=(1, 2))
    # The patch is 16 of 256 pixels but must hold most of the positive mass.
    assert fraction.min().item() > 0.75, fraction


def test_text_attribution_finds_sentiment_words(data):
    model, module = build("text")
    assert isinstance(model.embedding, torch.nn.Embedding)
    g = torch.Generator().manual_seed(1234)
    ids, y = data.make_text(512, g)
    with torch.no_grad():
        assert (model(ids).argmax(1) == y).float().mean().item() > 0.95
    assert module.VOCAB[0] == "<pad>" and len(module.VOCAB) == 50
    assert [module.VOCAB[i] for i in module.POSITIVE_IDS] == ["good", "great", "excellent"]
    assert [module.VOCAB[i] for i in module.NEGATIVE_IDS] == ["bad", "awful", "terrible"]

    ids, y = ids[:16], y[:16]
    lig = LayerIntegratedGradients(model, model.embedding)
    attr = lig.attribute(ids, baselines=torch.zeros_like(ids),
                         target=torch.ones_like(y)).sum(dim=-1)  # (16, 12)
    positive = torch.isin(ids, torch.tensor(module.POSITIVE_IDS))
    negative = torch.isin(ids, torch.tensor(module.NEGATIVE_IDS))
    sentiment = positive | negative
    assert sentiment.any(dim=1).all()
    for i in range(len(ids)):
        k = int(sentiment[i].sum())
        top = set(attr[i].abs().topk(k).indices.tolist())
        assert top == set(sentiment[i].nonzero().flatten().tolist()), (ids[i], attr[i])
        assert attr[i][sentiment[i]].abs().min() > 10 * attr[i][~sentiment[i]].abs().max()
    # For class 1, positive words push up and negative words push down.
    assert (attr[positive] > 0).all()
    assert (attr[negative] < 0).all()
