"""Engine errors: each names the gRPC status the service edge maps it to."""


class AttributionError(Exception):
    """Base of errors a caller can act on; `code` is a grpc.StatusCode name."""

    code = "INTERNAL"


class InvalidArgument(AttributionError):
    code = "INVALID_ARGUMENT"


class NotFound(AttributionError):
    code = "NOT_FOUND"


class ResourceExhausted(AttributionError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(AttributionError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(AttributionError):
    code = "CANCELLED"


class Unavailable(AttributionError):
    code = "UNAVAILABLE"


class FailedPrecondition(AttributionError):
    code = "FAILED_PRECONDITION"
