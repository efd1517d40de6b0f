"""The executor alone: one fused pass over several segments equals each segment run alone; a failure or a device
out-of-memory is pinned on its own segment by re-running in halves.

These tests hand the executor blocks the engine would have built, on the CPU, so their models are loaded on the
CPU whatever the engine's default device is; the engine-level tests (oracle, zoo) run on CUDA in bench/gpu_check.sh."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from attrserve_engine import InvalidArgument, ModelSpec, ResourceExhausted
from attrserve_engine import executor
from attrserve_engine.models import LoadedModel
from attrserve_engine.plan import Block, BlockResult, PassKind
from attrserve_engine.rules import DeepLiftOptions
from doubles import Fragile
from oracle import MODELS, assert_close


def loaded(module: torch.nn.Module, name: str = "m") -> LoadedModel:
    return LoadedModel(ModelSpec(name=name, module=module, device="cpu"), 256, 500)


def said_to_be_cuda(monkeypatch, model: LoadedModel) -> list[torch.device]:
    """Tell the executor that `model` (on the CPU) is on CUDA, to test what it does there without a GPU; returns the
    devices it waited for (executor.wait_for_device, which on the CPU would find no CUDA to wait for)."""
    waited: list[torch.device] = []
    monkeypatch.setattr(model, "device", torch.device("cuda"))
    monkeypatch.setattr(executor, "wait_for_device", waited.append)
    return waited


def gradient_block(x: torch.Tensor, target: int) -> Block:
    return Block(kind=PassKind.GRADIENT, inputs=(x,), args=(), target=torch.full((x.shape[0], 1), target, dtype=torch.int64))


def xs(n: int, seed: int) -> torch.Tensor:
    """n examples in [0, 1)^3, where the toy model's ReLUs are live (its gradients are non-zero)."""
    return torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))


def assert_same(got: BlockResult, want: BlockResult) -> None:
    assert_close(got.outputs, want.outputs, check_dtype=True)
    assert_close(got.selected, want.selected, check_dtype=True)
    assert_close(got.grads[0], want.grads[0], check_dtype=True)


def assert_autograd(got: BlockResult, module: torch.nn.Module, segment: Block) -> None:
    """The segment's outputs, selected outputs and input gradients as plain torch autograd computes them, alone."""
    x = segment.inputs[0].clone().requires_grad_()
    out = module(x)
    selected = out.gather(1, segment.target)[:, 0]
    (grad,) = torch.autograd.grad(selected.sum(), x)
    assert_close(got.outputs, out.detach())
    assert_close(got.selected, selected.detach())
    assert_close(got.grads[0], grad)
    assert bool(grad.abs().sum() > 0)


def test_a_fused_pass_equals_its_segments_alone_and_matches_autograd() -> None:
    model = loaded(MODELS["toy"]())
    segments = [gradient_block(xs(n, seed), seed % 2) for seed, n in enumerate([1, 4, 2])]
    fused = executor.run_pass(model, segments)
    for segment, got in zip(segments, fused):
        alone = executor.run_pass(model, [segment])[0]
        assert_same(got, alone)
        x = segment.inputs[0].clone().requires_grad_()
        out = model.module(x)[:, int(segment.target[0, 0])]
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert_close(got.grads[0], grad)
        assert bool(got.grads[0].abs().sum() > 0)


def test_a_segment_that_breaks_the_model_fails_alone(monkeypatch) -> None:
    model = loaded(Fragile())
    calls: list[int] = []
    real = executor._fused_pass

    def counting(m, segments, *replica):
        calls.append(sum(s.rows for s in segments))
        return real(m, segments, *replica)

    monkeypatch.setattr(executor, "_fused_pass", counting)
    good = [gradient_block(xs(2, seed), 1) for seed in range(3)]
    bad = gradient_block(torch.full((2, 3), 500.0), 1)
    outcomes = executor.run_pass(model, [good[0], good[1], bad, good[2]])
    assert isinstance(outcomes[2], InvalidArgument) and "input out of the model's range" in str(outcomes[2])
    for segment, got in zip(good, [outcomes[0], outcomes[1], outcomes[3]]):
        assert_same(got, executor.run_pass(model, [segment])[0])
        assert_autograd(got, model.module, segment)
    assert calls[:3] == [8, 4, 4]  # the whole pass, then its halves; the good half needs no more splitting
    assert calls[3:5] == [2, 2]  # the bad half in quarters: the bad segment alone fails


