"""Smoke-test size of bench/models/bench_text (same class, tiny sizes): transformer on 8 tokens of a 50-word vocabulary."""

import importlib.util
from pathlib import Path

_FULL = Path(__file__).resolve().parents[2] / "models" / "bench_text" / "model.py"
_spec = importlib.util.spec_from_file_location("bench_full_bench_text", _FULL)
_full = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_full)


def build_model():
    return _full.build_model(vocab=50, d_model=16, heads=2)
