"""Admission through the engine: the quick check comes before any parsing, deadlines that the queued work would
miss are refused up front, and the estimate of queued bytes counts what the queued requests hold: their rows' inputs
(and a layer method's layer values), not the activations that exist only during a pass."""

from __future__ import annotations

import os

import pytest
import torch

from attrserve_engine import AttributionJob, DeadlineExceeded, Engine, EngineLimits, InputSpec, InvalidArgument, ModelSpec, ResourceExhausted
from attrserve_engine.events import PassKind
from doubles import Linear3
from oracle import wait_in_flight

X = torch.tensor([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1]])


def ig(deadline: float | None = None, inputs=(X,), priority: str = "interactive") -> AttributionJob:
    return AttributionJob(model="m", algorithm="integrated_gradients", inputs=inputs, target=0, deadline=deadline, priority=priority)


def measured(engine: Engine, blended: float, **kinds: float):
    """Model m's rates as its passes would have measured them: rows/s per pass kind (the scheduler's, which admission
    reads) and over every pass of any kind (LoadedModel.rows_per_second, the one rate admission read before)."""
    model = engine.get_model("m")
    model.rows_per_second = blended
    engine._scheduler(model)._rates[model] = {PassKind(kind): rate for kind, rate in kinds.items()}
    return model


def ablation(n: int, deadline: float | None = None) -> AttributionJob:
    """FeatureAblation of `n` examples: 4 forward rows each (the examples, then each of 3 features ablated)."""
    return AttributionJob(model="m", algorithm="feature_ablation", inputs=(torch.rand(n, 3),), target=0, deadline=deadline)


@pytest.fixture
def engine():
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    engine.load(ModelSpec(name="m", module=Linear3(), inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=64, max_queued_rows=200))
    yield engine
    engine.shutdown(drain=False, timeout=5)


def test_a_full_queue_is_refused_before_the_request_is_parsed(engine) -> None:
    with engine.held():
        accepted = [engine.submit(ig()) for _ in range(2)]  # 2 × 100 rows: the second joins a non-empty queue ...
        wait_in_flight(engine, 2)
        with pytest.raises(ResourceExhausted, match="model 'm' has 200 rows of work queued"):
            engine.submit(ig(inputs=(torch.zeros(2, 7),)))  # ... and a malformed third is refused for the queue, unparsed
    for f in accepted:
        f.result(30)
    with pytest.raises(InvalidArgument):  # with room, the same request gets its real error
        engine.submit(ig(inputs=(torch.zeros(2, 7),)))


def test_a_deadline_the_queued_work_would_miss_is_refused_up_front(engine) -> None:
    import time

    measured(engine, 1_000.0, gradient=1_000.0)  # 100 rows of IG take ~0.1 s
    with pytest.raises(DeadlineExceeded, match=r"would not finish before its deadline: 0 rows queued ahead of it and its own 100 take about 100 ms"):
        engine.submit(ig(deadline=time.monotonic() + 0.05))
    assert engine.submit(ig(deadline=time.monotonic() + 5)).result(30).attributions[0].shape == X.shape
    measured(engine, 1_000.0, gradient=1_000.0)  # (the pass just run measured the real rate)
    with engine.held():
        first = engine.submit(ig(deadline=time.monotonic() + 5))
        wait_in_flight(engine, 1)
        with pytest.raises(DeadlineExceeded, match="100 rows queued ahead of it"):  # 0.2 s needed, 0.15 s left
            engine.submit(ig(deadline=time.monotonic() + 0.15))
    first.result(30)


def test_cancelled_work_stops_counting_as_queued_at_once(engine) -> None:
    """While the worker cannot reach a pass boundary (held here; a long pass in the server), the rows of cancelled
    requests no longer count: neither the queue bound nor the deadline estimate refuses a request for them. Then
    the queue drains and the next request is exact."""
    import time

    with engine.held():
        gone = [engine.submit(ig())]
        wait_in_flight(engine, 1)
        measured(engine, 100.0, gradient=100.0)  # 100 rows ahead and 100 own: 2 s; its own alone: 1 s
        with pytest.raises(DeadlineExceeded, match="100 rows queued ahead of it"):
            engine.submit(ig(deadline=time.monotonic() + 1.5))
        gone.append(engine.submit(ig()))  # 200 rows: the bound
        wait_in_flight(engine, 2)
        with pytest.raises(ResourceExhausted, match="model 'm' has 200 rows of work queued"):
            engine.submit(ig())
        for f in gone:
            assert f.cancel()
        # Not yet dropped (no pass boundary while held), but nobody waits for them: neither their rows nor the
        # requests count (the request limit and the attrserve_queue_requests gauge).
        assert engine.backlog("m") == (0, 0)
        kept = engine.submit(ig(deadline=time.monotonic() + 1.5))  # neither the bound nor the estimate refuses it now
        also = engine.submit(ig())
    assert torch.allclose(kept.result(30).attributions[0], engine.attribute(ig()).attributions[0])
    assert torch.allclose(also.result(30).attributions[0], kept.result().attributions[0])
    wait_in_flight(engine, 0)
    assert engine.backlog("m") == (0, 0)


