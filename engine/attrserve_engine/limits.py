"""The engine's server-wide caps and defaults (EngineLimits). Imports nothing heavy: `attrserve serve` reads its
settings from here and starts the engine process before the front end imports torch (docs/ARCHITECTURE.md, "Start-up")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attrserve_engine.algorithms import Limits

DEFAULT_MAX_BATCH_ROWS = 256
DEFAULT_MAX_QUEUE_DELAY_US = 500


@dataclass(frozen=True)
class EngineLimits:
    """Server-wide caps; each breach is a clear INVALID_ARGUMENT or RESOURCE_EXHAUSTED."""

    max_n_steps: int = 1000
    max_nt_samples: int = 1000
    max_rows_per_request: int = 100_000
    max_queued_requests: int = 10_000
    default_max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    default_max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    default_device: str = "auto"
    # Measure each model's best pass size at load (models with pinned input shapes and no configured max_batch_rows).
    probe_batch_rows: bool = True
    probe_seconds: float = 1.5
    # A worker that died is restarted after this long (doubling while it keeps dying, up to 30 s).
    worker_restart_delay_s: float = 0.1
    # An unloaded or replaced load finishes the requests it accepted for at most this long before it is released.
    drain_seconds: float = 30.0
    # Admission, per model: rows accepted and not yet computed (0: max_queue_seconds of work at the model's
    # measured rate) and their estimated bytes (0: queued_bytes_bound of its device); a model's config.pbtxt may set
    # its own.
    default_max_queued_rows: int = 0
    max_queue_seconds: float = 2.0
    default_max_queued_bytes: int = 0
    # A fused pass is cut to at most this long at the model's measured rate (never below one block's rows).
    max_pass_seconds: float = 0.25
    # Most plans build a request's rows of model work at once (IntegratedGradients' n_steps copies of each example), so
    # a request whose rows would hold more input bytes than this at once is refused before it can exhaust memory
    # (perturbation methods build theirs a pass at a time and hold only their examples); 0: a quarter of the memory of
    # the model's device (for the CPU: the engine's cgroup limit, or the machine's memory).
    max_request_work_bytes: int = 0

    @property
    def algorithm_limits(self) -> Limits:
        from attrserve_engine.algorithms import Limits  # torch: only the engine asks for these

        return Limits(max_n_steps=self.max_n_steps, max_nt_samples=self.max_nt_samples)
