"""Batch-size probe: measure a model's rows per second at a few pass sizes at load and pick max_batch_rows. Also the
layout of its passes (choose_memory_format), and the pass size tuned online on served traffic (PassSizeTuner).

Bigger passes are not always faster (docs/ARCHITECTURE.md, "Pass size": a small CNN on a 2-core CPU peaks
at 100–200 rows and is 3× slower at 1,600), so the size is measured per model
and device, not guessed.
"""

from __future__ import annotations

import collections
import logging
import math
import statistics
import time
from collections.abc import Callable

import torch

from attrserve_engine.errors import AttributionError, InvalidArgument
from attrserve_engine.executor import run_pass
from attrserve_engine.models import LoadedModel
from attrserve_engine.plan import Block, BlockResult, PassKind

log = logging.getLogger(__name__)

SIZES = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# Pick the smallest size within this share of the best throughput: same work, shorter waits.
GOOD_ENOUGH = 0.9
# Timed runs per size after a warm-up run; the fastest counts (noise only ever slows a run down).
RUNS = 4
# The probe stops past the peak only after this many sizes in a row fall under 70% of the best: one slow
# measurement (another process woke up) must not end it early.
DIPS = 2
# Then the sizes near the best are timed again, in turns, this many rounds: on a plateau (a CNN gains little from
# 256 to 1,024 rows) one noisy sweep would otherwise pick a different size on every start.
CONFIRM_ROUNDS = 3


def probe_key(model: LoadedModel) -> tuple | None:
    """What a model's load-time probe (its rows per second by pass size, probe_batch_rows) depends on, as a key: its
    files (ModelSpec.fingerprint, which covers its config), name, version, device, intra-op threads and replicas. An
    engine that loads the same key again (a restarted engine process, a reload of unchanged files) takes what it kept
    (Engine.probes) instead of timing passes again: the same machine and the same model give the same answers, within
    the noise the tuner works in anyway, and the pass size does not flip between restarts. None when the files are
    unknown (a module built in code)."""
    if not model.spec.fingerprint:
        return None
    return (model.name, model.version, model.spec.fingerprint, str(model.device), model.intra_op_threads, model.instances)


def first_float_layer(model: LoadedModel, example: tuple[torch.Tensor, ...]) -> str:
    """The first module, in the order a forward calls them, whose output is a floating tensor: for a model of token ids
    its embedding, the layer its gradient methods (LayerIntegratedGradients, ...) take gradients at. "" when there is
    none or hooks cannot see the modules (TorchScript, exported programs)."""
    if model.is_exported or isinstance(model.module, torch.jit.ScriptModule):
        return ""
    names = {m: name for name, m in model.module.named_modules() if name}
    found: list[str] = []

    def seen(module: torch.nn.Module, args: object, output: object) -> None:
        if not found and isinstance(output, torch.Tensor) and output.is_floating_point():
            found.append(names[module])

    model.hooked_forward([(m, seen) for m in names], example)
    return found[0] if found else ""


def _probe_block(inputs: tuple[torch.Tensor, ...], k: int, gradient: bool, layer: str) -> Block:
    """One probe pass of `inputs`' rows, all at target 0: gradients (w.r.t. `layer` when set) or a forward pass."""
    rows, device = inputs[0].shape[0], inputs[0].device
    return Block(
        kind=PassKind.GRADIENT if gradient else PassKind.FORWARD,
        inputs=inputs,
        args=(),
        target=torch.zeros((rows, k), dtype=torch.int64, device=device),
        layer=layer,
        grad_wrt_layer=bool(layer),
    )