def test_the_deadline_estimate_counts_each_requests_rows_at_the_rate_of_its_own_pass_kind(engine) -> None:
    """A model serving forward work (perturbation methods) and gradient work (IntegratedGradients) runs the first several
    times as many rows a second. One rate blended over every pass followed the last traffic: after gradient traffic it
    refused forward requests that would have finished well inside their deadlines, and after forward traffic it
    admitted gradient requests that could not (measured on a small CNN: an Occlusion of 2,056 rows, done in 59 ms
    alone, refused for an 89 ms deadline as needing 137 ms; an IG of 400 rows admitted for a 20 ms deadline it then
    missed). The estimate counts each queued request's rows, and the new one's, at the rate of its own pass kind."""
    import dataclasses
    import time

    from oracle import assert_all_close

    measured(engine, 100.0, gradient=100.0, forward=1_000.0)  # after gradient traffic: the blend is the gradient rate
    with engine.held():
        ahead = engine.submit(ig(deadline=time.monotonic() + 30))  # 100 gradient rows: 1 s
        wait_in_flight(engine, 1)
        job = ablation(25, deadline=time.monotonic() + 1.5)  # 100 forward rows: 0.1 s after the 1 s ahead (not 1 s)
        admitted = engine.submit(job)
    assert ahead.result(30).attributions[0].shape == X.shape
    exact = engine.attribute(dataclasses.replace(job, deadline=None), timeout=30)
    assert_all_close(admitted.result(30).attributions, exact.attributions)

    measured(engine, 1_000.0, gradient=100.0, forward=1_000.0)  # after forward traffic: the blend is the forward rate
    with pytest.raises(DeadlineExceeded, match=r"0 rows queued ahead of it and its own 100 take about 1000 ms at model 'm''s ~100 rows/s"):
        engine.submit(ig(deadline=time.monotonic() + 0.5))  # 100 gradient rows: 1 s (not 0.1 s)
    with engine.held():  # a mix ahead: 100 gradient rows (1 s) and 40 forward rows (0.04 s); then 8 forward rows
        queued = [engine.submit(ig()), engine.submit(ablation(10))]
        wait_in_flight(engine, 2)
        with pytest.raises(DeadlineExceeded, match=r"140 rows queued ahead of it and its own 8 take about 1048 ms at model 'm''s ~141 rows/s"):
            engine.submit(ablation(2, deadline=time.monotonic() + 1.0))
    for f in queued:
        f.result(30)
    wait_in_flight(engine, 0)
    assert engine.backlog("m") == (0, 0) and engine.serving() == (True, "")
    assert engine.attribute(ig(deadline=time.monotonic() + 30), timeout=30).attributions[0].shape == X.shape


def test_infidelity_counts_as_forward_rows_whatever_the_algorithm(engine) -> None:
    """infidelity's rows are forward passes (its perturbed inputs and the inputs), whatever the method it evaluates: a
    Saliency request's 2 gradient rows and its infidelity's 22 (10 draws an example, and the 2 examples) are 24 rows
    of mostly forward work. They were counted at the gradient rate, as the method's: 2.4 s here for 0.24 s of work,
    and a request with a deadline between the two was refused."""
    import dataclasses
    import time

    from oracle import assert_all_close

    def saliency(deadline: float | None = None) -> AttributionJob:
        job = AttributionJob(model="m", algorithm="saliency", inputs=(X,), target=0, deadline=deadline, seed=3)
        return dataclasses.replace(job, evaluate={"infidelity": {}})

    measured(engine, 100.0, gradient=10.0, forward=100.0)
    with pytest.raises(DeadlineExceeded, match=r"0 rows queued ahead of it and its own 24 take about 240 ms at model 'm''s ~100 rows/s"):
        engine.submit(saliency(deadline=time.monotonic() + 0.01))
    measured(engine, 100.0, gradient=10.0, forward=100.0)
    got = engine.submit(saliency(deadline=time.monotonic() + 1.5)).result(30)
    want = engine.attribute(saliency(), timeout=30)
    assert_all_close(got.attributions, want.attributions)
    assert got.infidelity is not None and torch.allclose(torch.as_tensor(got.infidelity), torch.as_tensor(want.infidelity))
    wait_in_flight(engine, 0)
    assert engine.backlog("m") == (0, 0) and engine.serving() == (True, "")


