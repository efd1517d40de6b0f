"""bench/prototypes/hops.py at a tiny size: its marks follow the code (a wrapped function that moved would leave a
process without marks, and the tool stops), every step of one caller's requests is found, and the server it started
is stopped. No timing assertions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_hops_finds_every_step_of_one_callers_requests() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "prototypes" / "hops.py"), "--seconds", "1.5", "--warmup", "0.5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    head = re.search(r"one caller: (\d+) answers in \d+ s, (\d+) whole chains", proc.stdout)
    assert head is not None, proc.stdout
    answers, chains = int(head.group(1)), int(head.group(2))
    assert answers > 0 and 0.9 * answers <= chains <= answers  # a chain only misses at the window's edges
    sys.path.insert(0, str(ROOT / "bench" / "prototypes"))
    from hops import STEPS

    for before, after in zip(STEPS, STEPS[1:]):
        assert re.search(rf"^\| {re.escape(before)} \| {re.escape(after)} \| \d+ \| \d+ \|$", proc.stdout, re.M), (before, after)
    assert re.search(r"^\| \*\*client: sends\*\* \| \*\*client: has the answer\*\* \| \*\*\d+\*\* \|", proc.stdout, re.M)