def _probe_inputs(model: LoadedModel, example: tuple[torch.Tensor, ...], rows: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """`rows` rows of each example input on the model's device: random floats, or the integer example repeated."""
    return tuple(
        (
            torch.randn((rows, *x.shape[1:]), generator=g, dtype=x.dtype) if x.is_floating_point() else x.expand(rows, *x.shape[1:]).clone()
        ).to(model.device)
        for x in example
    )


def probe_batch_rows(model: LoadedModel, budget_s: float = 1.5) -> dict[int, float] | None:
    """Rows per second of a gradient pass at each size (for integer inputs, gradients at the first floating layer, as
    layer methods take them; forward passes where hooks cannot see one); None if it cannot run."""
    example = model.example_inputs()
    if example is None or model.output_shape is None:
        return None
    k = len(model.output_shape) if math.prod(model.output_shape) > 1 else 0
    float_inputs = all(x.is_floating_point() for x in example)
    layer = "" if float_inputs else first_float_layer(model, example)
    if layer:  # a layer the gradient pass refuses (it runs twice per forward, ...): forward passes, as for TorchScript
        one = _probe_block(tuple(x.to(model.device) for x in example), k, True, layer)
        if isinstance(run_pass(model, [one])[0], AttributionError):
            layer = ""
    g = torch.Generator().manual_seed(0)
    measured: dict[int, float] = {}
    blocks: dict[int, Block] = {}
    spent = 0.0
    dips = 0

    def timed(size: int) -> float | AttributionError:
        start = time.perf_counter()
        outcome = run_pass(model, [blocks[size]])[0]  # returns once the device has finished it
        return outcome if isinstance(outcome, AttributionError) else time.perf_counter() - start

    for size in SIZES:
        blocks[size] = _probe_block(_probe_inputs(model, example, size, g), k, float_inputs or bool(layer), layer)
        times = []
        for _ in range(1 + RUNS):  # the first run warms the kernels for this shape
            took = timed(size)
            if isinstance(took, AttributionError):
                log.info("batch probe for %s stopped at %d rows: %s", model.name, size, took)
                del blocks[size]
                return _confirmed(measured, blocks, timed, budget_s) if measured else None
            times.append(took)
        measured[size] = size / min(times[1:])
        spent += sum(times)
        best = max(measured.values())
        dips = dips + 1 if measured[size] < 0.7 * best else 0
        if spent > budget_s or dips >= DIPS:  # out of time, or well past the peak
            break
    return _confirmed(measured, blocks, timed, budget_s)


def _confirmed(
    measured: dict[int, float], blocks: dict[int, Block], timed: Callable[[int], float | AttributionError], budget_s: float
) -> dict[int, float]:
    """Time the sizes within reach of the best again, in turns (CONFIRM_ROUNDS, within another `budget_s`), keeping
    each size's fastest run: the choice then rests on each size's best, not on one sweep's luck."""
    spent = 0.0
    for _ in range(CONFIRM_ROUNDS):
        best = max(measured.values())
        for size in [s for s, rate in measured.items() if rate >= 0.75 * best]:
            took = timed(size)
            if isinstance(took, AttributionError):
                return measured
            measured[size] = max(measured[size], size / took)
            spent += took
            if spent > budget_s:
                return measured
    return measured


def near_best(measured: dict[int, float]) -> list[int]:
    """The sizes the probe measured within GOOD_ENOUGH of its best rate."""
    best = max(measured.values())
    return [size for size, rate in measured.items() if rate >= GOOD_ENOUGH * best]


def pick_batch_rows(measured: dict[int, float]) -> int:
    return min(near_best(measured))


def tuning_start(measured: dict[int, float]) -> int:
    """The size the online tuner (PassSizeTuner) starts a probed model's passes at: the largest the probe found within
    GOOD_ENOUGH of its best. The probe cannot tell those sizes apart on a quiet device, and the full passes that the
    tuner reads carry work elsewhere per pass that favours the bigger (PHASE_PASSES). From the smallest
    (`pick_batch_rows`, still the model's max_batch_rows) a fresh server climbed a doubling a trial and bench W2 spent
    its first seconds at 16-64 rows (bench/RESULTS.md, issue 12 step 21). A queue is cut when it fills or after
    max_queue_delay (0.5 ms by default), so on a lightly loaded model a bigger size adds at most that wait."""
    return max(near_best(measured))


# -- the layout of a model's passes ----------------------------------------------------------------------------------
# channels_last forward passes must be at least this much faster to be taken where the config leaves the choice to the
# load ("auto"): the layouts' run-to-run spread must not flip it between starts.
LAYOUT_GAIN = 1.1
# Rows of the passes that compare the layouts; the passes of a model that is slow at that size are timed fewer times.
LAYOUT_ROWS = 8
LAYOUT_QUICK_S = 0.1
# The largest difference channels_last may make to those passes' gradients (or outputs), relative to their largest
# value: float32 rounding (convolutions sum in another order), well inside what equals Captum (1e-5).
LAYOUT_RTOL = 1e-5


def _has_conv2d(module: torch.nn.Module) -> bool:
    """Whether a 2-D convolution is among the modules (a scripted one keeps its class name in original_name)."""
    return any(isinstance(m, torch.nn.Conv2d) or getattr(m, "original_name", "") == "Conv2d" for m in module.modules())


def _set_layout(model: LoadedModel, forward: bool, on: bool) -> None:
    if forward:
        model.forward_channels_last = on  # its inputs alone: a convolution runs channels_last when its input is
    else:
        model.lay_out(on)


def choose_memory_format(model: LoadedModel) -> str:
    """Lay the model's passes out as its spec's memory_format says, and return how and why (for the load's log).

    Gradient passes run PyTorch's default (contiguous) layout, the one Captum runs in, unless the config opts in to
    "channels_last": a gradient through a max-pool or a ReLU jumps where the layout's rounding moves which value wins,
    and interpolated inputs (IntegratedGradients) cross such points, so only the contiguous layout's gradients are
    Captum's on every input (docs/ARCHITECTURE.md, "Pass layout"). A forward pass's outputs move by rounding alone.

    - "contiguous": every pass contiguous.
    - "" / "auto" (the default): forward passes channels_last ("channels_last_forward") where that can pay and holds:
      a model with 2-D convolutions, a 4-D floating input and pinned shapes, whose 8-row forward pass runs in
      channels_last, gives the contiguous layout's outputs within LAYOUT_RTOL and is LAYOUT_GAIN times as fast.
    - "channels_last_forward": the same without the speed test; "channels_last": every pass, its weights too, checked
      on a gradient pass (a forward pass for integer inputs). Where the shapes are pinned, a model that fails the check
      does not load (InvalidArgument); with unpinned shapes either is taken on trust."""
    choice = model.spec.memory_format or "auto"
    if choice == "contiguous":
        return "contiguous (config)"
    forced, forward = choice != "auto", choice != "channels_last"
    name = "channels_last_forward" if forward else "channels_last"
    example = model.example_inputs()
    if example is None or model.output_shape is None:
        if forced:
            _set_layout(model, forward, True)
            return f"{name} (config; the inputs' shapes are not pinned, so it was not tried at load)"
        return "contiguous"
    if not forced and not (_has_conv2d(model.module) and any(x.dim() == 4 and x.is_floating_point() for x in example)):
        return "contiguous"
    inputs = _probe_inputs(model, example, LAYOUT_ROWS, torch.Generator().manual_seed(0))
    k = len(model.output_shape) if math.prod(model.output_shape) > 1 else 0
    gradient = not forward and all(x.is_floating_point() for x in example)
    block = _probe_block(inputs, k, gradient, "")

    def run(on: bool, times: int) -> tuple[float, torch.Tensor] | AttributionError:
        _set_layout(model, forward, on)
        best, outcome = math.inf, None
        for _ in range(times):
            start = time.perf_counter()
            outcome = run_pass(model, [block])[0]
            if isinstance(outcome, AttributionError):
                return outcome
            best = min(best, time.perf_counter() - start)
        assert isinstance(outcome, BlockResult)  # times >= 1, and a failed pass returned above
        got = outcome.grads[0] if gradient and outcome.grads else outcome.outputs
        return best, got.detach().contiguous()

    first = run(False, 1)
    if isinstance(first, AttributionError):  # the model's own failure, which the probe and warm-ups report
        _set_layout(model, forward, forced)
        return f"{name} (config; not tried: the model's pass fails)" if forced else "contiguous"
    times = 2 if first[0] < LAYOUT_QUICK_S else 1
    contiguous, channels_last = run(False, times), run(True, 1 + times)  # channels_last's first run warms its kernels
    if isinstance(channels_last, AttributionError):
        why = f"its forward fails in channels_last: {channels_last}"
    elif isinstance(contiguous, AttributionError):
        why = f"its pass failed in the contiguous layout: {contiguous}"
    else:
        (t_contiguous, want), (t_last, got) = contiguous, channels_last
        speed = f"{t_contiguous / t_last:.2f}x the contiguous layout's speed at {LAYOUT_ROWS} rows"
        differs = float((got - want).abs().max()) if got.shape == want.shape else math.inf
        if not differs <= LAYOUT_RTOL * float(want.abs().max()):
            why = f"channels_last changes the pass's numbers by {differs:.3g} (largest {float(want.abs().max()):.3g})"
        elif forced:
            return f"{name} (config; {speed})"
        elif t_contiguous >= LAYOUT_GAIN * t_last:
            return f"{name} ({speed})"
        else:
            why = f"channels_last forward passes ran at {speed}, under {LAYOUT_GAIN}x"
    _set_layout(model, forward, False)
    if forced:
        raise InvalidArgument(f"model {model.name!r}: memory_format {name}: {why}; use contiguous or auto")
    return f"contiguous ({why})"


# -- online: the pass size tuned on real traffic ---------------------------------------------------------------------
# The probe times one kind of pass on a quiet device at load; served passes run other kinds (Occlusion's forwards,
# LayerIntegratedGradients' layer gradients) next to the front end and the callers, and their best size differs (bench
# W2's CNN: the probe picked 16 or 32 rows, its IntegratedGradients passes ran best at 256). So the scheduler keeps one
# PassSizeTuner per (model, pass kind) whose size the probe chose, and lets it move that size on the passes it serves.
# Full passes of the size (FIRST_TRIAL_AFTER of them) before its first trial; every trial that keeps the size doubles
# the wait, up to MOST_BETWEEN_TRIALS, so a settled size spends ~4% of its passes on trials.
FIRST_TRIAL_AFTER = 16
MOST_BETWEEN_TRIALS = 512
# Full passes of each of the two sizes a trial compares.
TRIAL_PASSES = 24
# A trial cuts its two sizes in phases of this many passes, in turns (the neighbour first), so both see the same load
# and the same phase of the machine, yet each size's passes run beside the work that passes of that size cause
# elsewhere. The front end's frames and wake-ups for the answers a pass completes, and the callers' next requests, run
# on the same cores as the passes running then, and there are more of them per row with smaller passes. Cut one by one
# in turns, both sizes ran beside the same mix and shared that cost: bench W2's 128- and 256-row passes ran within 3%
# of each other in every trial, so the size stayed at 128, where 512 pinned served more. In phases of 6, two starts'
# trials found 256 rows 6-9% faster than 128, and 512 ~8% faster than 256 (bench/RESULTS.md, issue 12 step 21).
PHASE_PASSES = 6
# The neighbour is taken when its median rows/s beats the size's by more than the noise allows (`PassSizeTuner.margin`):
# one standard error of the difference of the two medians, from the spread of the passes' rows/s (smoothed over
# trials), and at least MIN_MARGIN; in either direction. Full passes mean a queue is waiting, so the fastest size also
# answers soonest: pick_batch_rows' tolerance (the smallest size within 10% of the best), which this tuner used to
# follow, held bench W2 at 64 rows where 128 served 9% more (bench/RESULTS.md step 15). A fixed 6% margin then fitted
# the CPU's noise (bench W2's passes vary by +-25%, where the estimate gives ~6.7%), but on an H200, whose passes vary
# by ~1%, ResNet-18 gains ~2-3% a doubling from 256 to 2048 rows and a fixed 6% never moved: 75.5 req/s at 256 rows
# against 79.9 pinned at 2048 (step 16). 24 passes and the rule were chosen by simulating served passes
# (bench/prototypes/tuner_sim.py).
MIN_MARGIN = 0.015
# The weight of a trial's spread in the smoothed one the margin uses (the noise is the deployment's, and changes slowly).
SPREAD_WEIGHT = 0.25
# A trial ends (the size stays) after this many passes that were not full: the queue cannot fill the candidate.
TRIAL_MISSES = 2 * TRIAL_PASSES
# Moves a tuner remembers (the tests read them; the last one tells a move back to the size just left).
MOVES_KEPT = 64


def spread(rates: list[float]) -> float:
    """The spread of passes' rows/s relative to their median: 1.4826 x the median absolute deviation, a standard
    deviation that a slow pass now and then does not inflate."""
    middle = statistics.median(rates)
    return 1.4826 * statistics.median(abs(r - middle) for r in rates) / middle


class PassSizeTuner:
    """Rows per pass for one model's passes of one kind, tuned on the passes it serves: a hill climb over SIZES that,
    from time to time, cuts full passes of the size and of a neighbour (twice or half as big), in phases of
    PHASE_PASSES each in turns, and moves to the neighbour when it is faster by more than its passes' noise allows
    (`margin`). The rule is the same both ways, so on a plateau it stays where it is (a move there is noise, and a move
    back backs off like a kept size). Only full passes count: a pass that is short because the queue held fewer rows
    says nothing about its size, and with a queue waiting the fastest size is also the one that answers soonest.

    Not thread-safe: the scheduler calls it under its state lock."""

    def __init__(self, size: int, label: str = "") -> None:
        self.size = size
        self.label = label  # for the log: whose passes
        self._wait = FIRST_TRIAL_AFTER
        self._full = 0  # full passes of `size` since the last trial
        self._up = True  # the direction of the next trial
        self.candidate: int | None = None  # the neighbour on trial
        self._cuts = 0  # passes cut in this trial
        self._rates: dict[int, list[float]] = {}  # rows/s of each size's full passes in this trial
        self._misses = 0
        # (from, to, rate there, rate here) of the latest moves: on a plateau it still moves now and then, for as long
        # as the server runs, so only the last MOVES_KEPT are kept (the last one tells a move back).
        self.moves: collections.deque[tuple[int, int, float, float]] = collections.deque(maxlen=MOVES_KEPT)
        # The spread of its passes' rows/s (`spread`), smoothed over trials: one trial's 24 passes estimate it loosely.
        self.spread: float | None = None

    def peek(self) -> int:
        """The size the next pass is cut to (a queue holding this many rows is ripe)."""
        if self.candidate is None:
            return self.size
        return (self.candidate, self.size)[self._cuts // PHASE_PASSES % 2]

    def take(self) -> int:
        """The size of a pass being cut now (during a trial, the two sizes' phases in turns)."""
        size = self.peek()
        if self.candidate is not None:
            self._cuts += 1
        return size

    def observe(self, size: int, full: bool, rows: int, seconds: float) -> None:
        """A pass cut to `size` (take's answer) ran `rows` rows in `seconds`; `full`: it had all the rows it was cut to."""
        if self.candidate is None:
            if size != self.size or not full or seconds <= 0:
                return
            self._full += 1
            if self._full >= self._wait:
                self._start_trial()
            return
        if size not in (self.size, self.candidate):
            return  # cut before this trial began
        if not full or seconds <= 0:
            self._misses += 1
            if self._misses >= TRIAL_MISSES:
                self._end_trial(moved=False)
            return
        self._rates.setdefault(size, []).append(rows / seconds)
        if all(len(self._rates.get(s, ())) >= TRIAL_PASSES for s in (self.size, self.candidate)):
            here, there = statistics.median_high(self._rates[self.size]), statistics.median_high(self._rates[self.candidate])
            trial = math.sqrt((spread(self._rates[self.size]) ** 2 + spread(self._rates[self.candidate]) ** 2) / 2)
            self.spread = trial if self.spread is None else (1 - SPREAD_WEIGHT) * self.spread + SPREAD_WEIGHT * trial
            better = self.takes(self._rates[self.size], self._rates[self.candidate])
            back = bool(self.moves) and self.moves[-1][0] == self.candidate
            if better:
                self.moves.append((self.size, self.candidate, there, here))
                log.info(
                    "%s: %d rows per pass instead of %d (%.0f against %.0f rows/s on served passes)",
                    self.label,
                    self.candidate,
                    self.size,
                    there,
                    here,
                )
                self.size = self.candidate
            self._end_trial(moved=better and not back)

    def takes(self, here: list[float], there: list[float]) -> bool:
        """Whether a trial moves to the neighbour: the rows/s of its full passes `there` against the size's `here`."""
        return statistics.median_high(there) > statistics.median_high(here) * (1 + self.margin(len(here), len(there)))

    def margin(self, n_here: int, n_there: int) -> float:
        """How much faster the neighbour must look: one standard error of the difference of two medians of n_here and
        n_there passes (a median's is 1.2533 sigma / sqrt(n)) at the passes' spread, and at least MIN_MARGIN."""
        if self.spread is None:
            return MIN_MARGIN
        return max(MIN_MARGIN, 1.2533 * self.spread * math.sqrt(1 / n_here + 1 / n_there))

    def _start_trial(self) -> None:
        up, down = self.size * 2, self.size // 2
        options = [s for s in ((up, down) if self._up else (down, up)) if SIZES[0] <= s <= SIZES[-1]]
        if not options:
            self._full = 0
            return
        self.candidate = options[0]
        self._up = self.candidate > self.size
        self._cuts, self._rates, self._misses = 0, {}, 0

    def _end_trial(self, moved: bool) -> None:
        """`moved`: to a size it had not just left. Going back to the last one is noise on a plateau as much as a
        finding, so it backs off like a trial that kept the size: on a flat curve the size may still move now and
        then, but ever less often."""
        if moved:
            self._wait = FIRST_TRIAL_AFTER  # keep climbing the same way soon
        else:
            self._wait = min(2 * self._wait, MOST_BETWEEN_TRIALS)
            self._up = not self._up
        self.candidate, self._full = None, 0