def test_each_algorithm_declares_the_pass_kind_most_of_its_rows_run_in() -> None:
    """Admission counts a request's rows at the rate of its algorithm's `pass_kind`: each built-in one runs most of its
    rows in passes of that kind (LayerGradientShap declares its gradient passes: its twice as many layer forwards take
    less time); neuron methods take their base method's (algorithms/neuron.py)."""
    import collections

    from attrserve_engine.events import EngineObserver

    class Rows(EngineObserver):
        def __init__(self) -> None:
            self.rows: collections.Counter = collections.Counter()

        def pass_executed(self, stats) -> None:
            self.rows[stats.kind] += stats.rows

    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
        engine.load(ModelSpec(name="m", module=net, inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=64))
        seen = Rows()
        engine.observers.append(seen)
        checked = []
        for name, algorithm in sorted(engine.algorithms.items()):
            if name == "guided_grad_cam":  # (Grad-CAM needs an image model)
                continue
            params = {"sliding_window_shapes": [[1]]} if name == "occlusion" else {}
            if name.startswith("neuron_"):
                params["neuron_selector"] = 0
            seen.rows.clear()
            engine.attribute(
                AttributionJob(
                    model="m",
                    algorithm=name,
                    inputs=(X,),
                    target=0 if algorithm.uses_target else None,
                    layer="0" if algorithm.layer_method else "",
                    params=params,
                    baselines=(torch.zeros(2, 3),) if algorithm.baseline_distribution else (),
                ),
                timeout=60,
            )
            most = "gradient" if name == "layer_gradient_shap" else seen.rows.most_common(1)[0][0]  # (see above)
            assert most == algorithm.pass_kind.value, (name, dict(seen.rows))
            checked.append(name)
        assert len(checked) == len(engine.algorithms) - 1 and engine.serving() == (True, "")
    finally:
        engine.shutdown(drain=False, timeout=5)


def auto_bound_engine() -> Engine:
    """Model m with no max_queued_rows: its queue holds max_queue_seconds (2 s) of work at the measured rates."""
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    engine.load(ModelSpec(name="m", module=Linear3(), inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=16))
    return engine


def test_the_queue_holds_max_queue_seconds_of_work_of_every_pass_kind_and_the_retry_hint_is_its_seconds() -> None:
    """Each queued request's rows count at the rate of its own pass kind, and the new request's at its kind's: the
    queue holds 2 s of work whether it is gradient rows or forward rows (8 times as many here). The blended rate
    bounded it in rows at whatever rate the last traffic left: after gradient traffic it refused 0.5 s of forward rows
    behind 0.8 s of gradient rows, and after forward traffic it would queue several times 2 s of gradient rows."""
    engine = auto_bound_engine()
    try:
        measured(engine, 128.0, gradient=128.0, forward=1_024.0)  # after gradient traffic: the blend is the gradient rate
        with engine.held():
            queued = [engine.submit(ig())]  # 100 gradient rows: 0.78125 s
            wait_in_flight(engine, 1)
            queued.append(engine.submit(ablation(128)))  # 512 forward rows: 0.5 s, 1.28125 s in all (the blend's bound: 256 rows)
            wait_in_flight(engine, 2)
            # 0.71875 s left: 92 gradient rows or 736 forward rows; the hint is the queued work's 1.28 s
            with pytest.raises(ResourceExhausted, match=r"model 'm' has 612 rows of work queued; 100 more would pass its bound of 704; retry in about 1281 ms"):
                engine.submit(ig())
            with pytest.raises(ResourceExhausted, match=r"model 'm' has 612 rows of work queued; 800 more would pass its bound of 1348; retry in about 1281 ms"):
                engine.submit(ablation(200))
            queued.append(engine.submit(ablation(184)))  # 736 forward rows: 2 s in all
            wait_in_flight(engine, 3)
            with pytest.raises(ResourceExhausted, match=r"model 'm' has 1348 rows of work queued; 1 more would pass its bound of 1348; retry in about 2000 ms"):
                engine.submit(ablation(1))
        results = [f.result(30) for f in queued]
        assert results[0].attributions[0].shape == X.shape and [r.attributions[0].shape[0] for r in results[1:]] == [128, 184]
        wait_in_flight(engine, 0)
        assert engine.backlog("m") == (0, 0) and engine.serving() == (True, "")
        assert engine.attribute(ig(), timeout=30).attributions[0].shape == X.shape
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_a_model_of_one_pass_kind_is_bounded_as_before() -> None:
    """Gradient work alone: 2 s of it at the rate, and the retry hint the queued rows at it, as with the one rate."""
    engine = auto_bound_engine()
    try:
        measured(engine, 100.0, gradient=100.0)
        with engine.held():
            queued = [engine.submit(ig()) for _ in range(2)]  # 200 rows: 2 s
            wait_in_flight(engine, 2)
            with pytest.raises(ResourceExhausted, match=r"model 'm' has 200 rows of work queued; 1 more would pass its bound of 200; retry in about 2000 ms"):
                engine.submit(ig())
        for f in queued:
            assert f.result(30).attributions[0].shape == X.shape
        wait_in_flight(engine, 0)
        assert engine.backlog("m") == (0, 0) and engine.serving() == (True, "")
    finally:
        engine.shutdown(drain=False, timeout=5)


