"""Smoke-test size of bench/models/bench_cnn224 (same class, tiny sizes): GAP CNN, served on 3x32x32."""

import importlib.util
from pathlib import Path

_FULL = Path(__file__).resolve().parents[2] / "models" / "bench_cnn224" / "model.py"
_spec = importlib.util.spec_from_file_location("bench_full_bench_cnn224", _FULL)
_full = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_full)


def build_model():
    return _full.build_model(c1=4, c2=8)
