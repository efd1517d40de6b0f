"""attrserve_engine: pure-torch attribution engine that fuses the work rows of many requests.

The names below are imported from their modules when first used, so that the modules the front-end process needs
import without torch: errors, job, limits and events (docs/ARCHITECTURE.md, "Processes"). The front end never
imports torch; the engine-core process does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name → the module of this package that defines it
_EXPORTS = {
    "DROP_CANCELLED": "events",
    "DROP_DEADLINE": "events",
    "AlgorithmResult": "job",
    "AlgorithmSpec": "job",
    "AttributionError": "errors",
    "AttributionJob": "job",
    "AttributionResult": "job",
    "Cancelled": "errors",
    "DeadlineExceeded": "errors",
    "Engine": "engine",
    "EngineLimits": "limits",
    "EngineObserver": "events",
    "FailedPrecondition": "errors",
    "InputCast": "job",
    "InputSpec": "models",
    "InvalidArgument": "errors",
    "JobTiming": "job",
    "LoadedModel": "models",
    "ModelRecord": "models",
    "ModelSpec": "models",
    "ModelState": "events",
    "NotFound": "errors",
    "PassStats": "events",
    "ResourceExhausted": "errors",
    "Unavailable": "errors",
    "version_order": "events",
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
    from attrserve_engine.events import DROP_CANCELLED, DROP_DEADLINE, EngineObserver, ModelState, PassStats, version_order
    from attrserve_engine.job import AlgorithmResult, AlgorithmSpec, AttributionJob, AttributionResult, InputCast, JobTiming
    from attrserve_engine.limits import EngineLimits
    from attrserve_engine.models import InputSpec, LoadedModel, ModelRecord, ModelSpec


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
