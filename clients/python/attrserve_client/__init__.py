"""Python client for attrserve: Captum attributions from a remote gRPC server, with numpy in and out."""

from .client import AlgorithmResult, AsyncAttributionClient, Attribution, AttributionClient, build_request
from .tensors import from_tensor_proto, to_tensor_proto

__all__ = [
    "AlgorithmResult",
    "AsyncAttributionClient",
    "Attribution",
    "AttributionClient",
    "build_request",
    "from_tensor_proto",
    "to_tensor_proto",
]