def test_a_bad_target_fails_only_its_segment_without_rerunning() -> None:
    model = loaded(MODELS["toy"]())
    good = gradient_block(xs(2, 0), 1)
    bad = gradient_block(xs(2, 1), 5)  # the toy model has 2 outputs
    outcomes = executor.run_pass(model, [good, bad])
    assert isinstance(outcomes[1], InvalidArgument) and "target index 5 is out of range" in str(outcomes[1])
    assert_same(outcomes[0], executor.run_pass(model, [good])[0])
    assert_autograd(outcomes[0], model.module, good)


def simulate_oom(monkeypatch, max_rows: int) -> list[int]:
    """Make the fused pass raise CUDA's out-of-memory error above `max_rows` rows, as a device would."""
    attempts: list[int] = []
    real = executor._fused_pass

    def limited(m, segments, *replica):
        rows = sum(s.rows for s in segments)
        attempts.append(rows)
        if rows > max_rows:
            raise torch.cuda.OutOfMemoryError(f"simulated: {rows} rows do not fit")
        return real(m, segments, *replica)

    monkeypatch.setattr(executor, "_fused_pass", limited)
    return attempts


def test_out_of_memory_splits_segments_then_blocks_and_results_stay_exact(monkeypatch) -> None:
    model = loaded(MODELS["toy"]())
    segments = [gradient_block(xs(16, 3), 0), gradient_block(xs(6, 4), 1)]
    alone = [executor.run_pass(model, [s])[0] for s in segments]
    attempts = simulate_oom(monkeypatch, max_rows=5)
    outcomes = executor.run_pass(model, segments)
    for got, want, segment in zip(outcomes, alone, segments):
        assert isinstance(got, BlockResult)
        assert_same(got, want)
        assert_autograd(got, model.module, segment)
    assert attempts[0] == 22  # tried whole first
    assert sum(r for r in attempts if r <= 5) == 22  # then every row ran exactly once, in passes that fit


def test_out_of_memory_on_an_unsplittable_block_is_resource_exhausted(monkeypatch) -> None:
    model = loaded(MODELS["toy"]())
    x = xs(4, 5)
    paired = Block(kind=PassKind.DEEPLIFT, inputs=(x,), refs=(torch.zeros_like(x),), args=(), target=torch.zeros((4, 1), dtype=torch.int64),
                   options=DeepLiftOptions(1e-10))
    fits = gradient_block(xs(2, 6), 0)
    simulate_oom(monkeypatch, max_rows=4)
    outcomes = executor.run_pass(model, [paired, fits])
    assert isinstance(outcomes[0], ResourceExhausted) and "ran out of device memory on 8 rows" in str(outcomes[0])
    assert isinstance(outcomes[1], BlockResult)
    assert_autograd(outcomes[1], model.module, fits)


