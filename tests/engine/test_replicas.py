"""ModelConfig.instances: a model's replicas run passes at the same time, one pass per replica, on the workers of its
device; results are exact and Captum's whatever replica ran them and in whatever order a block's parts come back;
a worker that dies takes its siblings' jobs with it (UNAVAILABLE), and the restart brings every worker back."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

import test_layer_methods as layer_methods
import test_rule_methods as rule_methods
from attrserve_engine import AttributionJob, Cancelled, Engine, EngineLimits, InvalidArgument, ModelSpec, Unavailable
from attrserve_engine.models import LoadedModel
from attrserve_engine.plan import Attribution, Block, BlockResult, PassKind
from attrserve_engine.scheduler import LiveJob, Scheduler
from oracle import CASES, MODELS, assert_all_close, assert_close, captum_attribute, job_for
from test_scheduler import FakePasses, Recorder, job


def wait_until_waiting(thread_name: str, timeout: float = 10.0) -> None:
    """Until the named worker thread waits on a condition (asleep at the end of its loop), not merely between passes.

    A worker still finishing its last turn takes whatever is in the inbox at its next one: a lone arrival sent the
    moment a burst's results are in may be started by the second worker before it goes to sleep (CI saw a one-replica
    model's plan started there). Tests of who is woken must begin with every worker asleep."""
    ident = next(t.ident for t in threading.enumerate() if t.name == thread_name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frame = sys._current_frames().get(ident)
        if frame is not None and frame.f_code.co_name == "wait" and frame.f_code.co_filename == threading.__file__:
            return
        time.sleep(0.001)
    raise AssertionError(f"{thread_name} did not go to sleep in {timeout} s")


class OverlapPasses(FakePasses):
    """FakePasses that take `seconds` each and record which replica ran each pass and how many ran at once."""

    def __init__(self, seconds: float = 0.03) -> None:
        super().__init__()
        self.seconds = seconds
        self.running: dict[int, int] = {}  # replica -> passes on it now
        self.most_at_once = 0
        self.replicas: list[int] = []
        self.shared_replica = False

    def __call__(self, model, segments, on_split=None, replica=0):
        with self.lock:
            self.shared_replica |= self.running.get(replica, 0) > 0
            self.running[replica] = self.running.get(replica, 0) + 1
            self.most_at_once = max(self.most_at_once, sum(self.running.values()))
            self.replicas.append(replica)
        try:
            time.sleep(self.seconds)
            return super().__call__(model, segments, on_split, replica)
        finally:
            with self.lock:
                self.running[replica] -= 1


def replicated(instances: int, max_batch_rows: int = 8, name: str = "m", delay_us: int = 1) -> LoadedModel:
    return LoadedModel(ModelSpec(name=name, module=torch.nn.Linear(1, 1), instances=instances), max_batch_rows, delay_us)


def started_by(starters: list[str], m: LoadedModel, tag: float, rows: int) -> LiveJob:
    """A job whose plan, when a worker starts it, appends that worker thread's name to `starters`."""
    live = job(m, tag, rows=rows)
    plan = live.plan_factory

    def factory():
        starters.append(threading.current_thread().name)
        return plan()

    live.plan_factory = factory
    return live


def test_passes_of_a_model_with_two_replicas_overlap_each_on_its_own_replica() -> None:
    passes, rec = OverlapPasses(), Recorder()
    s = Scheduler("test", 10_000, [rec], run_pass=passes)
    try:
        two = replicated(2)
        futures = [s.submit(job(two, 1.0 + i, rows=8)) for i in range(12)]  # 12 passes of 8 rows
        assert [f.result(10) for f in futures] == [8 * (1.0 + i) for i in range(12)]
        assert passes.most_at_once == 2 and not passes.shared_replica and set(passes.replicas) == {0, 1}
        # A model with one replica never overlaps itself, though the device now has two workers.
        passes.most_at_once, passes.replicas = 0, []
        one = replicated(1, name="one")
        futures = [s.submit(job(one, 1.0 + i, rows=8)) for i in range(6)]
        assert [f.result(10) for f in futures] == [8 * (1.0 + i) for i in range(6)]
        assert passes.most_at_once == 1 and set(passes.replicas) == {0}
        assert s.in_flight() == 0 and s.serving() == (True, "")
    finally:
        s.stop(drain=False)


def test_a_one_replica_models_passes_stay_on_the_first_worker_and_none_waits_for_a_wake_up() -> None:
    """A device with a two-replica model has two workers; a one-replica model's passes all run on the first (they
    hopped between the two before, 8% slower on the bench CNN), while the other model's passes use both. Requests
    that arrive one at a time, cancels and holds reach the first worker whichever worker heard of them: each lone
    request is answered in well under its 10 s wait."""
    threads: dict[str, set[str]] = {"one": set(), "two": set()}

    class Where(OverlapPasses):
        def __call__(self, model, segments, on_split=None, replica=0):
            threads[model.name].add(threading.current_thread().name)
            return super().__call__(model, segments, on_split, replica)

    passes, rec = Where(seconds=0.005), Recorder()
    s = Scheduler("test", 10_000, [rec], run_pass=passes)
    try:
        two, one = replicated(2, name="two"), replicated(1, name="one")
        both = [s.submit(job(m, 1.0 + i, rows=8)) for i in range(12) for m in (two, one)]
        assert [f.result(10) for f in both] == [8 * (1.0 + i) for i in range(12) for _ in (two, one)]
        for i in range(20):  # lone arrivals, with the other worker idle too
            assert s.submit(job(one, 2.0, rows=1)).result(10) == 2.0
            time.sleep(0.002 * (i % 3))
        s.hold()
        queued = s.submit(job(one, 3.0, rows=2))
        leaving = job(one, 4.0, rows=2)
        gone = s.submit(leaving)
        s.cancel(leaving)
        s.release()
        assert queued.result(10) == 6.0
        with pytest.raises(Cancelled):
            gone.result(10)
        assert threads["one"] == {"attrserve-worker-test"}
        assert "attrserve-worker-test-1" in threads["two"] <= {"attrserve-worker-test", "attrserve-worker-test-1"}
        assert s.in_flight() == 0 and s.serving() == (True, "")
    finally:
        s.stop(drain=False)


def test_work_of_a_one_replica_model_does_not_wake_the_other_workers() -> None:
    """The second worker runs only models of several replicas, so arrivals and passes of a one-replica model leave it
    asleep: the first worker starts every such plan itself, instead of the two racing for each arrival (which cost
    the bench's CPU device 12% of a core and a hand-over per request). Work of the two-replica model still wakes it."""
    starters: dict[str, list[str]] = {"one": [], "two": []}
    s = Scheduler("test", 10_000, [Recorder()], run_pass=OverlapPasses(seconds=0.005))
    try:
        two, one = replicated(2, name="two"), replicated(1, name="one")
        assert [f.result(10) for f in [s.submit(started_by(starters["two"], two, 1.0, 8)) for _ in range(8)]] == [8.0] * 8
        assert "attrserve-worker-test-1" in set(starters["two"])  # both workers are up and took work
        wait_until_waiting("attrserve-worker-test-1")
        for i in range(40):  # lone arrivals, both workers idle between them
            assert s.submit(started_by(starters["one"], one, 2.0, 1)).result(10) == 2.0
            time.sleep(0.001 * (i % 3))
        assert set(starters["one"]) == {"attrserve-worker-test"}
        assert s.in_flight() == 0 and s.serving() == (True, "")
    finally:
        s.stop(drain=False)


def test_one_callers_work_of_a_two_replica_model_stays_on_the_idle_first_worker_and_one_replica() -> None:
    """Lone arrivals of a two-replica model, with both workers idle between them: the first worker takes each one
    itself and runs it on the replica it used last (warm in the caches), instead of waking the second worker and
    alternating replicas, a hand-over and a cold copy per request. A burst still runs on both replicas at once."""
    starters: list[str] = []
    passes = OverlapPasses(seconds=0.002)
    s = Scheduler("test", 10_000, [Recorder()], run_pass=passes)
    try:
        two = replicated(2, name="two")
        burst = [s.submit(job(two, 1.0 + i, rows=8)) for i in range(12)]
        assert [f.result(10) for f in burst] == [8 * (1.0 + i) for i in range(12)]
        assert passes.most_at_once == 2 and set(passes.replicas) == {0, 1}  # both workers and replicas under load
        wait_until_waiting("attrserve-worker-test-1")  # both workers wait (the first takes each lone arrival itself)
        wait_until_waiting("attrserve-worker-test")
        passes.replicas = []
        for i in range(40):  # lone arrivals, both workers idle between them
            assert s.submit(started_by(starters, two, 2.0, 1)).result(10) == 2.0
            time.sleep(0.001 * (i % 3))
        assert set(starters) == {"attrserve-worker-test"}
        assert len(set(passes.replicas)) == 1 and len(passes.replicas) == 40
        assert s.in_flight() == 0 and s.serving() == (True, "")
        # and it still serves a burst on both replicas afterwards
        passes.most_at_once = 0
        burst = [s.submit(job(two, 3.0, rows=8)) for _ in range(12)]
        assert [f.result(10) for f in burst] == [24.0] * 12 and passes.most_at_once == 2
    finally:
        s.stop(drain=False)


def test_a_block_split_across_replicas_is_put_back_together_in_row_order() -> None:
    """A block bigger than a pass is cut into parts that run on both replicas; the first part is the slowest, so the
    parts come back out of order, and the result must still be the block's rows in order."""

    passes, rec = OverlapPasses(seconds=0.01), Recorder()
    passes.during = lambda segments: time.sleep(0.1) if float(segments[0].inputs[0][0, 0]) == 0.0 else None  # the first part
    s = Scheduler("test", 10_000, [rec], run_pass=passes)
    rows = 40
    values = torch.arange(rows, dtype=torch.float32)[:, None]

    def plan():
        (result,) = yield [Block(kind=PassKind.FORWARD, inputs=(values,), args=(), target=torch.zeros((rows, 0), dtype=torch.int64))]
        return Attribution((result.outputs,))

    try:
        m = replicated(2, max_batch_rows=8)
        live = LiveJob(
            model=m, plan_factory=plan, finish=lambda a, _: a.attributions[0], rows=rows, deadline=None, arrival=time.monotonic()
        )
        got = s.submit(live).result(10)
        assert torch.equal(got, values)
        assert len(rec.passes) == 5 and passes.most_at_once == 2
        assert rec.passes[-1].seconds > 0.1  # the first part came back last
    finally:
        s.stop(drain=False)


def test_a_dying_worker_fails_its_siblings_jobs_and_the_restart_brings_every_worker_back() -> None:
    passes, rec = OverlapPasses(seconds=0.0), Recorder()
    s = Scheduler("test", 10_000, [rec], run_pass=passes, restart_delay_s=0.05)
    m = replicated(2)
    inside, release = threading.Barrier(2, timeout=10), threading.Event()

    def die(segments: list[Block]) -> None:
        tag = float(segments[0].inputs[0][0, 0])
        if tag in (666.0, 7.0):
            inside.wait()  # both passes are running, one on each replica
            if tag == 666.0:
                raise SystemExit("injected: the worker thread dies")
            release.wait(10)  # the sibling is still in its pass when the other dies

    passes.during = die
    try:
        killer, sibling = s.submit(job(m, 666.0)), s.submit(job(m, 7.0))
        with pytest.raises(Unavailable, match="failed \\(SystemExit: injected"):
            killer.result(10)
        with pytest.raises(Unavailable, match="restarting"):
            sibling.result(10)  # failed at once, though its pass is still running
        assert not s.serving()[0]
        release.set()
        deadline = time.monotonic() + 10
        while not s.serving()[0]:
            assert time.monotonic() < deadline, "the workers were not restarted"
            time.sleep(0.01)
        passes.during, passes.seconds, passes.most_at_once = None, 0.03, 0
        futures = [s.submit(job(m, 1.0 + i, rows=8)) for i in range(8)]
        assert [f.result(10) for f in futures] == [8 * (1.0 + i) for i in range(8)]  # exact after the restart
        assert passes.most_at_once == 2  # both workers are back
        assert s.restarts == 1 and [state for state, _ in rec.states] == [False, True] and s.in_flight() == 0
    finally:
        s.stop(drain=False)


def test_instances_are_bounded_and_a_model_that_cannot_be_copied_is_refused_by_name() -> None:
    with pytest.raises(InvalidArgument, match=r"model 'many': instances 100000 is more than 4 per core"):
        LoadedModel(ModelSpec(name="many", module=torch.nn.Linear(1, 1), instances=100_000), 8, 1)

    class Uncopyable(torch.nn.Linear):
        def __deepcopy__(self, memo):
            raise TypeError("holds a handle that cannot be copied")

    with pytest.raises(InvalidArgument, match=r"model 'handle': instances 2 needs copies of the model.*cannot be copied"):
        LoadedModel(ModelSpec(name="handle", module=Uncopyable(1, 1), instances=2), 8, 1)


class ReplicaLog:
    """Wraps a scheduler's pass function: which replicas ran passes, and the most passes that ran at once.

    The first pass waits (up to 30 s) until a second pass *of its model* starts, so that model's two replicas both run
    a pass however slowly the other worker wakes. A second pass of another model would not do: a worker hands out the
    replica returned last, so that pass takes the other model's replica 1 too, and passes that never overlap within
    a model all run on replica 1 (CI saw {1}). The first pass's model must therefore have more than one pass of rows
    queued: `_all_at_once` puts LEAD copies of the first job in front."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.real, self.lock, self.now, self.most, self.replicas = scheduler._run_pass, threading.Lock(), 0, 0, set()
        self.first_model: str | None = None
        self.second = threading.Event()
        scheduler._run_pass = self

    def __call__(self, model, segments, on_split=None, replica=0):
        with self.lock:
            self.now += 1
            self.most, self.replicas = max(self.most, self.now), self.replicas | {replica}
            first = self.first_model is None
            if first:
                self.first_model = model.name
            elif model.name == self.first_model:
                self.second.set()
        if first:
            self.second.wait(30)
        try:
            return self.real(model, segments, on_split, replica)
        finally:
            with self.lock:
                self.now -= 1


PASS_ROWS = 37
LEAD = PASS_ROWS + 1  # copies of the first job: at least one row more than a pass takes, so its model has a second pass


def _replica_engine(models) -> tuple[Engine, ReplicaLog]:
    engine = Engine(EngineLimits(default_max_batch_rows=PASS_ROWS, default_max_queue_delay_us=0))
    for name, build in models.items():
        engine.load(ModelSpec(name=name, module=build(), instances=2))
    return engine, ReplicaLog(engine._scheduler(engine.models()[0]))


def _all_at_once(engine: Engine, jobs: list, copy_first) -> list:
    """`jobs` submitted at once behind LEAD copies of the first (`copy_first()` makes one; they are the oldest rows, so
    the first pass is theirs); every job's result, the copies' first."""
    lead = [copy_first() for _ in range(LEAD)]
    with engine.held():  # every job's first blocks are queued before a pass is cut: the passes overlap on two replicas
        futures = [engine.submit(j) for j in lead + jobs]
    return [f.result(timeout=120) for f in futures]


def test_every_kind_of_pass_on_two_replicas_at_once_equals_captum() -> None:
    """Gradient, DeepLift and noise-tunnel cases (oracle.CASES), layer methods (hooks on the replica that runs the
    pass) and rule methods (GuidedBackprop, Deconvolution, DeepLiftShap: hooks too), all submitted at once to models
    with two replicas, fused and split into passes of 37 rows: each equals Captum. (That passes overlap is shown
    with timed fakes above; here the first pass waits for a second of its model, which runs on the other replica.)"""
    for models, cases, oracle, make_job in (
        (MODELS, CASES, lambda case, b: captum_attribute(case, MODELS[case.model](), b), job_for),
        (layer_methods.LAYER_MODELS, layer_methods.CASES, layer_methods.captum_layer, layer_methods.job),
        (rule_methods.ALL_MODELS, rule_methods.CASES, rule_methods.captum_attribute, rule_methods.job_for),
    ):
        engine, log = _replica_engine(models)
        try:
            built = [c.build() for c in cases]
            jobs = [make_job(c, b) for c, b in zip(cases, built)]
            got = _all_at_once(engine, jobs, lambda: make_job(cases[0], built[0]))
            wants = [oracle(c, b) for c, b in zip(cases, built)]
            for i, result in enumerate(got):
                k = max(i - LEAD, 0)  # the copies are case 0's
                want, want_delta = wants[k]
                assert_all_close(result.attributions, want)
                if cases[k].delta:
                    assert_close(result.convergence_delta, want_delta)
            assert log.replicas == {0, 1}  # the first pass waited for a second of its model, on the other replica
            assert log.second.is_set()
        finally:
            engine.shutdown()


_GATE = {"entered": threading.Event(), "release": threading.Event()}  # not the module's: its replicas are deep copies


class _GatedNet(torch.nn.Module):
    """Two linear layers; an example whose first feature is -2 holds its forward after lin1 until _GATE's release (its
    LayerHook on lin1 installed meanwhile), one whose first feature is -1 raises SystemExit (the worker dies)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = torch.nn.Linear(4, 4)
        self.lin2 = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin1(x)
        if bool((x[:, 0] == -2).any()):
            _GATE["entered"].set()
            _GATE["release"].wait(30)
        if bool((x[:, 0] == -1).any()):
            raise SystemExit("injected: model code called sys.exit")
        return self.lin2(h)


