"""Smoke-test size of bench/models/bench_mlp (same class, tiny sizes): MLP 16-32-32-2."""

import importlib.util
from pathlib import Path

_FULL = Path(__file__).resolve().parents[2] / "models" / "bench_mlp" / "model.py"
_spec = importlib.util.spec_from_file_location("bench_full_bench_mlp", _FULL)
_full = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_full)


def build_model():
    return _full.build_model(in_features=16, hidden=32)