def test_the_pass_leaves_the_model_as_it_found_it() -> None:
    module = MODELS["conv"]()
    model = loaded(module)
    x = torch.randn(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    blocks = [
        Block(kind=PassKind.DEEPLIFT, inputs=(x,), refs=(torch.zeros_like(x),), args=(), target=torch.ones((3, 1), dtype=torch.int64),
              options=DeepLiftOptions(1e-10)),
        Block(kind=PassKind.GRADIENT, inputs=(x,), args=(), target=torch.ones((3, 1), dtype=torch.int64), layer="conv2", grad_wrt_layer=True),
    ]
    for block in blocks:
        (outcome,) = executor.run_pass(model, [block])
        assert isinstance(outcome, BlockResult)
        for m in module.modules():
            assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
        assert all(not p.requires_grad for p in module.parameters())


class _Recurrent(torch.nn.Module):
    """Embeddings through a two-layer LSTM with dropout between its layers (eval mode: none), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.lstm = torch.nn.LSTM(4, 5, num_layers=2, dropout=0.5, batch_first=True)
        self.head = torch.nn.Linear(5, 2)
        self.training_seen: list[tuple[bool, float]] = []

    def forward(self, x):
        self.training_seen.append((self.lstm.training, self.lstm.dropout))
        return self.head(self.lstm(x)[0][:, -1])


def test_a_gradient_pass_on_cuda_runs_rnns_in_training_mode_without_dropout_and_puts_them_back(monkeypatch) -> None:
    """cuDNN refuses an eval-mode RNN's backward, so on CUDA a gradient pass switches the model's RNN modules to
    training mode with dropout 0 (eval mode's numbers) and restores both after the pass, also when the pass fails.
    Run on the CPU with the model's device said to be CUDA: the switch is the executor's, not cuDNN's."""
    module = _Recurrent()
    model = loaded(module)
    x = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(0))
    (cpu,) = executor.run_pass(model, [gradient_block(x, 1)])
    assert module.training_seen == [(False, 0.5)]  # on the CPU nothing is switched
    said_to_be_cuda(monkeypatch, model)
    module.training_seen.clear()
    (switched,) = executor.run_pass(model, [gradient_block(x, 1)])
    assert module.training_seen == [(True, 0.0)]
    assert_same(switched, cpu)  # dropout 0 in training mode is eval mode's answer
    assert (module.lstm.training, module.lstm.dropout) == (False, 0.5)
    forward = Block(kind=PassKind.FORWARD, inputs=(x,), args=(), target=torch.ones((3, 1), dtype=torch.int64))
    module.training_seen.clear()
    executor.run_pass(model, [forward])
    assert module.training_seen == [(False, 0.5)]  # a forward pass needs no gradient: eval mode as loaded
    (failed,) = executor.run_pass(model, [gradient_block(x, 7)])  # the model has 2 outputs
    assert isinstance(failed, InvalidArgument)
    assert (module.lstm.training, module.lstm.dropout) == (False, 0.5)
    monkeypatch.undo()
    (again,) = executor.run_pass(model, [gradient_block(x, 1)])
    assert_same(again, cpu)


def test_a_pass_on_cuda_returns_once_the_gpu_has_finished_it(monkeypatch) -> None:
    """CUDA kernels run after their launch returns: a pass waits for the GPU after its backward, inside run_pass, so
    the scheduler's pass time (the model's rate, the tuner, worker busy, compute_ms) is the GPU's work, not its
    launches. Once per pass, fused or not, and not on the CPU; the numbers are the same."""
    events: list[str] = []
    module = _Recurrent()
    module.register_forward_hook(lambda *_: events.append("forward"))
    module.register_full_backward_hook(lambda *_: events.append("backward"))
    model = loaded(module)
    x = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(0))
    (cpu,) = executor.run_pass(model, [gradient_block(x, 1)])
    waited = said_to_be_cuda(monkeypatch, model)
    monkeypatch.setattr(executor, "wait_for_device", lambda device: (waited.append(device), events.append("wait")))
    events.clear()
    first, _ = executor.run_pass(model, [gradient_block(x, 1), gradient_block(x[:2], 0)])
    assert events == ["forward", "backward", "wait"] and waited == [torch.device("cuda")]
    assert_same(first, cpu)
    monkeypatch.undo()
    events.clear()
    executor.run_pass(model, [gradient_block(x, 1)])
    assert events == ["forward", "backward"]  # the CPU computes before it returns


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it on a GPU)")
def test_on_a_real_gpu_a_pass_returns_with_its_kernels_done() -> None:
    model = LoadedModel(ModelSpec(name="m", module=_Recurrent(), device="cuda"), 256, 500)
    x = torch.rand(512, 6, 4, generator=torch.Generator().manual_seed(0)).cuda()
    (result,) = executor.run_pass(model, [gradient_block(x, 1)])
    assert torch.cuda.current_stream().query()  # nothing of the pass is left to run
    assert result.grads[0].shape == x.shape


