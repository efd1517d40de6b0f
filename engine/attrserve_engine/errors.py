"""Engine errors: each names the gRPC status the service edge maps it to; `size_text` writes bytes for their messages."""

import os
import re


class AttributionError(Exception):
    """Base of errors a caller can act on; `code` is a grpc.StatusCode name. `retry_after_s`: when the caller
    may try again (the service sends it as trailing metadata)."""

    code = "INTERNAL"

    def __init__(self, *args: object, retry_after_s: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after_s = retry_after_s


class InvalidArgument(AttributionError):
    code = "INVALID_ARGUMENT"


class NotFound(AttributionError):
    code = "NOT_FOUND"


class ResourceExhausted(AttributionError):
    """`permanent`: the refusal is about the request itself (it passes a limit per request), so the same request is
    refused again however long its caller waits: the service tells clients not to retry it (a negative
    `grpc-retry-pushback-ms`, gRPC's retry design A6). A refusal for the server's load (admission) is not permanent:
    it carries `retry_after_s` instead."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, *args: object, retry_after_s: float | None = None, permanent: bool = False) -> None:
        super().__init__(*args, retry_after_s=retry_after_s)
        self.permanent = permanent


class DeadlineExceeded(AttributionError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(AttributionError):
    code = "CANCELLED"


class Unavailable(AttributionError):
    code = "UNAVAILABLE"


class PassStuck(Unavailable):
    """UNAVAILABLE for a request whose rows were in a pass given up as stuck in a model's code
    (Scheduler.give_up_stuck_pass), where the other requests of the device get a plain Unavailable: the service's
    front end suspects it of being a query of death (attrserve_service/quarantine.py). `why`: the pass's reason."""

    def __init__(self, *args: object, why: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(*args, retry_after_s=retry_after_s)
        self.why = why


class LoadStuck(Unavailable):
    """A model version's load given up as stuck in the model's code (Engine.load, stuck_load_seconds): its record's
    reason, and what requests for it are told. The load's thread cannot be stopped; it runs on, and the version serves
    if it ever returns."""


class FailedPrecondition(AttributionError):
    code = "FAILED_PRECONDITION"


def shown(text: object, limit: int = 100) -> str:
    """A client-chosen value in a message, cut short so a huge one cannot bloat the status.

    A string is quoted (repr) and cut to its first `limit` characters, with its length; any other value is
    its repr, cut the same way (sequences are cut before their repr is built, so a long list costs nothing).
    gRPC statuses travel in trailers of at most a few KiB: every message that quotes what a client sent
    quotes it through here."""
    if isinstance(text, str):
        return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"
    if isinstance(text, (list, tuple)) and len(text) > limit:
        head = shown(type(text)(text[:limit]), limit)
        return f"{head}... ({len(text)} items)"
    r = repr(text)
    return r if len(r) <= limit else r[:limit] + f"... ({len(r)} characters)"


def size_text(nbytes: int) -> str:
    """Bytes for a message: 58.6 KiB, 1.6 MiB, 39.2 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def inside(text: str, folder: object) -> str:
    """`text` with the paths under `folder` named from it ("/models/m/model.py" -> "m/model.py"): what clients read of a
    model's failure, who have no business knowing where the repository lies on the server. A path that only ends in
    the folder's ("/var/models/w.pt" for "/models") is another folder's, and stays as it is."""
    return re.sub(rf"(?<![\w.~/-]){re.escape(f'{folder}{os.sep}')}", "", text)
