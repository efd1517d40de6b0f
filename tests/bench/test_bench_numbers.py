"""The bench's six workloads at full size, on bench/models as configured (the layout and replicas the bench serves),
sent as the front sends them and fused in one engine, equal Captum called on each request alone.

bench/run.py checks the same against a running server, but only in a full table: its W2 check was what found that a
CNN laid out channels_last (then `auto`'s choice where it was faster) serves IntegratedGradients answers up to 1.8e-3
of the largest attribution away from Captum's (bench/RESULTS.md, issue 12 steps 29 and 30). The load-time check of 8
random rows never met such a point; these inputs do."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from attrserve_engine import Engine, EngineLimits
from attrserve_service import frames
from attrserve_service.convert import request_to_job
from attrserve_service.repository import load_repository

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from captum_calls import CHECK_TOLERANCE, error_of, run_captum  # noqa: E402
from workloads import MODELS, all_workloads, build_model  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

WORKLOADS = all_workloads()
REQUESTS = 16  # the bench's distinct requests: run.check_against_captum sends these at once


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))  # the pass size is not what is checked here
    for spec in load_repository(MODELS):
        e.load(spec)
    yield e
    e.shutdown()


@pytest.mark.parametrize("key", sorted(WORKLOADS))
def test_a_bench_workload_served_fused_equals_captum(engine: Engine, key: str) -> None:
    w = WORKLOADS[key]
    assert not engine.get_model(w.model).channels_last  # the default layout: the one Captum runs in
    futures = [engine.submit(frames.translate(request_to_job(r), tensors=True)) for r in w.requests(REQUESTS)]
    answers = [f.result(timeout=300) for f in futures]
    model = build_model(w.model)
    for i, (x, target, answer) in enumerate(zip(w.inputs(REQUESTS), w.targets(REQUESTS), answers)):
        want = run_captum(model, w.algorithm, torch.from_numpy(x), target=target, baselines=w.baselines, params=w.params, layer=w.layer)
        got = answer.attributions[0]
        assert got.shape == want.shape and got.dtype == want.dtype, (key, i, got.shape, got.dtype)
        error = error_of(got.numpy(), want.detach().numpy())
        assert error <= CHECK_TOLERANCE, f"{key} request {i}: {error:.2e} of the largest attribution from Captum's"
    assert max(a.timing.pass_requests for a in answers) > 1, "no two requests shared a pass"
