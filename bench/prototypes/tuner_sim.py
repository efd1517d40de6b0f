"""The online pass-size tuner (engine/attrserve_engine/tuning.py) fed simulated served passes: per-pass rows/s from a
curve of rate by size, times 1 ± uniform noise. Prints, per noise level and rule, the rows served per second (trials
included) as a share of the best size's, over the second half of the passes and over the first `--early` passes (a
bench run's first seconds), over 4 starts × `--seeds` seeds. `--overhead-rows` adds a cost to every pass that the
tuner does not see, in rows of the best rate. `--elsewhere-rows` is work the rest of the machine (the front end, the
callers) does for every pass that completes, on the passes' cores: it stretches whatever passes run then, by the
passes completed per second over the last 4, so the tuner sees it only in passes that run beside passes of their own
size (a trial's phases; cut one by one in turns, both sizes share it).

    .venv/bin/python bench/prototypes/tuner_sim.py                 # the table in bench/RESULTS.md step 20
    .venv/bin/python bench/prototypes/tuner_sim.py --min-margin 0.01 --trial-passes 32
    .venv/bin/python bench/prototypes/tuner_sim.py --noise 0.05,0.25 --elsewhere-rows 60   # step 21

Rules: "noise" is the tuner as built: the neighbour must beat the size by one standard error of the trial's medians,
at least MIN_MARGIN (--min-margin and --trial-passes override MIN_MARGIN and TRIAL_PASSES); "6%" its fixed margin of
step 15 (c772a9d); "old" its rule before c772a9d: 8 passes a trial, and pick_batch_rows' tolerance (a bigger size must
be 1/0.9 faster, a smaller one may be 10% slower); "up-ties" (step 20, not kept) takes a bigger neighbour unless it is
slower by the margin; "one by one" is the built rule with a trial's passes cut one by one in turns (PHASE_PASSES 1),
as before step 21 (the other rules cut them in phases). No server, no timing: pure Python, a few seconds.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics

from attrserve_engine import tuning
from attrserve_engine.tuning import GOOD_ENOUGH, PassSizeTuner

CURVES = {  # rows/s by pass size
    "peaked (best 64)": {8: 1000, 16: 1800, 32: 2500, 64: 3000, 128: 2800, 256: 2400, 512: 1500, 1024: 1200, 2048: 900},
    "sloped (best 256, 128 within 10%)": {8: 800, 16: 1400, 32: 2000, 64: 2500, 128: 2800, 256: 3000, 512: 2600, 1024: 2000, 2048: 1500},
    "flat (32-512 within 5%)": {8: 1000, 16: 2000, 32: 2900, 64: 3000, 128: 3050, 256: 3000, 512: 2900, 1024: 2500, 2048: 2000},
    "W2-like (128 9% over 64)": {8: 1000, 16: 1800, 32: 2300, 64: 2750, 128: 3000, 256: 2700, 512: 2000, 1024: 1500, 2048: 1000},
    # a pass's own rate flat from 128 to 1,024 rows (bench W2's CNN on one thread); with --elsewhere-rows, bigger serve more
    "plateau (128-1024 equal)": {8: 1000, 16: 1800, 32: 2400, 64: 2800, 128: 3000, 256: 3000, 512: 3000, 1024: 3000, 2048: 2600},
    # an H200's ResNet-18 IG (step 16): 2048 rows 5.8% over 256, a little more at each doubling
    "G2-like (+2% a doubling from 256)": {8: 400, 16: 800, 32: 1500, 64: 2300, 128: 2800, 256: 3000, 512: 3060, 1024: 3120, 2048: 3175},
}


class OldRule(PassSizeTuner):
    def takes(self, here: list[float], there: list[float]) -> bool:
        a, b = statistics.median_high(here), statistics.median_high(there)
        return b * GOOD_ENOUGH >= a if self.candidate is not None and self.candidate > self.size else b >= GOOD_ENOUGH * a


class UpTies(PassSizeTuner):
    """Tried in step 20, not kept: a bigger neighbour is taken unless slower by the margin."""

    def takes(self, here: list[float], there: list[float]) -> bool:
        a, b = statistics.median_high(here), statistics.median_high(there)
        if self.candidate is not None and self.candidate > self.size:
            return b >= a * (1 - self.margin(len(here), len(there)))
        return super().takes(here, there)


class FixedMargin(PassSizeTuner):
    def takes(self, here: list[float], there: list[float]) -> bool:
        return statistics.median_high(there) > statistics.median_high(here) * 1.06


def share_of_best(
    tuner: PassSizeTuner, curve: dict[int, int], noise: float, seed: int, passes: int, overhead: float, elsewhere: float, early: int
) -> tuple[float, float]:
    """The served rate as a share of the best size's, over the second half of `passes` and over the first `early`
    passes. A pass of `size` rows takes size / rate (times 1 ± noise), stretched by the share of the cores that the
    `elsewhere` seconds per completed pass take (over the last 4 passes): the tuner sees that time. `overhead` seconds
    a pass are a cost it does not see; the share counts the pass's own time (noise aside), the stretch and the overhead."""
    rng = random.Random(seed)
    late, first = [0, 0.0], [0, 0.0]
    recent: collections.deque[float] = collections.deque(maxlen=4)
    for i in range(passes):
        size = tuner.take()
        stretch = 1 / (1 - min(0.9, elsewhere * len(recent) / sum(recent))) if recent and elsewhere else 1.0
        seconds = stretch * size / (curve[size] * (1 + rng.uniform(-noise, noise)))
        recent.append(seconds)
        tuner.observe(size, True, size, seconds)
        for window, inside in ((late, i >= passes // 2), (first, i < early)):
            if inside:
                window[0] += size
                window[1] += stretch * size / curve[size] + overhead

    top = max(s / (s / r + overhead + elsewhere) for s, r in curve.items())
    return late[0] / late[1] / top, first[0] / first[1] / top


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noise", default="0,0.02,0.05,0.25,0.4", help="comma-separated per-pass noise levels (0.25: ±25%%)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--passes", type=int, default=20_000)
    p.add_argument("--min-margin", type=float, default=tuning.MIN_MARGIN)
    p.add_argument("--trial-passes", type=int, default=tuning.TRIAL_PASSES)
    p.add_argument("--overhead-rows", type=float, default=0.0, help="per-pass cost the tuner does not see, in rows of the best rate")
    p.add_argument("--elsewhere-rows", type=float, default=0.0, help="work elsewhere per completed pass, in rows of the best rate")
    p.add_argument("--early", type=int, default=600, help="passes in the early window (a bench run's first seconds)")
    a = p.parse_args()
    starts = (16, 64, 256, 512)
    phase = tuning.PHASE_PASSES
    print("each cell: share of the best in the second half / in the first --early passes (min over starts and seeds)\n")
    print("| noise per pass | rule | " + " | ".join(CURVES) + " |")
    print("|---|---|" + "---:|" * len(CURVES))
    for noise in (float(n) for n in a.noise.split(",")):
        rules = (  # (name, class, TRIAL_PASSES, PHASE_PASSES)
            ("old", OldRule, 8, phase),
            ("6%", FixedMargin, 24, phase),
            ("noise", PassSizeTuner, a.trial_passes, phase),
            ("up-ties", UpTies, a.trial_passes, phase),
            ("one by one", PassSizeTuner, a.trial_passes, 1),
        )
        for rule, cls, trial_passes, phase_passes in rules:
            tuning.TRIAL_PASSES, tuning.MIN_MARGIN, tuning.PHASE_PASSES = trial_passes, a.min_margin, phase_passes
            cells = []
            for curve in CURVES.values():
                overhead, elsewhere = a.overhead_rows / max(curve.values()), a.elsewhere_rows / max(curve.values())
                shares = [
                    share_of_best(cls(start), curve, noise, seed, a.passes, overhead, elsewhere, a.early)
                    for start in starts
                    for seed in range(a.seeds)
                ]
                late, first = [s[0] for s in shares], [s[1] for s in shares]
                cells.append(f"{statistics.mean(late):.3f} / {statistics.mean(first):.3f} (min {min(late):.3f} / {min(first):.3f})")
            print(f"| ±{noise:.0%} | {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
