"""attrserve_engine: pure-torch attribution engine that fuses the work rows of many requests."""

from attrserve_engine.engine import Engine, EngineLimits
from attrserve_engine.errors import (
    AttributionError,
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from attrserve_engine.job import AlgorithmCall, AlgorithmOutcome, AttributionJob, AttributionResult, JobTiming
from attrserve_engine.registry import InputSpec, LoadedModel, ModelSpec

__all__ = [
    "AlgorithmCall",
    "AlgorithmOutcome",
    "AttributionError",
    "AttributionJob",
    "AttributionResult",
    "Cancelled",
    "DeadlineExceeded",
    "Engine",
    "EngineLimits",
    "InputSpec",
    "InvalidArgument",
    "JobTiming",
    "LoadedModel",
    "ModelSpec",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
]