def wide_mlp() -> torch.nn.Module:
    """3 inputs → 4,096 hidden → 2: 32 KiB of activations per example against 12 bytes of inputs."""
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(3, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 2)).eval()


def test_queued_bytes_count_what_queued_requests_hold_not_a_passs_activations() -> None:
    """A queued request holds its rows' inputs (IntegratedGradients: 50 scaled copies of each example), and the
    activations exist only for the rows of the pass that runs. The estimate once counted every queued row's
    activations: on an H200 it let ~24 of 64 callers' ResNet-18 requests queue under a 35 GiB bound, when they
    held 1.9 GiB. Here a bound of three requests' inputs takes three and refuses the fourth; the queued ones
    then give the model's exact IG, and the backlog empties."""
    from oracle import assert_all_close

    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    try:
        one = 100 * 3 * 4  # 2 examples × 50 steps, 12 bytes each; their activations would be 100 × 32 KiB
        engine.load(ModelSpec(name="m", module=wide_mlp(), inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=64, max_queued_bytes=3 * one))
        with engine.held():
            queued = [engine.submit(ig()) for _ in range(3)]
            wait_in_flight(engine, 3)
            with pytest.raises(ResourceExhausted, match=r"model 'm' has ~3.5 KiB of work queued; this request's ~1.2 KiB would pass its bound of 3.5 KiB"):
                engine.submit(ig())
        got = [f.result(30) for f in queued]
        alone = engine.attribute(ig(), timeout=30)
        for result in got:
            assert_all_close(result.attributions, alone.attributions)
        wait_in_flight(engine, 0)
        assert engine.backlog("m") == (0, 0) and engine.serving() == (True, "")
        with engine.held():  # freed: three fit again
            again = [engine.submit(ig()) for _ in range(3)]
        for f in again:
            assert_all_close(f.result(30).attributions, alone.attributions)
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_the_default_bound_on_queued_bytes_is_1_gib_on_the_cpu_and_a_quarter_of_a_gpus_memory(engine, monkeypatch) -> None:
    """Queued requests' rows live in the memory of their model's device: on a GPU the bound is a quarter of it; on the
    CPU 1 GiB, or a quarter of a smaller memory limit (a 2 GiB pod). A config's or the command line's bound still
    wins."""
    import attrserve_engine.engine as engine_module

    assert engine.get_model("m").max_queued_bytes == min(1 << 30, engine_module.device_memory(torch.device("cpu")) // 4)
    for memory, bound in ((2 << 30, 512 << 20), (64 << 30, 1 << 30)):
        monkeypatch.setattr(engine_module, "device_memory", lambda device, memory=memory: memory)
        assert engine_module.queued_bytes_bound(torch.device("cpu")) == bound
    monkeypatch.setattr(engine_module, "device_memory", lambda device: 140 << 30)
    assert engine_module.queued_bytes_bound(torch.device("cuda", 0)) == 35 << 30
    monkeypatch.setattr(engine_module, "device_memory", lambda device: 2 << 30)
    assert engine_module.queued_bytes_bound(torch.device("cuda", 0)) == 1 << 30  # never below the CPU's
    monkeypatch.undo()
    other = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu", default_max_queued_bytes=5 << 20))
    try:
        other.load(ModelSpec(name="m", module=Linear3()))
        other.load(ModelSpec(name="own", module=Linear3(), max_queued_bytes=7 << 20))
        assert (other.get_model("m").max_queued_bytes, other.get_model("own").max_queued_bytes) == (5 << 20, 7 << 20)
        assert other.attribute(ig(), timeout=30).attributions[0].shape == X.shape
    finally:
        other.shutdown(drain=False, timeout=5)


def test_an_unknown_priority_is_refused(engine) -> None:
    with pytest.raises(InvalidArgument, match="priority must be 'interactive' or 'batch'"):
        engine.submit(ig(priority="urgent"))


def test_the_lasso_fit_stops_at_a_deadline_between_sweeps() -> None:
    import time

    from attrserve_engine.algorithms.linear_models import lasso

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(50, 300, generator=g), torch.rand(50, generator=g)
    with pytest.raises(DeadlineExceeded, match=r"while fitting Lime's surrogate \(300 features, sweep 0\)"):
        lasso(x, y, alpha=0.001, deadline=time.monotonic() - 1)
    assert lasso(x, y, alpha=0.001, deadline=time.monotonic() + 60).coef.shape == (300,)


def test_a_lime_request_hands_its_deadline_to_the_fit(monkeypatch) -> None:
    """Lime's surrogate runs on the worker after the passes (an outside probe saw a fit over 4,096 features hold the
    worker 8.7 s past a 2 s deadline). The fit gets the request's deadline and stops between sweeps once it passed."""
    import time

    from attrserve_engine.algorithms import lime, linear_models

    seen: list[float | None] = []

    def slow_lasso(*args, deadline=None, **kwargs):
        seen.append(deadline)
        time.sleep(0.3)  # a fit that takes long; the deadline passes meanwhile
        return linear_models.lasso(*args, deadline=deadline, **kwargs)

    monkeypatch.setattr(lime, "lasso", slow_lasso)
    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    engine.load(ModelSpec(name="m", module=Linear3(), max_batch_rows=64))
    try:
        deadline = time.monotonic() + 0.2
        job = AttributionJob(model="m", algorithm="lime", inputs=(X,), target=0, seed=0, deadline=deadline)
        with pytest.raises(DeadlineExceeded, match="while fitting Lime's surrogate"):
            engine.submit(job).result(30)
        assert seen and seen[0] == deadline and len(seen) == 1  # the second example's fit never started
        assert engine.in_flight() == 0
        ok = engine.submit(AttributionJob(model="m", algorithm="lime", inputs=(X,), target=0, seed=0))
        assert ok.result(30).attributions[0].shape == X.shape
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_a_request_whose_rows_would_hold_more_input_bytes_than_a_quarter_of_the_memory_is_refused(engine, monkeypatch) -> None:
    """Plans build a request's rows at once (IntegratedGradients: n_steps copies of each example), so a request whose
    rows would hold more input bytes than max_request_work_bytes (by default a quarter of the device's memory) is
    refused before any work, whatever the queue; one under it runs and equals the model's exact IG."""
    from attrserve_engine import engine as engine_module

    assert 0 < engine_module.device_memory(torch.device("cpu")) <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(engine_module, "device_memory", lambda device: 4 * 48_000)  # the default cap: 48,000 bytes
    x = torch.randn(20, 3)
    with pytest.raises(ResourceExhausted, match=r"this request's 5000 rows of model work \(20 example\(s\).* would hold 58.6 KiB of inputs at once, over this server's limit of 46.9 KiB"):
        engine.submit(AttributionJob(model="m", algorithm="integrated_gradients", inputs=(x,), target=0, params={"n_steps": 250}))
    # 4,000 rows of 12 bytes: under the cap
    got = engine.submit(AttributionJob(model="m", algorithm="integrated_gradients", inputs=(x,), target=0, params={"n_steps": 200}))
    torch.testing.assert_close(got.result(30).attributions[0], torch.stack([Linear3().integrated_gradients(r, 0) for r in x]), atol=1e-4, rtol=0)
    assert engine.in_flight() == 0 and engine.serving() == (True, "")

    capped = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu", max_request_work_bytes=1_000))
    try:
        capped.load(ModelSpec(name="m", module=Linear3(), inputs=[InputSpec("x", torch.float32, (3,))], max_batch_rows=64))
        with pytest.raises(ResourceExhausted, match="over this server's limit of 1.0 KiB per request"):
            capped.submit(ig())  # 100 rows of 12 bytes
    finally:
        capped.shutdown(drain=False, timeout=5)


class WideEmbedding(torch.nn.Module):
    """32 token ids → a 512-wide embedding (64 KiB per example, 256 times the ids' bytes) → mean → linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.emb = torch.nn.Embedding(100, 512)
        self.head = torch.nn.Linear(512, 2)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def test_a_layer_methods_rows_count_the_layers_values_against_the_request_byte_cap() -> None:
    """A layer method's rows hold the layer's values (LayerIntegratedGradients: the interpolated embeddings) and their
    gradients, which for token ids are hundreds of times the inputs' bytes: the per-request byte cap counts them, from
    each layer's size measured at load. One under the cap runs and equals Captum."""
    import captum.attr as ca

    from oracle import assert_all_close

    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu", max_request_work_bytes=4 << 20))
    try:
        model = engine.load(ModelSpec(name="t", module=WideEmbedding(), inputs=[InputSpec("ids", torch.int64, (32,))], max_batch_rows=256))
        assert model.layer_bytes["emb"] == 32 * 512 * 4 and model.layer_bytes["head"] == 512 * 4
        ids = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(1))
        lig = dict(model="t", algorithm="layer_integrated_gradients", layer="emb")
        # 4 examples × (50 steps + 2): 208 rows of 256 bytes of ids, but 2 × 13 MiB of embeddings and their gradients
        with pytest.raises(ResourceExhausted, match=r"this request's 208 rows .* would hold 26.1 MiB of inputs and layer values at once, over this server's limit of 4.0 MiB"):
            engine.submit(AttributionJob(inputs=(ids,), target=torch.tensor([[1]] * 4), params={"n_steps": 50}, **lig))
        got = engine.attribute(AttributionJob(inputs=(ids[:1],), target=torch.tensor([[1]]), params={"n_steps": 10}, **lig), timeout=60)  # 12 rows: 1.5 MiB
        module = WideEmbedding().eval()
        want = ca.LayerIntegratedGradients(module, module.emb).attribute(ids[:1], target=1, n_steps=10)
        assert_all_close(got.attributions, (want,))
        assert engine.in_flight() == 0 and engine.serving() == (True, "")
    finally:
        engine.shutdown(drain=False, timeout=5)


