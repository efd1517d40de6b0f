"""What torch does on one thread within a block: the tensors that die there and the aten operators dispatched there.

For the engine process's event loop, which must do neither (docs/ARCHITECTURE.md, "Threads, the GIL and the hot
path"): every torch operator called from Python releases the GIL in its binding, and PyTorch destroys a freed
tensor's C++ side without it, so either hands the GIL to the worker."""

from __future__ import annotations

import collections
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# torch.from_numpy dispatches lift_fresh under a mode (a no-op that keeps the GIL): the one operator the loop may run.
ALLOWED = {"aten.lift_fresh.default"}


class _Operators(TorchDispatchMode):
    """Counts the aten operators dispatched on the thread that entered it (dispatch modes are thread-local)."""

    def __init__(self) -> None:
        super().__init__()
        self.called: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.called[str(func)] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def torch_on_this_thread() -> Iterator[tuple[list[str], collections.Counter[str]]]:
    """(the tensors that died on this thread, the operators dispatched on it) within the block. The cyclic collector
    is off meanwhile: it would free other tests' garbage (a model's weights) here, which the code under test did not
    make."""
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
