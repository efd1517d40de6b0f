"""attrserve_engine: pure-torch attribution engine that fuses the work rows of many requests.

The names below are imported from their modules when first used, so that `attrserve_engine.limits` (what the server's
command line reads) imports without torch: `attrserve serve` starts its engine process before the front end imports
torch, and both imports then run at once (docs/ARCHITECTURE.md, "Start-up").
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name → the module of this package that defines it
_EXPORTS = {
    "DROP_CANCELLED": "scheduler",
    "DROP_DEADLINE": "scheduler",
    "AlgorithmResult": "job",
    "AlgorithmSpec": "job",
    "AttributionError": "errors",
    "AttributionJob": "job",
    "AttributionResult": "job",
    "Cancelled": "errors",
    "DeadlineExceeded": "errors",
    "Engine": "engine",
    "EngineLimits": "limits",
    "EngineObserver": "scheduler",
    "FailedPrecondition": "errors",
    "InputCast": "models",
    "InputSpec": "models",
    "InvalidArgument": "errors",
    "JobTiming": "job",
    "LoadedModel": "models",
    "ModelRecord": "models",
    "ModelSpec": "models",
    "ModelState": "models",
    "NotFound": "errors",
    "PassStats": "scheduler",
    "ResourceExhausted": "errors",
    "Unavailable": "errors",
    "version_order": "models",
}
__all__ = [
    "DROP_CANCELLED",
    "DROP_DEADLINE",
    "AlgorithmResult",
    "AlgorithmSpec",
    "AttributionError",
    "AttributionJob",
    "AttributionResult",
    "Cancelled",
    "DeadlineExceeded",
    "Engine",
    "EngineLimits",
    "EngineObserver",
    "FailedPrecondition",
    "InputCast",
    "InputSpec",
    "InvalidArgument",
    "JobTiming",
    "LoadedModel",
    "ModelRecord",
    "ModelSpec",
    "ModelState",
    "NotFound",
    "PassStats",
    "ResourceExhausted",
    "Unavailable",
    "version_order",
]

if TYPE_CHECKING:
    from attrserve_engine.engine import Engine
    from attrserve_engine.errors import (
        AttributionError,
        Cancelled,
        DeadlineExceeded,
        FailedPrecondition,
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        Unavailable,
    )
    from attrserve_engine.job import AlgorithmResult, AlgorithmSpec, AttributionJob, AttributionResult, JobTiming
    from attrserve_engine.limits import EngineLimits
    from attrserve_engine.models import InputCast, InputSpec, LoadedModel, ModelRecord, ModelSpec, ModelState, version_order
    from attrserve_engine.scheduler import DROP_CANCELLED, DROP_DEADLINE, EngineObserver, PassStats


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
