"""Algorithm plugins: loading, validation, and the example plugin (Blur Integrated Gradients) served, fused and checked."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attrserve_engine import AttributionJob, Engine, EngineLimits, InvalidArgument, ModelSpec
from oracle import MODELS, assert_all_close, assert_fused_equals_alone, example_inputs, submit_held

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "plugins" / "blur_integrated_gradients.py"


def blur_engine(**limits) -> Engine:
    engine = Engine(EngineLimits(**limits))
    assert engine.load_plugins(str(PLUGIN)) == ["blur_integrated_gradients"]
    engine.load(ModelSpec(name="conv", module=MODELS["conv"]()))
    return engine


def blur_job(x: torch.Tensor, target: list[int], **params) -> AttributionJob:
    return AttributionJob(model="conv", algorithm="blur_integrated_gradients", inputs=(x,), target=torch.tensor([[t] for t in target]), params=params)


@pytest.fixture(scope="module")
def plugin_module():
    spec = importlib.util.spec_from_file_location("blur_ig_for_tests", PLUGIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_blur_matches_its_definition(plugin_module) -> None:
    (x,), _ = example_inputs("conv", 2, seed=1)
    assert torch.equal(plugin_module.gaussian_blur(x, 0.0), x)
    flat = torch.full((1, 2, 8, 8), 0.7)
    assert torch.allclose(plugin_module.gaussian_blur(flat, 2.0), flat, atol=1e-6)  # weights sum to one, reflect padding
    blurred = plugin_module.gaussian_blur(x, 1.5)
    assert blurred.var() < x.var()  # smoothing removes variance
    assert torch.allclose(plugin_module.gaussian_blur(x.flip(-1), 1.5), blurred.flip(-1), atol=1e-6)  # symmetric kernel


def test_blur_integrated_gradients_equals_the_step_by_step_definition(plugin_module) -> None:
    (x,), _ = example_inputs("conv", 3, seed=2)
    target, n_steps, max_sigma = [0, 2, 1], 12, 3.0
    model = MODELS["conv"]().eval()
    path = plugin_module.blur_path(x, n_steps, max_sigma)  # (n_steps + 1, n, c, h, w)
    want = torch.zeros_like(x)
    for i in range(1, n_steps + 1):
        for e in range(x.shape[0]):
            point = path[i, e : e + 1].clone().requires_grad_()
            (grad,) = torch.autograd.grad(model(point)[0, target[e]], point)
            want[e] += (grad * (path[i, e] - path[i - 1, e]))[0]
    engine = blur_engine()
    try:
        got = engine.attribute(blur_job(x, target, n_steps=n_steps, max_sigma=max_sigma), timeout=60).attributions[0]
    finally:
        engine.shutdown()
    assert_all_close((got,), (want,))


def test_blur_integrated_gradients_is_nearly_complete(plugin_module) -> None:
    """Attributions sum to f(x) − f(most blurred x) as the Riemann sum gets finer."""
    (x,), _ = example_inputs("conv", 2, seed=3)
    model = MODELS["conv"]().eval()
    engine = blur_engine()
    try:
        got = engine.attribute(blur_job(x, [1, 1], n_steps=400, max_sigma=2.0), timeout=60).attributions[0]
    finally:
        engine.shutdown()
    with torch.no_grad():
        gap = model(x)[:, 1] - model(plugin_module.gaussian_blur(x, 2.0))[:, 1]
    assert torch.allclose(got.reshape(2, -1).sum(1), gap, rtol=0.02, atol=1e-3)


def test_plugin_rows_fuse_with_built_in_requests() -> None:
    """Blur IG's rows are ordinary gradient rows: queued (held) with three IG requests on the same model they form one
    batch key, 2 × 10 + 3 × (2 × 7) = 62 rows, so exactly one pass runs, shared by all four; each equals itself alone."""
    (x,), _ = example_inputs("conv", 2, seed=4)
    alone_engine = blur_engine()
    fused_engine = blur_engine(default_max_queue_delay_us=0, default_max_batch_rows=4096)
    ig = [AttributionJob(model="conv", algorithm="integrated_gradients", inputs=(x * k,), target=torch.tensor([[2], [0]]), params={"n_steps": 7}) for k in (0.5, 2.0, 3.0)]
    try:
        alone = [alone_engine.attribute(j, timeout=60) for j in [*ig, blur_job(x, [0, 1], n_steps=10)]]
        futures = submit_held(fused_engine, [*ig, blur_job(x, [0, 1], n_steps=10)])
        fused = [f.result(timeout=60) for f in futures]
    finally:
        alone_engine.shutdown()
        fused_engine.shutdown()
    assert (fused_engine.passes, fused_engine.rows) == (1, 62)
    assert [(r.timing.rows, r.timing.passes, r.timing.pass_rows, r.timing.pass_requests) for r in fused] == [(14, 1, 62, 4)] * 3 + [(20, 1, 62, 4)]
    for got, want in zip(fused, alone):
        assert_fused_equals_alone(got, want, delta=False)


def test_plugin_validation(tmp_path: Path, monkeypatch) -> None:
    engine = Engine()
    (tmp_path / "none.py").write_text("X = 1\n")
    with pytest.raises(InvalidArgument, match="defines no ALGORITHM"):
        engine.load_plugins(str(tmp_path / "none.py"))
    (tmp_path / "clash.py").write_text(textwrap.dedent('''
        from attrserve_engine.algorithms.saliency import Saliency
        class Again(Saliency):
            name = "saliency"
        ALGORITHM = Again
    '''))
    with pytest.raises(InvalidArgument, match="clashes"):
        engine.load_plugins(str(tmp_path / "clash.py"))
    (tmp_path / "notalgo.py").write_text("ALGORITHM = dict\n")
    with pytest.raises(InvalidArgument, match="must be an Algorithm subclass"):
        engine.load_plugins(str(tmp_path / "notalgo.py"))
    with pytest.raises(InvalidArgument, match="neither a .py file"):
        engine.load_plugins("no.such.module")
    # A folder of plugins, and an importable module path.
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "signed.py").write_text(textwrap.dedent('''
        from attrserve_engine.algorithms.saliency import Saliency
        class SignedSaliency(Saliency):
            name = "signed_saliency"
        ALGORITHM = SignedSaliency
    '''))
    assert engine.load_plugins(str(folder)) == ["signed_saliency"]
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_algos.py").write_text((folder / "signed.py").read_text().replace("signed_saliency", "module_saliency"))
    assert engine.load_plugins("my_algos") == ["module_saliency"]
    engine.shutdown()
