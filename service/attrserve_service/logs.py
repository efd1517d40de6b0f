"""Logging set-up: plain text, or one JSON object per line (--log-format json) carrying the id of the request a
line is about.

The id of the request being handled lives in a context variable (`REQUEST_ID`) that methods.py and the
stream handler set, so every log line written while handling it carries it; the engine's worker, which has no
such context, passes a job's id explicitly (`extra={"request_id": ...}`).
"""

from __future__ import annotations

import contextvars
import json
import logging
import time

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("attrserve_request_id", default="")
# A request id is the client's string, of any length: a line carries its first _MAX_ID_CHARS characters (and its
# length), so a client cannot make every log line about its requests as long as it likes.
_MAX_ID_CHARS = 200
FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")  # --log-level, in any case (and logging's other names)


def is_level(name: str) -> bool:
    """Whether `name` (any case) is a level the root logger takes: one of LEVELS, or NOTSET, WARN, FATAL."""
    return isinstance(logging.getLevelName(name.upper()), int)


class _RequestId(logging.Filter):
    """Gives every record a `request_id`: its own (`extra=`), else the one being handled, else ""."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id (when known), exception (when any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            cut = len(request_id) > _MAX_ID_CHARS
            entry["request_id"] = f"{request_id[:_MAX_ID_CHARS]}... ({len(request_id)} characters)" if cut else request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Set up the root logger for `attrserve serve`."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.addFilter(_RequestId())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())


def current() -> tuple[str, str]:
    """The root logger's (level, format), for a child process to log as this one does."""
    root = logging.getLogger()
    json_lines = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return logging.getLevelName(root.level), "json" if json_lines else "text"
