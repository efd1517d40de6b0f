"""Model versions, reloads and unloads in the engine: which load a request reaches, and that nothing accepted is lost.

Models are linear (tests/doubles.py Linear3, scaled per load), so every load has its own exact IG and a result
shows which load computed it."""

from __future__ import annotations

import threading
import time

import captum.attr as ca
import pytest
import torch

from attrserve_engine import AttributionJob, Engine, EngineLimits, FailedPrecondition, InputSpec, ModelSpec, ModelState, NotFound, Unavailable
from attrserve_engine.errors import LoadStuck
from doubles import Gated, Linear3
from oracle import passes_of, wait_in_flight

X = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]])
PINNED = [InputSpec("x", torch.float32, (3,))]


class Scaled(Linear3):
    """Linear3 with its weights times `k`: each load computes different numbers."""

    def __init__(self, k: float) -> None:
        super().__init__()
        with torch.no_grad():
            self.fc.weight.mul_(k)


class Broken(Linear3):
    def forward(self, x):
        raise RuntimeError("this build is broken")


def spec(name: str, version: str, module, pinned: bool = False) -> ModelSpec:
    # Unpinned inputs: no warm-up passes, so a load never waits for a held scheduler.
    return ModelSpec(name=name, version=version, module=module, inputs=PINNED if pinned else [], device="cpu", max_batch_rows=64)


def ig(engine: Engine, name: str, version: str = ""):
    job = AttributionJob(model=name, model_version=version, algorithm="integrated_gradients", inputs=(X,), target=torch.tensor([[1], [0]]))
    return engine.submit(job)


def expected(module: Linear3) -> torch.Tensor:
    return torch.stack([module.integrated_gradients(X[0], 1), module.integrated_gradients(X[1], 0)])


def assert_from(result, module: Linear3, version: str) -> None:
    assert result.model_version == version
    torch.testing.assert_close(result.attributions[0], expected(module), atol=1e-5, rtol=0)


@pytest.fixture
def engine():
    engine = Engine(EngineLimits(probe_batch_rows=False, drain_seconds=30.0))
    yield engine
    engine.shutdown(drain=False, timeout=5)


def test_a_request_without_a_version_gets_the_newest_ready_one(engine) -> None:
    one, two, ten = Scaled(1.0), Scaled(2.0), Scaled(10.0)
    engine.load(spec("m", "2", two))
    engine.load(spec("m", "10", ten))  # 10 is newer than 2: versions compare as numbers
    engine.load(spec("m", "1", one))  # loaded last, still not the newest
    assert_from(ig(engine, "m").result(30), ten, "10")
    assert_from(ig(engine, "m", "1").result(30), one, "1")
    assert_from(ig(engine, "m", "2").result(30), two, "2")
    assert [(r.version, r.state) for r in engine.model_records()] == [("1", ModelState.READY), ("2", ModelState.READY), ("10", ModelState.READY)]
    with pytest.raises(NotFound, match=r"model 'm' has no version '3'; it has 1, 2, 10"):
        ig(engine, "m", "3")
    with pytest.raises(NotFound, match=r"model 'x' is not served; served models: m"):
        ig(engine, "x")


def test_a_failure_reason_of_a_folder_given_by_a_relative_path_keeps_its_other_paths(engine, tmp_path, monkeypatch) -> None:
    """A reason names the folder's files from the folder that holds it; a model given as ModelSpec(path=Path("m"))
    (embedding, the current folder) is held by "" and lost every "/" of its reason ("no varw.pt nor mw.pt")."""
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.py").write_text("def build_model():\n    raise RuntimeError('no /var/w.pt nor m/w.pt')\n")
    with pytest.raises(RuntimeError, match="no /var/w.pt"):
        engine.load(ModelSpec(name="m", path=Path("m")))
    assert engine.model_record("m", "1").reason == "RuntimeError: no /var/w.pt nor m/w.pt"
    good = Scaled(1.0)
    engine.load(spec("g", "1", good))
    assert_from(ig(engine, "g").result(30), good, "1")
    assert engine.serving() == (True, "")


