"""bench/prototypes/startup.py at a tiny size: B2 and attrserve start on bench/models_smoke, their first answers equal
Captum's (the tool checks them), and `--restarts` kills attrserve's engine process and measures its recovery in a new
one. No timing assertions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_startup_measures_a_start_and_a_restart_after_the_engine_process_is_killed() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "prototypes" / "startup.py"), "--rounds", "1", "--smoke-models", "--restarts", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    number = r"[\d.]+ \([\d.]+–[\d.]+\)"
    assert re.search(rf"^\| B2 \| {number} \| {number} \| {number} \| {number} \| — \| — \|$", proc.stdout, re.M), proc.stdout
    row = rf"^\| attrserve \| {number} \| {number} \| {number} \| {number} \| {number} \| {number} \|$"
    assert re.search(row, proc.stdout, re.M), proc.stdout
    assert re.search(r"^round 1, attrserve: ready [\d.]+ s, .*, restart [\d.]+ s$", proc.stderr, re.M), proc.stderr