class _ScriptableRecurrent(torch.nn.Module):
    def __init__(self, layers: int, dropout: float) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.lstm = torch.nn.LSTM(4, 5, num_layers=layers, dropout=dropout, batch_first=True)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_a_scripted_rnn_is_switched_only_where_its_constant_dropout_drops_nothing(monkeypatch) -> None:
    """In TorchScript an RNN's dropout is a constant: one that drops nothing (one layer, or dropout 0) is switched to
    training mode like an eager one, with eval mode's numbers. (One that would drop is refused on CUDA: below.)"""
    x = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(1))
    for layers, dropout, switched in ((1, 0.5, True), (2, 0.0, True)):
        model = loaded(torch.jit.script(_ScriptableRecurrent(layers, dropout)))
        rnns = model.rnns(model.module)
        assert [r.original_name for r in rnns] == (["LSTM"] if switched else [])
        (cpu,) = executor.run_pass(model, [gradient_block(x, 1)])
        said_to_be_cuda(monkeypatch, model)
        seen: list[bool] = []
        monkeypatch.setattr(executor.RnnTrainingMode, "install", _spy(executor.RnnTrainingMode.install, seen, model.module.lstm))
        (pass_,) = executor.run_pass(model, [gradient_block(x, 1)])
        assert seen == ([True] if switched else [])
        assert_same(pass_, cpu)  # eval mode's numbers either way
        assert not model.module.lstm.training
        monkeypatch.undo()


class _Encoder(torch.nn.Module):
    def __init__(self, lstm: torch.nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        return self.lstm(x)[0][:, -1]


class _WithScriptedEncoder(torch.nn.Module):
    def __init__(self, eager: _ScriptableRecurrent) -> None:
        super().__init__()
        self.encoder = torch.jit.script(_Encoder(eager.lstm))
        self.head = eager.head

    def forward(self, x):
        return self.head(self.encoder(x))


@pytest.mark.parametrize("scripted", ["model", "submodule"])
def test_a_gradient_pass_on_cuda_through_a_scripted_rnn_that_would_drop_is_refused_naming_the_module(monkeypatch, scripted: str) -> None:
    """cuDNN takes an RNN's gradient only in training mode, where a scripted 2-layer LSTM's constant dropout 0.5 would
    apply: the pass is refused at once (FAILED_PRECONDITION, not cuDNN's raw error, and not split in halves in search
    of a culprit), with the module's name and the ways out. Forward passes still run, and on the CPU gradients too."""
    from attrserve_engine.errors import FailedPrecondition

    x = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(1))
    module: torch.nn.Module = _ScriptableRecurrent(2, 0.5).eval()
    if scripted == "model":
        module, name = torch.jit.script(module), "lstm"
    else:  # an eager model whose encoder is scripted
        module, name = _WithScriptedEncoder(module), "encoder.lstm"
    model = loaded(module)
    assert model.rnns(model.module) == [] and [n for n, _ in model.dropping_rnns] == [name]
    forward = Block(kind=PassKind.FORWARD, inputs=(x,), args=(), target=torch.ones(3, 1, dtype=torch.int64))
    (cpu,) = executor.run_pass(model, [gradient_block(x, 1)])
    (cpu_forward,) = executor.run_pass(model, [forward])
    said_to_be_cuda(monkeypatch, model)
    splits: list[str] = []
    outcomes = executor.run_pass(model, [gradient_block(x, 1), gradient_block(x[:2], 0)], splits.append)
    assert len(outcomes) == 2 and splits == []
    for refused in outcomes:
        assert isinstance(refused, FailedPrecondition) and refused.code == "FAILED_PRECONDITION"
        assert f"model 'm': its scripted LSTM '{name}' has dropout 0.5 between its 2 layers" in str(refused)
        assert "Script it with dropout=0" in str(refused) and "serve it on the CPU" in str(refused)
    (on_cuda_forward,) = executor.run_pass(model, [forward])  # no gradient: runs
    assert_close(on_cuda_forward.outputs, cpu_forward.outputs, check_dtype=True)
    monkeypatch.undo()
    (again,) = executor.run_pass(model, [gradient_block(x, 1)])
    assert_same(again, cpu)
    assert not any(m.training for m in model.module.modules())