def test_a_version_that_fails_to_load_is_unavailable_with_its_reason_and_the_others_serve(engine) -> None:
    good = Scaled(1.0)
    engine.load(spec("m", "1", good))
    with pytest.raises(RuntimeError, match="this build is broken"):
        engine.load(spec("m", "2", Broken(), pinned=True))  # its warm-up forward fails
    record = engine.model_record("m", "2")
    assert record.state == ModelState.UNAVAILABLE and record.reason == "RuntimeError: this build is broken"
    with pytest.raises(Unavailable, match="model 'm' version '2' cannot serve: RuntimeError: this build is broken"):
        ig(engine, "m", "2")
    assert_from(ig(engine, "m").result(30), good, "1")  # the newest READY version
    assert engine.model_record("m").version == "1"
    # A model with no version that serves: the newest one's reason.
    with pytest.raises(RuntimeError):
        engine.load(spec("lonely", "1", Broken(), pinned=True))
    with pytest.raises(Unavailable, match="'lonely' version '1' cannot serve: RuntimeError"):
        ig(engine, "lonely")
    assert [m.key for m in engine.models()] == [("m", "1")]


def test_a_version_still_loading_is_unavailable_and_requests_go_to_a_ready_one(engine) -> None:
    old = Scaled(3.0)
    engine.load(spec("m", "1", old))
    gated = Gated()
    gated.hold()
    loader = threading.Thread(target=engine.load, args=(spec("m", "2", gated, pinned=True),))
    loader.start()
    try:
        assert gated.entered.wait(30)  # in its warm-up forward
        assert engine.model_record("m", "2").state == ModelState.LOADING
        with pytest.raises(Unavailable, match="model 'm' version '2' is still loading; retry"):
            ig(engine, "m", "2")
        assert_from(ig(engine, "m").result(30), old, "1")
    finally:
        gated.open()
        loader.join(60)
    assert_from(ig(engine, "m").result(30), gated, "2")


def test_a_reload_swaps_once_ready_and_the_previous_load_finishes_what_it_accepted(engine) -> None:
    before, after = Scaled(1.0), Scaled(-4.0)
    engine.load(spec("m", "1", before))
    with engine.held():
        accepted = ig(engine, "m")  # queued on the first load
        wait_in_flight(engine, 1)
        reload = threading.Thread(target=engine.load, args=(spec("m", "1", after),))
        reload.start()
        until = time.monotonic() + 30
        while engine.get_model("m").module is not after:  # swapped; the old load now drains
            assert time.monotonic() < until
            time.sleep(0.005)
        assert reload.is_alive()  # waiting for `accepted`
        assert engine.model_record("m").state == ModelState.READY
        later = ig(engine, "m")  # reaches the new load at once
    reload.join(30)
    assert not reload.is_alive()
    assert_from(accepted.result(30), before, "1")
    assert_from(later.result(30), after, "1")
    assert engine.backlog("m") == (0, 0)


def test_a_reload_that_fails_keeps_the_previous_load_serving(engine) -> None:
    good = Scaled(2.0)
    engine.load(spec("m", "1", good))
    with pytest.raises(RuntimeError, match="this build is broken"):
        engine.load(spec("m", "1", Broken(), pinned=True))
    record = engine.model_record("m", "1")
    assert record.state == ModelState.READY and record.model is not None and record.model.module is good
    assert "its last reload failed, the previous load serves: RuntimeError: this build is broken" in record.reason
    assert_from(ig(engine, "m").result(30), good, "1")
    engine.load(spec("m", "1", Scaled(5.0)))  # a later good reload clears the reason
    assert engine.model_record("m", "1").reason == ""


def test_unload_refuses_new_requests_and_waits_for_the_accepted_ones(engine) -> None:
    model, other = Scaled(1.5), Scaled(0.5)
    engine.load(spec("m", "1", model))
    engine.load(spec("other", "1", other))
    done: list[list[str]] = []
    with engine.held():
        accepted = [ig(engine, "m") for _ in range(3)]
        wait_in_flight(engine, 3)
        unload = threading.Thread(target=lambda: done.append(engine.unload("m")))
        unload.start()
        until = time.monotonic() + 30
        while engine.model_record("m").state != ModelState.UNLOADING:
            assert time.monotonic() < until
            time.sleep(0.005)
        with pytest.raises(Unavailable, match="model 'm' version '1' is being unloaded"):
            ig(engine, "m")
        time.sleep(0.1)
        assert unload.is_alive() and not done  # the accepted requests have not run yet
        serving = ig(engine, "other")  # other models are not held up
    for future in accepted:
        assert_from(future.result(30), model, "1")
    unload.join(30)
    assert done == [["1"]]
    with pytest.raises(NotFound, match="model 'm' is not served"):
        ig(engine, "m")
    assert_from(serving.result(30), other, "1")
    assert [m.name for m in engine.models()] == ["other"]


