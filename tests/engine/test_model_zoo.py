"""The model zoo (tests/zoo.py) against Captum 0.9.0: for every zoo model and every algorithm, the engine either serves
it with Captum's numbers (alone and fused with the model's other requests), or refuses it, saying why, where Captum
cannot run it either.

Models: a torchvision-style ResNet (BatchNorm in eval, in-place residual adds and ReLUs; once with a ReLU module per
use, once with torchvision's one ReLU module used twice per block), a VGG, Transformer encoder
classifiers on token ids (with and without a padding mask), LSTM and GRU classifiers, a LayerNorm/GELU/SiLU model,
dict and tuple outputs, an output of (n, 2, 3) per example, and a TorchScript MLP.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch

from attrserve_engine import Engine, EngineLimits, InputSpec, InvalidArgument, ModelSpec
from attrserve_engine.algorithms import ALGORITHMS
from oracle import assert_all_close, assert_close, assert_informative, submit_held
from zoo import ALGOS, ZOO, Request, captum_attribute, job_for, make_request

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:DeprecationWarning"),
]

# What a refusal must say: the property of the model that rules the algorithm out.
REASONS = (
    "must be floating point",  # token ids: the algorithm takes gradients w.r.t. the inputs
    "TorchScript",  # hooks a layer or every module: a ScriptModule takes no hooks
    "LRP has no rule",  # LRP / LayerLRP: a module Captum's default rules do not cover
)


def zoo_spec(name: str) -> ModelSpec:
    """A zoo model as the engine serves it, its inputs' shapes left open."""
    z = ZOO[name]
    return ModelSpec(
        name=z.name,
        module=z.build(),
        inputs=[InputSpec("input_ids" if z.tokens else "x", z.dtype)],
        output_key=z.output_key,
        output_index=z.output_index,
    )


def zoo_engine(names: list[str]) -> Engine:
    """An engine serving these zoo models, without the pass-size probe or a queue delay (shut it down after)."""
    engine = Engine(EngineLimits(probe_batch_rows=False, default_max_queue_delay_us=0))
    for name in names:
        engine.load(zoo_spec(name))
    return engine


def answerable(engine: Engine, model: str) -> list[str]:
    """The algorithms the model serves where Captum runs them right (the zoo test covers the others)."""
    loaded = engine.get_model(model)
    return [
        name
        for name in sorted(ALGOS)
        if name in ALGORITHMS
        and engine.algorithms[name].refusal(loaded, [ZOO[model].dtype]) is None
        and not isinstance(captum_answer(model, name), Exception)
        and (model, name) not in CAPTUM_WRONG
    ]


@pytest.fixture(scope="module")
def engine():
    e = Engine(EngineLimits())
    for name in ZOO:
        e.load(zoo_spec(name))
    yield e
    e.shutdown()


def request(model: str, algorithm: str) -> Request:
    seed = sorted(ALGOS).index(algorithm)
    return make_request(ZOO[model], algorithm, seed=seed, delta=ALGORITHMS[algorithm].has_convergence_delta)


@functools.cache
def captum_answer(model: str, algorithm: str):
    """Captum's (attributions, delta) for the request, or the exception it raised (cached: the fused test reuses it)."""
    try:
        return captum_attribute(request(model, algorithm))
    except Exception as e:
        return e


_CAPTUM_REUSED_RELU = (
    "Captum 0.9.0 is silently wrong here: torchvision's BasicBlock applies one ReLU module twice; DeepLift's forward hooks "
    "(deep_lift.py _forward_pre_hook/_forward_hook) keep only the second call's input/output on the module, and the "
    "backward from layer1.bn2 crosses only the first call, so Captum rescales with the wrong call's values (0.08 off the "
    "same weights with two ReLU modules, model 'resnet'). The engine refuses the request: 'module ReLU runs more than "
    "once per forward'."
)
# Cases where the engine rightly differs from Captum: (model, algorithm) -> why. Strict: an engine that starts to
# agree with Captum there fails.
CAPTUM_WRONG: dict[tuple[str, str], str] = {
    ("resnet_shared_relu", "neuron_deep_lift"): _CAPTUM_REUSED_RELU,
    ("resnet_shared_relu", "neuron_deep_lift_shap"): _CAPTUM_REUSED_RELU,
}


def _params() -> list:
    out = []
    for model in ZOO:
        for name in sorted(set(ALGORITHMS) | set(ALGOS)):
            if name not in ALGORITHMS:
                out.append(
                    pytest.param(
                        model,
                        name,
                        id=f"{model}-{name}-not-in-ALGORITHMS",
                        marks=pytest.mark.skip(reason=f"{name} is not an attrserve algorithm"),
                    )
                )
            elif (model, name) in CAPTUM_WRONG:
                out.append(
                    pytest.param(model, name, id=f"{model}-{name}", marks=pytest.mark.xfail(strict=True, reason=CAPTUM_WRONG[model, name]))
                )
            elif name in ALGOS:
                out.append(pytest.param(model, name, id=f"{model}-{name}"))
    return out


