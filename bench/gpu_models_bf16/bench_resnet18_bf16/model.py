"""The same ResNet-18 (and weights) as bench/gpu_models/bench_resnet18, served with `precision: "bfloat16"` in config.pbtxt."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "bench_resnet18_fp32_source", Path(__file__).resolve().parents[2] / "gpu_models" / "bench_resnet18" / "model.py"
)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


def build_model():
    return _module.build_model()