def test_unload_stops_waiting_after_the_drain_time_but_never_drops_a_request() -> None:
    engine = Engine(EngineLimits(probe_batch_rows=False, drain_seconds=0.2))
    try:
        model = Scaled(1.0)
        engine.load(spec("m", "1", model))
        with engine.held():
            accepted = ig(engine, "m")
            wait_in_flight(engine, 1)
            start = time.monotonic()
            assert engine.unload("m", "1") == ["1"]
            assert 0.2 <= time.monotonic() - start < 5
        assert_from(accepted.result(30), model, "1")  # finished on the released load
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_unload_of_one_version_leaves_the_others(engine) -> None:
    one, two = Scaled(1.0), Scaled(2.0)
    engine.load(spec("m", "1", one))
    engine.load(spec("m", "2", two))
    assert engine.unload("m", "2") == ["2"]
    assert_from(ig(engine, "m").result(30), one, "1")
    with pytest.raises(NotFound, match="has no version '2'"):
        ig(engine, "m", "2")
    with pytest.raises(NotFound):
        engine.unload("m", "7")
    with pytest.raises(NotFound):
        engine.unload("nope")


def test_a_load_after_shutdown_fails_and_starts_no_worker() -> None:
    """A load still running when the server stops (a LoadModel call, a poll) must not start a worker afterwards."""
    engine = Engine(EngineLimits(probe_batch_rows=False))
    engine.load(spec("m", "1", Scaled(1.0)))
    engine.shutdown(drain=True, timeout=5)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(Unavailable, match="shut down"):
        engine.load(spec("late", "1", Scaled(2.0)))
    assert {t.name for t in threading.enumerate()} <= before
    assert engine.model_record("late", "1").state == ModelState.UNAVAILABLE


def test_a_load_warms_every_perturbation_method_on_a_few_rows_and_the_default_mask_still_gets_captums_numbers() -> None:
    """The load runs each algorithm once (first-call costs, capability). Perturbation methods get a mask of two features
    for it, so the warm-up is a handful of rows whatever the input's size: with the default mask (one feature per
    element) ShapleyValueSampling alone was 25 passes over every element, 19,201 rows here and 76,777 for a 3x32x32
    image (8 s and 1.5 GiB at every load). Every one of them is still warmed and serves, with the default mask too."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 14 * 14, 3)).eval()
    engine = Engine(EngineLimits(probe_batch_rows=False))
    try:
        with passes_of(engine) as passes:
            model = engine.load(
                ModelSpec(name="img", module=module, inputs=[InputSpec("x", torch.float32, (3, 16, 16))], device="cpu", max_batch_rows=64)
            )
        perturbation = {name for name, a in engine.algorithms.items() if a.uses_feature_mask and not a.layer_method}
        assert {"feature_ablation", "shapley_value_sampling", "shapley_values", "lime", "kernel_shap"} <= perturbation
        assert perturbation <= set(engine.supported_algorithms(model)) and not perturbation & set(model.unsupported)
        assert 0 < sum(p.rows for p in passes) < 1_000
        x = torch.randn(1, 3, 16, 16)
        job = AttributionJob(model="img", algorithm="feature_ablation", inputs=(x,), target=torch.tensor([[1]]))
        got = engine.submit(job).result(timeout=60)
        torch.testing.assert_close(got.attributions[0], ca.FeatureAblation(module).attribute(x, target=1), atol=1e-5, rtol=0)
    finally:
        engine.shutdown(drain=False, timeout=5)


def stuck_engine(limit: float = 1.0) -> Engine:
    return Engine(EngineLimits(probe_batch_rows=False, drain_seconds=30.0, stuck_load_seconds=limit))


def held_gate() -> Gated:
    """A model whose next forward (a pinned load's warm-up) waits until it is opened."""
    gated = Gated()
    gated.hold()
    return gated


def stuck_loads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"attrserve-load-{name}-v1"]