def _spy(install, seen: list[bool], lstm):
    def spied(self) -> None:
        install(self)
        seen.append(lstm.training)

    return spied


@pytest.mark.parametrize("field", ["layer", "options", "select"])
def test_blocks_that_differ_in_any_setting_have_different_batch_keys(field: str) -> None:
    block = gradient_block(xs(2, 0), 1)
    other = {
        "layer": Block(kind=block.kind, inputs=block.inputs, args=(), target=block.target, layer="lin1"),
        "options": Block(kind=PassKind.DEEPLIFT, inputs=block.inputs, args=(), target=block.target, options=DeepLiftOptions(1e-3)),
        "select": Block(kind=block.kind, inputs=block.inputs, args=(), target=block.target, select=False),
    }[field]
    assert block.pass_key != other.pass_key
    # Same settings, other values and row counts: the same key.
    assert block.pass_key == gradient_block(xs(7, 9), 0).pass_key


def test_nan_inputs_in_a_fused_pass_poison_only_their_own_request() -> None:
    """A request whose inputs are NaN (Captum then answers NaN) shares passes with others: their answers equal
    what they get alone, bit for bit; NaN never crosses rows."""
    from attrserve_engine import AttributionJob
    from oracle import MODELS, example_inputs, make_engine, submit_held

    engine = make_engine({"conv": MODELS["conv"]}, default_max_queue_delay_us=0, probe_batch_rows=False)
    try:
        jobs = []
        for seed in range(4):
            (x,), _ = example_inputs("conv", 2, seed=seed)
            jobs.append(AttributionJob(model="conv", algorithm="integrated_gradients", inputs=(x,), target=torch.tensor([[0], [1]])))
        (poison,), _ = example_inputs("conv", 2, seed=9)
        poison = poison.clone()
        poison[0, 0, 0, 0] = float("nan")
        fused = submit_held(engine, [jobs[0], jobs[1], AttributionJob(model="conv", algorithm="integrated_gradients", inputs=(poison,), target=torch.tensor([[0], [1]])), jobs[2], jobs[3]])
        results = [f.result(60) for f in fused]
        assert results[2].timing.pass_requests >= 2  # it really shared passes with others
        assert bool(torch.isnan(results[2].attributions[0][0]).any())
        alone = [engine.attribute(j, timeout=60) for j in jobs]
        for got, want in zip([results[i] for i in (0, 1, 3, 4)], alone):
            assert not bool(torch.isnan(got.attributions[0]).any())
            torch.testing.assert_close(got.attributions[0], want.attributions[0], atol=1e-6, rtol=0)
    finally:
        engine.shutdown(drain=False, timeout=5)


