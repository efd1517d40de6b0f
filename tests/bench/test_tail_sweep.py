"""bench/prototypes/tail_sweep.py at a tiny size: it drives bench/run.py's server runner (whose interface it borrows) for
each configuration, errors none, and prints one row each with p99/p50 judged against the target. No
timing assertions: met or MISSED are both a result."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tail_sweep_prints_each_configuration_at_a_concurrency() -> None:
    # One concurrency: every (callers, configuration) is a fresh server of ~10 s here; run.py's sweep test covers several.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "prototypes" / "tail_sweep.py"), "--smoke", "--callers", "2", "--seconds", "0.5"]
        + ["--warmup-seconds", "0.2", "--rounds", "1", "--config", "a=", "--config", "b=--max-queue-delay-us=100 env:ATTRSERVE_X=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert proc.stderr.count(", 0 errors") == 2, proc.stderr  # every run answered every request
    for name in ("a", "b"):
        row = rf"^\| 2 \| {name} \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| (met|MISSED) \|$"
        assert re.search(row, proc.stdout, re.M), (name, proc.stdout)
