"""attrserve_engine: pure-torch attribution engine that fuses the work rows of many requests."""

from attrserve_engine.engine import Engine, EngineLimits
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
from attrserve_engine.models import InputCast, InputSpec, LoadedModel, ModelRecord, ModelSpec, ModelState, version_order
from attrserve_engine.scheduler import DROP_CANCELLED, DROP_DEADLINE, EngineObserver, PassStats

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
