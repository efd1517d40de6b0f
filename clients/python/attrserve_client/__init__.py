"""Python client for attrserve: Captum attributions from a remote gRPC server, with numpy in and out."""

from .client import (
    DEFAULT_TIMEOUT,
    NO_RETRY,
    AlgorithmResult,
    AsyncAttributionClient,
    Attribution,
    AttributionClient,
    RequestFailed,
    RetryPolicy,
    build_request,
    replayable,
)
from .tensors import from_tensor_proto, to_tensor_proto

__all__ = [
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "AlgorithmResult",
    "AsyncAttributionClient",
    "Attribution",
    "AttributionClient",
    "RequestFailed",
    "RetryPolicy",
    "build_request",
    "from_tensor_proto",
    "replayable",
    "to_tensor_proto",
]
