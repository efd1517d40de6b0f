"""A model's pass layout (ModelSpec.memory_format, tuning.choose_memory_format).

- "contiguous" serves PyTorch's default layout.
- "auto" (the default) lays forward passes out channels_last ("channels_last_forward") only where the model has 2-D
  convolutions, its forward takes that layout, gives the same outputs and is faster; never a gradient pass, and it
  tries nothing on a model without 2-D convolutions.
- "channels_last_forward" and "channels_last" (every pass, the weights too) are opt-ins, checked at load where the
  shapes are pinned. Both serve Captum's numbers for every algorithm on the zoo's convolutional models, alone and
  fused. A model that cannot run channels_last, or whose numbers it changes, refuses them at load, and the engine
  serves on.

Why auto never lays a gradient pass out channels_last (it did, until issue 12 step 30): a gradient through a max-pool
or a ReLU whose winner rounding flips jumps, and IntegratedGradients' interpolated inputs cross such points. On bench
W2's CNN, channels_last served 6 of 16 answers more than 1e-4 of the largest attribution from Captum's
(tests/bench/test_bench_numbers.py checks the default layout there). A forward pass's outputs move by rounding only.
"""

from __future__ import annotations

import re
import time

import pytest
import torch
from torch import nn

from attrserve_engine import AttributionJob, Engine, EngineLimits, InputSpec, InvalidArgument, ModelSpec, tuning
from oracle import assert_all_close, assert_close, submit_held
from test_model_zoo import answerable, captum_answer, request
from zoo import ZOO, job_for

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:DeprecationWarning"),
]

CONV_MODELS = [name for name, z in ZOO.items() if tuning._has_conv2d(z.build())]


def test_the_zoo_has_convolutional_models() -> None:
    assert {"resnet", "vgg"} <= set(CONV_MODELS)


@pytest.fixture(scope="module", params=["channels_last", "channels_last_forward"])
def engine(request: pytest.FixtureRequest):
    """The zoo's convolutional models with pinned shapes and memory_format channels_last or channels_last_forward
    (checked at load)."""
    e = Engine(EngineLimits(probe_batch_rows=False))
    for name in CONV_MODELS:
        z = ZOO[name]
        e.load(
            ModelSpec(
                name=name,
                module=z.build(),
                inputs=[InputSpec("x", z.dtype, z.shape)],
                output_key=z.output_key,
                output_index=z.output_index,
                memory_format=request.param,
            )
        )
    yield e
    e.shutdown()


def _like_captum(model: str, name: str, got) -> None:
    want, want_delta = captum_answer(model, name)
    assert_all_close(got.attributions, want)
    if request(model, name).delta:
        assert_close(got.convergence_delta, want_delta)


@pytest.mark.parametrize("model", CONV_MODELS)
def test_every_algorithm_in_channels_last_equals_captum(engine: Engine, model: str) -> None:
    assert engine.get_model(model).memory_format != "contiguous"
    names = answerable(engine, model)
    assert len(names) > 20
    failures = []
    for name in names:
        try:
            _like_captum(model, name, engine.attribute(job_for(request(model, name)), timeout=60))
        except Exception as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("model", CONV_MODELS)
def test_every_algorithm_in_channels_last_fused_equals_captum(engine: Engine, model: str) -> None:
    names = answerable(engine, model)
    futures = submit_held(engine, [job_for(request(model, n)) for n in names])
    failures, shared = [], 0
    for name, future in zip(names, futures):
        try:
            got = future.result(timeout=120)
            shared = max(shared, got.timing.pass_requests)
            _like_captum(model, name, got)
        except Exception as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)
    assert shared > 1, "no two requests shared a pass"


