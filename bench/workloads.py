"""The benchmark workloads (W1-W6): model, algorithm, parameters, concurrency, inputs and row counts.

Shared by run.py (load client, B1, L) and baseline_server.py (B2 loads the same models).
Everything here is deterministic: models seed their own RNG, inputs come from numpy's
default_rng with a fixed seed.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
MODELS = BENCH / "models"
SMOKE_MODELS = BENCH / "models_smoke"
GPU_MODELS = BENCH / "gpu_models"

# Distinct example inputs per workload; requests cycle through them (target = class i % classes).
N_DISTINCT_INPUTS = 16


@dataclass(frozen=True)
class Workload:
    key: str  # "W1"
    title: str
    model: str  # folder under bench/models = attrserve model name
    algorithm: str  # attrserve / client snake_case name
    params: dict[str, Any]
    example_shape: tuple[int, ...]  # one example (without dim 0)
    dtype: str  # numpy dtype of the input
    classes: int
    concurrency: int
    layer: str | None = None
    baselines: Any = None  # None: zeros (Captum's default)
    vocab: int = 0  # token ids drawn from [1, vocab) when the input is int64
    limit: bool = True  # whether L (the fused in-process limit) is defined for this workload
    kind: str = "throughput"  # "throughput" or "latency" (what its target is about)
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    # -- rows: what one request costs in model rows ----------------------------------------
    def gradient_rows(self) -> int:
        """Rows of forward+backward one request needs."""
        if self.algorithm in ("integrated_gradients", "layer_integrated_gradients"):
            return int(self.params.get("n_steps", 50))
        if self.algorithm == "saliency":
            return 1
        return 0

    def forward_rows(self) -> int:
        """Rows of forward-only work one request needs."""
        if self.algorithm == "layer_integrated_gradients":
            return 2  # the layer's activations for the input and for the baseline
        if self.algorithm == "occlusion":
            windows = 1
            for size, win, stride in zip(self.example_shape, self.params["sliding_window_shapes"], self.params["strides"]):
                windows *= (size - win) // stride + 1
            return windows + 1  # every occluded copy + the unoccluded input
        return 0

    def rows(self) -> int:
        return self.gradient_rows() + self.forward_rows()

    # -- inputs ---------------------------------------------------------------------------
    def inputs(self, n: int = N_DISTINCT_INPUTS, seed: int = 0) -> list[np.ndarray]:
        """n single-example inputs, shape (1, *example_shape)."""
        rng = np.random.default_rng(seed + int(self.key[1:]))
        out = []
        for _ in range(n):
            if self.dtype == "int64":
                out.append(rng.integers(1, self.vocab, (1, *self.example_shape), dtype=np.int64))
            elif len(self.example_shape) == 1:
                out.append(rng.standard_normal((1, *self.example_shape)).astype(np.float32))
            else:
                out.append(rng.uniform(0.0, 1.0, (1, *self.example_shape)).astype(np.float32))
        return out

    def targets(self, n: int = N_DISTINCT_INPUTS) -> list[int]:
        return [i % self.classes for i in range(n)]

    def requests(self, n: int = N_DISTINCT_INPUTS) -> list:
        """The wire requests the load client cycles through (built once; sending costs no encoding)."""
        from attrserve_client import build_request

        return [
            build_request(
                self.model,
                self.algorithm,
                x,
                baselines=self.baselines,
                target=t,
                layer=self.layer,
                params=self.params,
                request_id=f"{self.key}-{i}",
            )
            for i, (x, t) in enumerate(zip(self.inputs(n), self.targets(n)))
        ]

    def payload_bytes(self) -> int:
        return math.prod(self.example_shape) * np.dtype(self.dtype).itemsize


def all_workloads(smoke: bool = False) -> dict[str, Workload]:
    """W1-W6 as the issue defines them; smoke: the same workloads on bench/models_smoke's tiny models,
    n_steps 4 and at most 4 callers."""
    n_steps = 4 if smoke else 50
    image = (3, 8, 8) if smoke else (3, 32, 32)
    features = (16,) if smoke else (64,)
    tokens, vocab = ((8,), 50) if smoke else ((32,), 1000)
    big = (3, 32, 32) if smoke else (3, 224, 224)
    ws = [
        Workload(
            "W1",
            "tabular: MLP 64-128-128-2, IntegratedGradients n_steps=50",
            "bench_mlp",
            "integrated_gradients",
            {"n_steps": n_steps},
            features,
            "float32",
            2,
            32,
        ),
        Workload(
            "W2",
            "image: CNN on 3x32x32, IntegratedGradients n_steps=50",
            "bench_cnn",
            "integrated_gradients",
            {"n_steps": n_steps},
            image,
            "float32",
            10,
            32,
        ),
        Workload(
            "W3",
            "text: embedding + 2-layer transformer on 32 tokens, LayerIntegratedGradients(embedding) n_steps=50",
            "bench_text",
            "layer_integrated_gradients",
            {"n_steps": n_steps},
            tokens,
            "int64",
            2,
            32,
            layer="embedding",
            baselines=0,
            vocab=vocab,
        ),
        Workload(
            "W4",
            "perturbation: Occlusion window 3x4x4 stride 3x4x4 on the W2 CNN",
            "bench_cnn",
            "occlusion",
            {"sliding_window_shapes": (3, 4, 4), "strides": (3, 4, 4)},
            image,
            "float32",
            10,
            32,
        ),
        Workload(
            "W5",
            "latency: Saliency on the W2 CNN, 1 caller",
            "bench_cnn",
            "saliency",
            {},
            image,
            "float32",
            10,
            1,
            limit=False,
            kind="latency",
        ),
        Workload(
            "W6",
            "payload: Saliency on 3x224x224, 4 callers",
            "bench_cnn224",
            "saliency",
            {},
            big,
            "float32",
            10,
            4,
            limit=False,
            kind="latency",
        ),
    ]
    if smoke:
        ws = [replace(w, concurrency=min(w.concurrency, 4)) for w in ws]
    return {w.key: w for w in ws}


def gpu_workloads(smoke: bool = False) -> dict[str, Workload]:
    """The GPU check's workload: W2 with a ResNet-18-sized model (bench/gpu_models), 64 callers.
    smoke (a dry run of the plumbing, e.g. on a CPU): n_steps 2 and 2 callers."""
    w = Workload(
        "G2",
        "GPU: ResNet-18 on 3x224x224, IntegratedGradients n_steps=50, 64 callers",
        "bench_resnet18",
        "integrated_gradients",
        {"n_steps": 2 if smoke else 50},
        (3, 224, 224),
        "float32",
        1000,
        2 if smoke else 64,
        limit=False,
    )
    return {w.key: w}


def repository(smoke: bool = False, gpu: bool = False) -> Path:
    """The model repository attrserve and B2 serve: bench/models, bench/models_smoke for --smoke, bench/gpu_models for --gpu."""
    return GPU_MODELS if gpu else SMOKE_MODELS if smoke else MODELS


def build_model(name: str, repo: Path = MODELS):
    """<repo>/<name>/model.py's build_model(), imported as attrserve imports it (a module name unique per file)."""
    source = Path(repo) / name / "model.py"
    module_name = f"bench_model_{Path(repo).name}_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, source)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name].build_model()


def model_names(repo: Path = MODELS) -> list[str]:
    return sorted(p.name for p in Path(repo).iterdir() if (p / "model.py").exists())