class _ThreadsSeen(torch.nn.Module):
    """A small CNN that records the torch intra-op thread count each forward runs with."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8 * 6 * 6, 4)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        time.sleep(0.0002)  # lets another thread run here, as a model's ops that release the GIL do
        hidden = torch.relu(self.conv(x))
        self.seen.append(torch.get_num_threads())
        return self.fc(hidden.flatten(1))


def test_each_model_runs_its_passes_with_its_own_intra_op_threads() -> None:
    """ModelConfig.intra_op_threads: a model's passes run with its count and another's with the engine's, even while a
    model being loaded runs its probe passes on another thread; a fused pass still equals its segments alone."""
    before = torch.get_num_threads()
    try:
        two = LoadedModel(ModelSpec(name="two", module=_ThreadsSeen(), intra_op_threads=2, device="cpu"), 256, 500, default_threads=1)
        one = LoadedModel(ModelSpec(name="one", module=_ThreadsSeen(), device="cpu"), 256, 500, default_threads=1)
        assert (two.intra_op_threads, one.intra_op_threads) == (2, 1)
        images = torch.rand(6, 3, 6, 6, generator=torch.Generator().manual_seed(0))
        segments = [gradient_block(images[a:b], t) for a, b, t in ((0, 1, 0), (1, 4, 3), (4, 6, 1))]

        def serve(model: LoadedModel, passes: int) -> None:
            for _ in range(passes):
                executor.run_pass(model, segments)

        loading = threading.Thread(target=serve, args=(two, 150))  # like tuning.py's probe on a loading thread
        loading.start()
        serve(one, 150)
        loading.join()
        assert set(two.module.seen) == {2} and set(one.module.seen) == {1}
        for model in (two, one):
            fused = executor.run_pass(model, segments)
            for segment, got in zip(segments, fused):
                assert_same(got, executor.run_pass(model, [segment])[0])
                assert_autograd(got, model.module, segment)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(3, 5),
        torch.randn(2, 3, 4, 4, dtype=torch.float64),
        torch.randn(4, 6)[:, ::2],  # not contiguous
        torch.randint(0, 9, (2, 7)),  # token ids: points in the default dtype, as Captum makes them
        torch.randn(1, 2, 3, dtype=torch.bfloat16),
        torch.randn(2, 5, dtype=torch.float16),
    ],
)
def test_the_path_points_are_captums_bit_for_bit(x: torch.Tensor) -> None:
    """interpolate's points (cached alphas, one broadcast) are exactly Captum's loop's, call after call, in every dtype:
    in half precision too, where alphas rounded to the input's dtype first missed Captum's in ~1 point of 4."""
    from attrserve_engine.algorithms.integrated_gradients import interpolate, step_sizes_and_alphas

    b = torch.full_like(x, 2)
    for method, n in [("gausslegendre", 50), ("riemann_trapezoid", 7), ("riemann_left", 3)]:
        _, alphas = step_sizes_and_alphas(method, n)
        for _ in range(2):  # the second call reads the cached alphas
            (got,) = interpolate((x,), (b,), alphas)
            xf, bf = (x, b) if x.is_floating_point() else (x.to(torch.get_default_dtype()), b.to(torch.get_default_dtype()))
            expected = torch.cat([bf + alpha * (xf - bf) for alpha in alphas], dim=0)  # Captum's IntegratedGradients
            assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it on a GPU)")
def test_on_a_real_gpu_scripted_rnns_give_the_cpus_gradients_or_are_refused_where_cudnn_cannot() -> None:
    """On CUDA: scripted LSTMs that drop nothing give the CPU's gradients; through one that would drop, cuDNN really
    refuses the gradient (so the refusal is needed) and the pass gets the FAILED_PRECONDITION that names it."""
    from attrserve_engine.errors import FailedPrecondition

    x = torch.rand(3, 6, 4, generator=torch.Generator().manual_seed(1))
    for layers, dropout in ((1, 0.5), (2, 0.0), (2, 0.5)):
        cpu_model = loaded(torch.jit.script(_ScriptableRecurrent(layers, dropout)))
        (cpu,) = executor.run_pass(cpu_model, [gradient_block(x, 1)])
        model = LoadedModel(ModelSpec(name="m", module=torch.jit.script(_ScriptableRecurrent(layers, dropout)), device="cuda"), 256, 500)
        block = gradient_block(x.cuda(), 1)
        (got,) = executor.run_pass(model, [block])
        if (layers, dropout) != (2, 0.5):
            torch.testing.assert_close(got.grads[0].cpu(), cpu.grads[0], atol=1e-5, rtol=1e-4)
            continue
        assert isinstance(got, FailedPrecondition)
        with pytest.raises(RuntimeError, match="cudnn RNN backward can only be called in training mode"):
            executor._fused_pass(model, [block], model.module)