def test_a_queued_layer_method_counts_its_layers_values_against_the_queued_bytes_bound() -> None:
    """Queued LayerIntegratedGradients requests hold their interpolated embeddings and gradients, hundreds of times
    their ids' bytes: admission counts them as the per-request cap does. A bound of 2 MiB takes one 1.5 MiB request
    and refuses the next; both then equal Captum."""
    import captum.attr as ca

    from oracle import assert_all_close

    engine = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    try:
        engine.load(ModelSpec(name="t", module=WideEmbedding(), inputs=[InputSpec("ids", torch.int64, (32,))], max_batch_rows=256, max_queued_bytes=2 << 20))
        ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(2))
        job = AttributionJob(model="t", algorithm="layer_integrated_gradients", layer="emb", inputs=(ids,), target=torch.tensor([[1]]), params={"n_steps": 10})
        with engine.held():
            first = engine.submit(job)  # 12 rows × (256 bytes of ids + 2 × 64 KiB of embeddings): 1.5 MiB
            wait_in_flight(engine, 1)
            with pytest.raises(ResourceExhausted, match=r"model 't' has ~1.5 MiB of work queued; this request's ~1.5 MiB would pass its bound of 2.0 MiB"):
                engine.submit(job)
        module = WideEmbedding().eval()
        want = ca.LayerIntegratedGradients(module, module.emb).attribute(ids, target=1, n_steps=10)
        assert_all_close(first.result(30).attributions, (want,))
        assert_all_close(engine.attribute(job, timeout=30).attributions, (want,))
        assert engine.in_flight() == 0 and engine.serving() == (True, "")
    finally:
        engine.shutdown(drain=False, timeout=5)
