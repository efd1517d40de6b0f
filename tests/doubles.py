"""Test doubles: small models that fail, stall, hold the worker or kill it, so the failure paths run under test.

Each is a linear map of 3 features to 2 outputs (weights seeded), so attributions of healthy requests
have an exact answer: Saliency is |W[target]|, Integrated Gradients is W[target] * (x - baseline).
"""

from __future__ import annotations

import threading
import time

import torch
from torch import nn


class Linear3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)

    def integrated_gradients(self, x: torch.Tensor, target: int) -> torch.Tensor:
        """The exact IG of a linear model from zero baselines (any quadrature is exact on a constant gradient)."""
        return self.fc.weight[target].detach().to(x.device) * x


class Fragile(Linear3):
    """Raises on inputs over 100: a request that breaks the model must fail alone."""

    def forward(self, x):
        if bool((x > 100).any()):
            raise ValueError("input out of the model's range")
        return self.fc(x)


class Slow(Linear3):
    """Sleeps in forward, so deadlines can pass while it runs."""

    def forward(self, x):
        time.sleep(0.3)
        return self.fc(x)


class Gated(Linear3):
    """Counts the rows of every forward and, while closed, holds the worker inside forward.

    `hold()` closes the gate; the next forward sets `entered` and waits for a permit (`step()`) or for
    `open()`. Rows are recorded when the forward starts, so a test sees exactly which rows were computed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows_seen: list[int] = []
        self.entered = threading.Event()
        self._permits = threading.Semaphore(0)
        self._closed = False

    def hold(self) -> None:
        self._closed = True
        self.entered.clear()

    def step(self, passes: int = 1) -> None:
        for _ in range(passes):
            self._permits.release()

    def open(self) -> None:
        self._closed = False
        self.step(1000)

    def forward(self, x):
        self.rows_seen.append(int(x.shape[0]))
        if self._closed:
            self.entered.set()
            assert self._permits.acquire(timeout=30), "the test never let this pass through"
        return self.fc(x)


class Exiting(Linear3):
    """Kills the thread that runs it (SystemExit, which ends a Python thread silently) on inputs over 100,
    after `release` is set: a model that takes its worker down while other requests are queued.

    Once `release` is set, any other forward waits for `back`: the restarted worker's first act, a forward of
    every model on its device, waits too, so the worker stays down until the test sets `back`."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.back = threading.Event()

    def forward(self, x):
        if bool((x > 100).any()):
            self.entered.set()
            self.release.wait(30)
            raise SystemExit("the model called sys.exit")
        if self.release.is_set():
            assert self.back.wait(30), "the test never let the worker come back"
        return self.fc(x)
