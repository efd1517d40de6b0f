"""The online pass-size tuner (engine/attrserve_engine/tuning.py) fed simulated served passes: per-pass rows/s from a
curve of rate by size, times 1 ± uniform noise. Prints, per noise level and rule, the mean rate of the second half's
passes (trials included) as a share of the best size's rate, over 3 starts × `--seeds` seeds.

    .venv/bin/python bench/prototypes/tuner_sim.py                 # the table in bench/RESULTS.md step 15
    .venv/bin/python bench/prototypes/tuner_sim.py --margin 0.04 --trial-passes 32

Rules: "new" is the tuner as built (with --margin / --trial-passes overriding MOVE_MARGIN / TRIAL_PASSES); "old" is
its rule before c772a9d: 8 passes a trial, and pick_batch_rows' tolerance (a bigger size must be 1/0.9 faster, a
smaller one may be 10% slower). No server, no timing: pure Python, a few seconds.
"""

from __future__ import annotations

import argparse
import random
import statistics

from attrserve_engine import tuning
from attrserve_engine.tuning import GOOD_ENOUGH, PassSizeTuner

CURVES = {  # rows/s by pass size
    "peaked (best 64)": {8: 1000, 16: 1800, 32: 2500, 64: 3000, 128: 2800, 256: 2400, 512: 1500, 1024: 1200, 2048: 900},
    "sloped (best 256, 128 within 10%)": {8: 800, 16: 1400, 32: 2000, 64: 2500, 128: 2800, 256: 3000, 512: 2600, 1024: 2000, 2048: 1500},
    "flat (32-512 within 5%)": {8: 1000, 16: 2000, 32: 2900, 64: 3000, 128: 3050, 256: 3000, 512: 2900, 1024: 2500, 2048: 2000},
    "W2-like (128 9% over 64)": {8: 1000, 16: 1800, 32: 2300, 64: 2750, 128: 3000, 256: 2700, 512: 2000, 1024: 1500, 2048: 1000},
}


class OldRule(PassSizeTuner):
    def takes(self, here: float, there: float) -> bool:
        return there * GOOD_ENOUGH >= here if self.candidate is not None and self.candidate > self.size else there >= GOOD_ENOUGH * here


def share_of_best(tuner: PassSizeTuner, curve: dict[int, int], noise: float, seed: int, passes: int) -> float:
    rng = random.Random(seed)
    late = []
    for i in range(passes):
        size = tuner.take()
        tuner.observe(size, True, size, size / (curve[size] * (1 + rng.uniform(-noise, noise))))
        if i >= passes // 2:
            late.append(curve[size])
    return statistics.mean(late) / max(curve.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--noise", default="0,0.05,0.25,0.4", help="comma-separated per-pass noise levels (0.25: ±25%%)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--passes", type=int, default=20_000)
    p.add_argument("--margin", type=float, default=tuning.MOVE_MARGIN)
    p.add_argument("--trial-passes", type=int, default=tuning.TRIAL_PASSES)
    a = p.parse_args()
    print("| noise per pass | rule | " + " | ".join(CURVES) + " |")
    print("|---|---|" + "---:|" * len(CURVES))
    for noise in (float(n) for n in a.noise.split(",")):
        for rule, cls, trial_passes, margin in (("old", OldRule, 8, None), ("new", PassSizeTuner, a.trial_passes, a.margin)):
            tuning.TRIAL_PASSES = trial_passes
            if margin is not None:
                tuning.MOVE_MARGIN = margin
            cells = []
            for curve in CURVES.values():
                shares = [share_of_best(cls(start), curve, noise, seed, a.passes) for start in (16, 64, 512) for seed in range(a.seeds)]
                cells.append(f"{statistics.mean(shares):.3f} (min {min(shares):.3f})")
            print(f"| ±{noise:.0%} | {rule} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
