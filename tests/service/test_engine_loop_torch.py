"""The engine process's event loop takes a request in without torch: it frees no tensor and runs no torch operator.

Every torch operator called from Python, and every tensor freed (PyTorch releases the GIL while it destroys a tensor's
C++ side), hands the GIL to whichever thread wants it. In the engine process that is the worker, which runs Python
between its kernels, and the event loop then waits for it: in bench W1 a target check that freed one temporary tensor
per request took ~350 µs of the loop's wall time for ~85 µs of its CPU (bench/RESULTS.md, issue 12 step 28). So the loop's
part of a request (decoding its frame, `Engine.submit`: validation, plans, queueing, and dropping the message) is
checked here for the bench's six workloads, as the front sends them: no tensor dies on the loop's thread, and no
torch operator is dispatched there but `lift_fresh` (`torch.from_numpy`, which keeps the GIL).

tests/engine/test_engine_loop_torch_zoo.py checks every algorithm's requests the same way, on the engine alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch_calls import ALLOWED, torch_on_this_thread

from attrserve_engine import Engine, EngineLimits
from attrserve_service import frames
from attrserve_service.convert import request_to_job
from attrserve_service.repository import load_repository

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _workloads() -> dict:
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from workloads import all_workloads

    return all_workloads(smoke=True)


WORKLOADS = _workloads()


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine(EngineLimits(probe_batch_rows=False, default_device="cpu"))
    for spec in load_repository(ROOT / "bench" / "models_smoke"):
        spec.instances = 1
        e.load(spec)
    yield e
    e.shutdown()


def _frame(message: tuple) -> bytearray:
    """The frame's body as the engine process's reader hands it to `frames.decode` (the length prefix taken off)."""
    return bytearray(frames.encode([message])[8:])


@pytest.mark.parametrize("key", sorted(WORKLOADS))
def test_the_event_loop_takes_a_request_in_without_torch(engine: Engine, key: str) -> None:
    w = WORKLOADS[key]
    bodies = [_frame(("submit", i, request_to_job(r))) for i, r in enumerate(w.requests(3))]
    # Each request alone first: its answer to compare with, and the caches a first request fills (a constant
    # baseline of its shape) filled, as they are in a server that serves.
    alone = [engine.attribute(frames.decode(body, tensors=True)[0][2], timeout=120) for body in bodies]
    futures = []
    with engine.held():  # the worker starts nothing meanwhile: what happens on this thread is the loop's part alone
        with torch_on_this_thread() as (died, operators):
            for body in bodies:
                (message,) = frames.decode(body, tensors=True)
                futures.append(engine.submit(message[2]))
                del message  # the engine process drops the message once it is queued
    assert died == [], f"{key}: tensors freed on the event loop: {died}"
    assert set(operators) <= ALLOWED, f"{key}: torch operators on the event loop: {dict(operators)}"
    for future, want in zip(futures, alone):  # answered, as they were alone
        got = future.result(timeout=120)
        for a, b in zip(got.attributions, want.attributions, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