class Flattens(nn.Module):
    """A CNN that flattens with view(), which a channels_last activation cannot take."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(7))


def _spec(name: str, module: nn.Module, memory_format: str = "", dims: tuple | None = (3, 6, 6)) -> ModelSpec:
    return ModelSpec(name=name, module=module, inputs=[InputSpec("x", torch.float32, dims)], memory_format=memory_format)


def _saliency_like_captum(engine: Engine, name: str, module: nn.Module) -> None:
    from captum.attr import Saliency

    got = engine.attribute(AttributionJob(model=name, algorithm="saliency", inputs=(X,), target=[0, 2]), timeout=60)
    assert_close(got.attributions[0], Saliency(module.eval()).attribute(X.clone(), target=[0, 2]))


def test_auto_never_tries_a_model_without_2d_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_pass(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the layout of a model without convolutions was tried")

    monkeypatch.setattr(tuning, "run_pass", no_pass)
    engine = Engine(EngineLimits(probe_batch_rows=False))
    try:
        model = engine.load(_spec("mlp", Mlp(), dims=(4,)))
        assert tuning.choose_memory_format(model) == "contiguous" and model.memory_format == "contiguous"
        model.spec.memory_format = "contiguous"
        assert tuning.choose_memory_format(model) == "contiguous (config)" and model.memory_format == "contiguous"
    finally:
        engine.shutdown()


def test_auto_keeps_the_contiguous_layout_where_the_forward_cannot_take_channels_last() -> None:
    engine = Engine(EngineLimits(probe_batch_rows=False))
    try:
        model = engine.load(_spec("flat", Flattens()))
        assert model.memory_format == "contiguous"
        assert "fails in channels_last" in tuning.choose_memory_format(model) and model.memory_format == "contiguous"
        _saliency_like_captum(engine, "flat", Flattens())
    finally:
        engine.shutdown()


@pytest.mark.parametrize("slower", [False, True])
def test_auto_lays_out_forward_passes_alone_and_only_when_faster(monkeypatch: pytest.MonkeyPatch, slower: bool) -> None:
    """The forward passes of one layout are made 20 ms slower: auto takes the other. Where it takes channels_last, the
    weights stay contiguous, the forward passes (Occlusion) get channels_last inputs and the gradient passes (Saliency)
    contiguous ones, and both answer Captum's numbers."""
    real = tuning.run_pass

    def run_pass(model, blocks):  # type: ignore[no-untyped-def]
        if model.forward_channels_last == slower:
            time.sleep(0.02)
        return real(model, blocks)

    engine = Engine(EngineLimits(probe_batch_rows=False))
    try:
        model = engine.load(_spec("cnn", Pools()))
        monkeypatch.setattr(tuning, "run_pass", run_pass)
        why = tuning.choose_memory_format(model)
        assert why.startswith("contiguous (channels_last forward passes ran") if slower else why.startswith("channels_last_forward ("), why
        assert model.memory_format == ("contiguous" if slower else "channels_last_forward") and not model.channels_last
        assert all(p.is_contiguous() for p in model.module.parameters())
        seen: list[tuple[bool, bool]] = []  # (grad enabled, input channels_last) per forward

        def record(module: nn.Module, args: tuple) -> None:
            x = args[0]
            seen.append((torch.is_grad_enabled(), x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()))

        handle = model.module.register_forward_pre_hook(record)
        try:
            _saliency_like_captum(engine, "cnn", Pools())
            from captum.attr import Occlusion

            job = AttributionJob(model="cnn", algorithm="occlusion", inputs=(X,), target=[0, 2], params={"sliding_window_shapes": (3, 2, 2)})
            got = engine.attribute(job, timeout=60)
            want = Occlusion(Pools().eval()).attribute(X.clone(), target=[0, 2], sliding_window_shapes=(3, 2, 2))
            assert_close(got.attributions[0], want)
        finally:
            handle.remove()
        assert {grad for grad, _ in seen} == {True, False}
        assert all(not last for grad, last in seen if grad)  # a gradient pass never runs channels_last under auto
        assert all(last is not slower for grad, last in seen if not grad)
    finally:
        engine.shutdown()


def test_a_config_that_insists_on_channels_last_fails_such_a_model_at_load_and_the_engine_serves_on() -> None:
    engine = Engine(EngineLimits(probe_batch_rows=False))
    try:
        engine.load(_spec("fine", Flattens(), "contiguous"))
        for memory_format in ("channels_last", "channels_last_forward"):
            with pytest.raises(InvalidArgument, match=rf"model 'flat': memory_format {memory_format}: its forward fails in channels_last"):
                engine.load(_spec("flat", Flattens(), memory_format))
        _saliency_like_captum(engine, "fine", Flattens())
        assert engine.serving()[0]
    finally:
        engine.shutdown()


def test_a_config_that_insists_on_channels_last_fails_a_model_whose_numbers_it_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The load's check compares the same pass in both layouts: gradients moved past LAYOUT_RTOL refuse the load, and
    the model that passes it serves channels_last, saying how fast against the contiguous layout."""
    real = tuning.run_pass

    def run_pass(model, blocks):  # type: ignore[no-untyped-def]
        results = real(model, blocks)
        if model.channels_last and model.name == "moved":
            for r in results:
                r.grads = tuple(g * (1 + 1e-4) for g in r.grads)
        return results

    monkeypatch.setattr(tuning, "run_pass", run_pass)
    engine = Engine(EngineLimits(probe_batch_rows=False))
    try:
        with pytest.raises(InvalidArgument, match=r"model 'moved': memory_format channels_last: channels_last changes the pass's numbers by"):
            engine.load(_spec("moved", Pools(), "channels_last"))
        model = engine.load(_spec("cnn", Pools(), "channels_last"))
        why = tuning.choose_memory_format(model)
        assert model.channels_last and re.fullmatch(r"channels_last \(config; [\d.]+x the contiguous layout's speed at 8 rows\)", why), why
        _saliency_like_captum(engine, "cnn", Pools())
        assert engine.serving()[0]
    finally:
        engine.shutdown()


class Pools(nn.Module):
    """A CNN that flattens with flatten(), which takes any layout."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def test_channels_last_with_unpinned_shapes_is_taken_on_trust_and_equals_captum() -> None:
    engine = Engine(EngineLimits(probe_batch_rows=False))
    try:
        model = engine.load(_spec("cnn", Pools(), "channels_last", dims=None))
        assert model.channels_last and all(
            p.is_contiguous(memory_format=torch.channels_last) for p in model.module.parameters() if p.dim() == 4
        )
        _saliency_like_captum(engine, "cnn", Pools())
        assert engine.serving()[0]
    finally:
        engine.shutdown()


def test_an_unknown_memory_format_is_refused_naming_the_choices() -> None:
    engine = Engine(EngineLimits(probe_batch_rows=False))
    try:
        with pytest.raises(
            InvalidArgument, match=r"model 'cnn': memory_format 'sideways' is not one of '', 'auto', 'contiguous', 'channels_last_forward', 'channels_last'"
        ):
            engine.load(_spec("cnn", Flattens(), "sideways"))
        engine.load(_spec("cnn", Flattens(), "contiguous"))
        _saliency_like_captum(engine, "cnn", Flattens())
    finally:
        engine.shutdown()