def test_a_load_stuck_in_the_models_code_is_given_up_and_serves_if_it_returns() -> None:
    """A model whose load never returns (here its warm-up forward waits on a gate) held its caller for ever: the server's
    start-up, every later poll of the repository, a LoadModel. Now the load is given up after stuck_load_seconds:
    the version is UNAVAILABLE saying so, the others serve, and it is not loaded again while its stuck thread runs.
    When that load returns after all, its model serves."""
    engine = stuck_engine()
    try:
        good = Scaled(2.0)
        engine.load(spec("m", "1", good))
        gated = held_gate()
        started = time.monotonic()
        with pytest.raises(LoadStuck, match=r"^its load did not finish within 1 s \(stuck_load_seconds\): the model's code"):
            engine.load(spec("s", "1", gated, pinned=True))
        assert 0.9 < time.monotonic() - started < 10
        assert gated.entered.is_set()  # still inside its warm-up
        record = engine.model_record("s", "1")
        assert record.state == ModelState.UNAVAILABLE and record.reason.startswith("LoadStuck: its load did not finish within 1 s")
        assert record.reason.endswith("the load runs on, and the version serves if it ever returns")
        with pytest.raises(Unavailable, match=r"model 's' version '1' cannot serve: LoadStuck: its load did not finish"):
            ig(engine, "s")
        assert_from(ig(engine, "m").result(30), good, "1")
        with pytest.raises(FailedPrecondition, match=r"model 's' version '1': its load started \d+ s ago was given up as stuck"):
            engine.load(spec("s", "1", Scaled(3.0)))
        assert engine.model_record("s", "1").reason == record.reason  # the refusal changes nothing

        (stuck,) = stuck_loads("s")
        assert stuck.daemon  # it never holds up the process's exit
        gated.open()  # the stuck load returns: its model serves
        stuck.join(30)
        assert not stuck.is_alive()
        assert engine.model_record("s", "1").state == ModelState.READY and engine.model_record("s", "1").reason == ""
        assert_from(ig(engine, "s").result(30), gated, "1")
        again = Scaled(-3.0)
        engine.load(spec("s", "1", again))  # and it may be loaded again
        assert_from(ig(engine, "s").result(30), again, "1")
        assert_from(ig(engine, "m").result(30), good, "1")
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_a_stuck_reload_keeps_the_previous_load_serving_and_one_unloaded_meanwhile_is_dropped() -> None:
    engine = stuck_engine()
    try:
        good = Scaled(4.0)
        engine.load(spec("m", "1", good))
        gated = held_gate()
        with pytest.raises(LoadStuck):
            engine.load(spec("m", "1", gated, pinned=True))
        record = engine.model_record("m", "1")
        assert record.state == ModelState.READY and record.model is not None and record.model.module is good
        assert record.reason.startswith("its last reload failed, the previous load serves: LoadStuck: its load did not finish")
        assert_from(ig(engine, "m").result(30), good, "1")
        (stuck,) = stuck_loads("m")
        gated.open()
        stuck.join(30)
        assert engine.get_model("m").module is gated  # the late reload swapped in, as a reload does
        assert_from(ig(engine, "m").result(30), gated, "1")

        late = held_gate()
        with pytest.raises(LoadStuck):
            engine.load(spec("u", "1", late, pinned=True))
        engine.unload("u")  # while its load is stuck
        (stuck,) = stuck_loads("u")
        late.open()
        stuck.join(30)
        assert [m.key for m in engine.models()] == [("m", "1")]  # unloaded stays unloaded
        with pytest.raises(NotFound):
            ig(engine, "u")
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_a_load_that_fails_or_succeeds_within_the_limit_is_as_before_and_0_never_gives_up() -> None:
    engine = stuck_engine(limit=30.0)
    try:
        with pytest.raises(RuntimeError, match="this build is broken"):
            engine.load(spec("b", "1", Broken(), pinned=True))  # the load thread's error, raised in the caller
        assert engine.model_record("b", "1").reason == "RuntimeError: this build is broken"
        engine.load(spec("b", "1", Scaled(1.0)))  # a failed load leaves nothing stuck
        assert engine.model_record("b", "1").state == ModelState.READY
    finally:
        engine.shutdown(drain=False, timeout=5)
    engine = stuck_engine(limit=0)
    try:
        gated = held_gate()
        loader = threading.Thread(target=engine.load, args=(spec("s", "1", gated, pinned=True),))
        loader.start()
        assert gated.entered.wait(30)
        time.sleep(1.0)  # longer than the other engine's limit: 0 never gives a load up
        assert engine.model_record("s", "1").state == ModelState.LOADING
        gated.open()
        loader.join(30)
        assert_from(ig(engine, "s").result(30), gated, "1")
    finally:
        engine.shutdown(drain=False, timeout=5)