def _compare(got, want, want_delta, delta: bool) -> None:
    assert_all_close(got.attributions, want)
    if delta:
        assert_close(got.convergence_delta, want_delta)


@pytest.mark.parametrize(("model", "algorithm"), _params())
def test_zoo_model_like_captum(engine: Engine, model: str, algorithm: str) -> None:
    loaded = engine.get_model(model)
    req = request(model, algorithm)
    refusal = engine.algorithms[algorithm].refusal(loaded, [req.inputs.dtype])
    captum = captum_answer(model, algorithm)
    if refusal is None:
        assert algorithm in engine.supported_algorithms(loaded)
        if isinstance(captum, Exception):
            # Listed, but this request is one Captum cannot run: the engine must fail it too, saying why (a failure of
            # the request's layer or input no GetModel list can foresee: a layer's output changed in place, a reused ReLU).
            try:
                engine.attribute(job_for(req), timeout=60)
            except InvalidArgument as e:  # the request's fault, named: not INTERNAL
                assert str(e).strip()
                return
            pytest.fail(f"the engine serves {algorithm} on {model}, but Captum raises {type(captum).__name__}: {captum}")
        want, want_delta = captum
        assert_informative(want)
        got = engine.attribute(job_for(req), timeout=60)
        _compare(got, want, want_delta, req.delta)
    else:
        assert algorithm not in engine.supported_algorithms(loaded)
        assert refusal.strip() and any(reason in refusal for reason in REASONS), f"the refusal does not say why: {refusal!r}"
        with pytest.raises(InvalidArgument, match=re.escape(refusal)):
            engine.submit(job_for(req))
        if not isinstance(captum, Exception):
            pytest.fail(f"the engine refuses {algorithm} on {model} ({refusal}), but Captum runs it")


@pytest.mark.parametrize("model", list(ZOO))
def test_zoo_model_fused_like_captum(engine: Engine, model: str) -> None:
    """Every algorithm the model serves, queued together while the engine is held, so their rows share passes."""
    loaded = engine.get_model(model)
    names = [n for n in sorted(ALGOS) if n in ALGORITHMS and n in engine.supported_algorithms(loaded)]
    # Those Captum cannot run, or computes wrongly, have their own test.
    names = [n for n in names if not isinstance(captum_answer(model, n), Exception) and (model, n) not in CAPTUM_WRONG]
    assert names
    reqs = [request(model, n) for n in names]
    futures = submit_held(engine, [job_for(r) for r in reqs])
    failures, results = [], []
    for name, req, future in zip(names, reqs, futures):
        try:
            got = future.result(timeout=120)
            results.append(got)
            want, want_delta = captum_answer(model, name)
            _compare(got, want, want_delta, req.delta)
        except Exception as e:
            failures.append(f"{name}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)
    assert max(r.timing.pass_requests for r in results) > 1, "no two requests shared a pass"


def test_every_algorithm_is_covered() -> None:
    """A new algorithm must be posed on the zoo (tests/zoo.py ALGOS)."""
    missing = sorted(set(ALGORITHMS) - set(ALGOS))
    assert not missing, f"pose these on the zoo (tests/zoo.py ALGOS): {', '.join(missing)}"


def test_zoo_input_dtypes_pinned(engine: Engine) -> None:
    """GetModel's list (no request dtypes) agrees with what a request gets: the zoo pins each input's dtype."""
    for name, z in ZOO.items():
        loaded = engine.get_model(name)
        for algorithm in ALGOS:
            assert engine.algorithms[algorithm].refusal(loaded) == engine.algorithms[algorithm].refusal(loaded, [z.dtype]), (
                name,
                algorithm,
            )
    assert torch.int64 in {z.dtype for z in ZOO.values()}


def test_an_in_place_op_after_a_substituted_layer_is_refused_saying_why(engine: Engine) -> None:
    """VGG's conv is followed by ReLU(inplace=True): LayerIntegratedGradients hands the model the interpolated
    activations it takes gradients against, so the in-place op fails, in Captum too; the message says what to do."""
    with pytest.raises(Exception) as captum:
        captum_attribute(request("vgg", "layer_integrated_gradients"))
    assert "in-place operation" in str(captum.value)
    with pytest.raises(InvalidArgument, match=r"layer 'features.2' is changed in place.*Captum fails here too.*inplace=False"):
        engine.attribute(job_for(request("vgg", "layer_integrated_gradients")), timeout=60)
