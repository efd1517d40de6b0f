"""Smoke-test size of bench/models/bench_cnn (same class, tiny sizes): CNN on 3x8x8."""

import importlib.util
from pathlib import Path

_FULL = Path(__file__).resolve().parents[2] / "models" / "bench_cnn" / "model.py"
_spec = importlib.util.spec_from_file_location("bench_full_bench_cnn", _FULL)
_full = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_full)


def build_model():
    return _full.build_model(hw=8, c1=4, c2=8, hidden=16)
