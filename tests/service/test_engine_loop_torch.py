"""The engine process's event loop takes a request in without torch: it frees no tensor and runs no torch operator.

Every torch operator called from Python, and every tensor freed (PyTorch releases the GIL while it destroys a tensor's
C++ side), hands the GIL to whichever thread wants it. In the engine process that is the worker, which runs Python
between its kernels, and the event loop then waits for it: in bench W1 a target check that freed one temporary tensor
per request took ~350 µs of the loop's wall time for ~85 µs of its CPU (bench/RESULTS.md, issue 12 step 28). So the loop's
part of a request (decoding its frame, `Engine.submit`: validation, plans, queueing, and dropping the message) is
checked here for the bench's six workloads, as the front sends them: no tensor dies on the loop's thread, and no
torch operator is dispatched there but `lift_fresh` (`torch.from_numpy`, which keeps the GIL).

Not covered, and known to run torch on the loop (docs/ARCHITECTURE.md, "Threads, the GIL and the hot path"): baselines
sent as tensors (broadcast and cast there), and the feature-mask methods' masks and feature counts."""

from __future__ import annotations

import collections
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attrserve_engine import Engine, EngineLimits
from attrserve_service import frames
from attrserve_service.convert import request_to_job
from attrserve_service.engine_process import frame_of
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


class _Operators(TorchDispatchMode):
    """Counts the aten operators dispatched on the thread that entered it (dispatch modes are thread-local)."""

    def __init__(self) -> None:
        super().__init__()
        self.called: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.called[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _torch_on_this_thread() -> Iterator[tuple[list[str], collections.Counter[str]]]:
    """(where tensors died on this thread, the operators dispatched on it) within the block. The cyclic collector is
    off meanwhile: it would free other tests' garbage (a model's weights) here, which the engine did not make."""
    me = threading.get_ident()
    died: list[str] = []

    def finalizer(tensor: torch.Tensor) -> None:
        if threading.get_ident() == me:
            died.append(f"{tuple(tensor.shape)} {tensor.dtype}")

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    torch.Tensor.__del__ = finalizer  # type: ignore[attr-defined]
    try:
        with _Operators() as operators:
            yield died, operators.called
    finally:
        del torch.Tensor.__del__  # type: ignore[attr-defined]
        if enabled:
            gc.enable()


def _frame(message: tuple) -> bytearray:
    """The frame's body as the engine process's reader hands it to `frames.decode` (the length prefix taken off)."""
    return bytearray(b"".join(bytes(part) for part in frame_of([message], lambda m, e: None))[8:])


@pytest.mark.parametrize("key", sorted(WORKLOADS))
def test_the_event_loop_takes_a_request_in_without_torch(engine: Engine, key: str) -> None:
    w = WORKLOADS[key]
    bodies = [_frame(("submit", i, request_to_job(r))) for i, r in enumerate(w.requests(3))]
    # Each request alone first: its answer to compare with, and the caches a first request fills (a constant
    # baseline of its shape) filled, as they are in a server that serves.
    alone = [engine.attribute(frames.decode(body)[0][2], timeout=120) for body in bodies]
    futures = []
    with engine.held():  # the worker starts nothing meanwhile: what happens on this thread is the loop's part alone
        with _torch_on_this_thread() as (died, operators):
            for body in bodies:
                (message,) = frames.decode(body)
                futures.append(engine.submit(message[2]))
                del message  # the engine process drops the message once it is queued
    assert died == [], f"{key}: tensors freed on the event loop: {died}"
    assert set(operators) <= {"aten.lift_fresh.default"}, f"{key}: torch operators on the event loop: {dict(operators)}"
    for future, want in zip(futures, alone):  # answered, as they were alone
        got = future.result(timeout=120)
        for a, b in zip(got.attributions, want.attributions, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