def test_after_a_crash_no_pass_runs_on_a_replica_whose_old_pass_still_holds_its_layer_hook() -> None:
    """A layer method's pass holds its hook on replica 1 while a request kills the worker on replica 0. The restarted
    workers gave replica 1 to the next request, whose forward then ran the old pass's hook: "layer ... runs more than
    once per forward" (a substitution pass's values would have been silently used). Now the next requests run on
    replica 0 until that pass returns, with Captum's numbers, and both replicas serve again after it."""
    from captum.attr import LayerActivation, Saliency

    _GATE["entered"].clear()
    _GATE["release"].clear()
    torch.manual_seed(0)
    net = _GatedNet().eval()
    engine = Engine(EngineLimits(default_max_batch_rows=8, default_max_queue_delay_us=0, probe_batch_rows=False, default_device="cpu"))
    x = torch.randn(2, 4)
    held, killer = x.clone(), x.clone()
    held[:, 0], killer[:, 0] = -2, -1

    def saliency(inputs: torch.Tensor) -> torch.Tensor:
        return engine.submit(AttributionJob(model="m", algorithm="saliency", inputs=(inputs,), target=0)).result(10).attributions[0]

    def activation(inputs: torch.Tensor) -> torch.Tensor:
        return (
            engine.submit(AttributionJob(model="m", algorithm="layer_activation", inputs=(inputs,), layer="lin1"))
            .result(10)
            .attributions[0]
        )

    try:
        engine.load(ModelSpec(name="m", module=net, instances=2))
        want_saliency = Saliency(net).attribute(x.clone().requires_grad_(), target=0, abs=True)
        want_activation = LayerActivation(net, net.lin1).attribute(x)
        old = engine.submit(AttributionJob(model="m", algorithm="layer_activation", inputs=(held,), layer="lin1"))
        assert _GATE["entered"].wait(10)
        with pytest.raises(Unavailable, match="SystemExit"):
            saliency(killer)
        with pytest.raises(Unavailable, match="SystemExit"):
            old.result(10)
        deadline = time.monotonic() + 10
        while not engine.serving()[0]:
            assert time.monotonic() < deadline, "the worker was not restarted"
            time.sleep(0.01)
        for _ in range(3):  # the old pass still runs, its hook on lin1
            assert_close(saliency(x), want_saliency)
            assert_close(activation(x), want_activation)
        _GATE["release"].set()
        for _ in range(3):
            assert_close(saliency(x), want_saliency)
            assert_close(activation(x), want_activation)
        assert engine.serving() == (True, "")
    finally:
        _GATE["release"].set()
        engine.shutdown(drain=False, timeout=5)
