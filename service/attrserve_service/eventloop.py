"""The event loop both server processes run (`--event-loop`): uvloop, asyncio's loop on libuv, where it is installed
(it is a dependency on Linux and macOS), else the standard library's. The front end's gRPC callbacks and the frames
between the processes take fewer CPU cycles on uvloop (bench/RESULTS.md, issue 12 step 26); "asyncio" is the way
back should a platform's uvloop misbehave."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def resolve(choice: str) -> str:
    """The loop a `--event-loop` setting runs: "uvloop" or "asyncio". "auto" takes uvloop where it is installed;
    "uvloop" requires it (ConfigError otherwise)."""
    from attrserve_service.config import ConfigError  # here: the CLI reads EVENT_LOOPS without importing config (protobuf)

    if choice not in EVENT_LOOPS:
        raise ConfigError(f"--event-loop {choice!r}: use one of {', '.join(EVENT_LOOPS)}")
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError as e:
        if choice == "uvloop":
            raise ConfigError(f"--event-loop uvloop: uvloop cannot be imported ({e}; pip install uvloop)") from None
        return "asyncio"
    return "uvloop"


def run(main: Callable[[], Coroutine[Any, Any, T]], choice: str) -> T:
    """asyncio.run(main()) on the loop `choice` resolves to; the coroutine is made only once the loop is chosen, so a
    refused setting leaves none unawaited."""
    if resolve(choice) == "uvloop":
        import uvloop

        return uvloop.run(main())
    return asyncio.run(main())


def running() -> str:
    """The event loop this thread runs: "uvloop" or "asyncio" ("" outside one). Reported by attrserve_build_info."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return ""
    return "uvloop" if type(loop).__module__.partition(".")[0] == "uvloop" else "asyncio"
