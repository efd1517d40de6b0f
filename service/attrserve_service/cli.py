"""`attrserve serve`: runs the server. The `attrserve` command itself is attrserve_client.cli:main (in both packages'
entry points), which imports this module for `serve` only.

Every server setting is one row of SETTINGS: its flag, the ServerConfig or EngineLimits field it sets (whose
default is the default), and its environment variable (ATTRSERVE_ + the flag in upper snake case, e.g.
ATTRSERVE_MAX_BATCH_ROWS), so containers and Kubernetes can configure the server without arguments.
A flag wins over its variable.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrserve_engine.limits import EngineLimits
from attrserve_service import eventloop, logs
from attrserve_service.logs import FORMATS, LEVELS

if TYPE_CHECKING:
    from attrserve_service.config import ServerConfig  # imported where used: `attrserve --help` stays light


@dataclass(frozen=True)
class Setting:
    flag: str
    field: str  # a ServerConfig field, or "limits.<EngineLimits field>"
    help: str
    parse: Callable[[str], Any] = str
    metavar: str | None = None
    repeatable: bool = False  # the flag may be given several times; the variable holds a comma-separated list
    inverted: bool = False  # a --no-... switch that sets a true-by-default field to False (its variable drops "NO_")
    switch: bool = False  # a flag without a value that sets a false-by-default field to True (its variable: 1/0)
    choices: tuple[str, ...] | None = None

    @property
    def env(self) -> str:
        return "ATTRSERVE_" + self.flag.removeprefix("--").removeprefix("no-").replace("-", "_").upper()


# The least value each numeric setting takes. Below it a server started and said SERVING, then refused every request
# ("this server holds 0 requests for cpu, its limit"; "n_steps is 50, over this server's limit of -1") or failed in
# the engine process (torch.set_num_threads(-1)). --metrics-port takes any negative number as "off".
MINIMUMS: dict[str, float] = {
    "--port": 0,
    "--max-batch-rows": 1,
    "--probe-seconds": 0,
    "--max-queue-delay-us": 0,
    "--max-rows-per-request": 1,
    "--max-request-work-bytes": 0,
    "--max-queued-requests": 1,
    "--max-queued-rows": 0,
    "--max-queue-seconds": 0,
    "--max-queued-bytes": 0,
    "--max-pass-seconds": 0,
    "--stuck-pass-seconds": 0,
    "--stuck-load-seconds": 0,
    "--max-n-steps": 1,
    "--max-nt-samples": 1,
    "--max-request-bytes": 1,
    "--max-requests-per-stream": 1,
    "--prestop-seconds": 0,
    "--grace-seconds": 0,
    "--repository-poll-seconds": 0,
    "--drain-seconds": 0,
    "--worker-restart-delay": 0,
    "--engine-threads": 0,
    "--busy-poll-us": 0,
    "--quarantine-seconds": 0,
    "--max-front-bytes": 0,
    "--max-pending-calls": 0,
}


# And the most: gRPC took --port 70000 as port 4464 (70000 - 65536), and served there.
MAXIMUMS: dict[str, float] = {"--port": 65535, "--metrics-port": 65535}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


SETTINGS: tuple[Setting, ...] = (
    Setting("--model-repository", "model_repository", "folder of model folders (default: the built-in demo models)", Path, "DIR"),
    Setting(
        "--plugins",
        "plugins",
        "algorithm plugin: a .py file, a folder of them, or a module path (repeatable)",
        str,
        "PATH",
        repeatable=True,
    ),
    Setting("--host", "host", "address to listen on"),
    Setting("--port", "port", "gRPC port (0: any free port)", int),
    Setting("--metrics-port", "metrics_port", "Prometheus /metrics port (-1: off, 0: any free port)", int),
    Setting("--device", "limits.default_device", "default device for models: auto (CUDA when present), cpu, cuda:0, ..."),
    Setting(
        "--max-batch-rows",
        "limits.default_max_batch_rows",
        "rows per fused pass for models whose size is neither configured nor measured",
        int,
    ),
    Setting(
        "--no-batch-probe",
        "limits.probe_batch_rows",
        "do not measure each model's best pass size at load (config.pbtxt max_batch_rows always wins)",
        _bool,
        inverted=True,
    ),
    Setting("--probe-seconds", "limits.probe_seconds", "time budget of a model's pass-size probe at load", float, "SECONDS"),
    Setting("--max-queue-delay-us", "limits.default_max_queue_delay_us", "default longest wait for company before a pass is cut", int),
    Setting("--max-rows-per-request", "limits.max_rows_per_request", "a request needing more rows of model work is refused", int),
    Setting(
        "--max-request-work-bytes",
        "limits.max_request_work_bytes",
        "a request whose rows of model work would hold more input bytes at once is refused (0: a quarter of the device's memory)",
        int,
        "BYTES",
    ),
    Setting(
        "--max-queued-requests",
        "limits.max_queued_requests",
        "requests in flight per device before new ones are refused (batch requests: half of it)",
        int,
    ),
    Setting(
        "--max-queued-rows",
        "limits.default_max_queued_rows",
        "rows of work a model may have queued before new requests are refused (0: --max-queue-seconds of work at its measured rate)",
        int,
    ),
    Setting(
        "--max-queue-seconds",
        "limits.max_queue_seconds",
        "with --max-queued-rows 0, a model's queue holds this much work at its measured rate",
        float,
        "SECONDS",
    ),
    Setting(
        "--max-queued-bytes",
        "limits.default_max_queued_bytes",
        "estimated bytes a model's queued requests may hold (their rows' inputs and layer values) before new requests are refused "
        "(0: 1 GiB for a model on the CPU, or a quarter of the container's memory limit where that is less; a quarter of "
        "the GPU's memory for a model on a GPU)",
        int,
        "BYTES",
    ),
    Setting(
        "--max-pass-seconds",
        "limits.max_pass_seconds",
        "a fused pass is cut to at most this long at the model's measured rate, so models on a device take turns quickly",
        float,
        "SECONDS",
    ),
    Setting(
        "--stuck-pass-seconds",
        "limits.stuck_pass_seconds",
        "a pass still running after this long (and after 20 times what its rows take as the model's passes so far took "
        "them; before any has ended, 10 times this long) is "
        "given up as stuck in the model's code: the device's requests fail with UNAVAILABLE, health says NOT_SERVING, "
        "and the engine process is started again; an engine process that does not answer the front for this long is "
        "killed and started again (0: never)",
        float,
        "SECONDS",
    ),
    Setting(
        "--stuck-load-seconds",
        "limits.stuck_load_seconds",
        "a model's load (its build, weights, pass-size probe and warm-ups) still running after this long is given up as "
        "stuck in the model's code: the version is UNAVAILABLE saying so and the other models load and serve; it serves "
        "if the stuck load ever returns, and is not loaded again until then (0: never)",
        float,
        "SECONDS",
    ),
    Setting("--max-n-steps", "limits.max_n_steps", "cap on n_steps", int),
    Setting("--max-nt-samples", "limits.max_nt_samples", "cap on a noise tunnel's nt_samples", int),
    Setting("--max-request-bytes", "max_request_bytes", "largest request message accepted", int, "BYTES"),
    Setting(
        "--max-requests-per-stream",
        "max_requests_per_stream",
        "requests in flight on one AttributeStream, their answers until sent included",
        int,
    ),
    Setting(
        "--prestop-seconds",
        "prestop_seconds",
        "on SIGTERM, how long health reports NOT_SERVING while new requests are still accepted, before the grace starts",
        float,
        "SECONDS",
    ),
    Setting(
        "--grace-seconds",
        "grace_seconds",
        "on SIGTERM, how long in-flight requests may take to finish before they are cancelled",
        float,
        "SECONDS",
    ),
    Setting(
        "--model-control",
        "model_control",
        "none: load the repository at start-up; explicit: also load, reload and unload through the ModelRepositoryService; "
        "poll: also follow the repository folder (new or changed versions load, removed ones unload)",
        choices=("none", "explicit", "poll"),
        metavar="MODE",
    ),
    Setting(
        "--repository-poll-seconds",
        "repository_poll_seconds",
        "with --model-control poll, how often the repository folder is read",
        float,
        "SECONDS",
    ),
    Setting(
        "--drain-seconds",
        "limits.drain_seconds",
        "an unloaded or reloaded model version finishes its accepted requests for at most this long before it is released",
        float,
        "SECONDS",
    ),
    Setting(
        "--strict-readiness",
        "strict_readiness",
        "health is SERVING only when every model version the server knows of serves (default: when one does)",
        _bool,
        switch=True,
    ),
    Setting(
        "--worker-restart-delay",
        "limits.worker_restart_delay_s",
        "a device worker that died restarts after this long (doubling while it keeps dying)",
        float,
        "SECONDS",
    ),
    Setting(
        "--tls-cert",
        "tls_cert",
        "serve TLS with this certificate chain (PEM; needs --tls-key; default: plaintext); the TLS files are watched: "
        "re-read when they change, a new set that passes the start-up checks serves new connections",
        Path,
        "FILE",
    ),
    Setting("--tls-key", "tls_key", "the private key of --tls-cert (PEM; watched, re-read on change)", Path, "FILE"),
    Setting(
        "--tls-client-ca",
        "tls_client_ca",
        "mutual TLS: clients must present a certificate signed by this CA (PEM; watched, re-read on change)",
        Path,
        "FILE",
    ),
    Setting(
        "--auth-tokens-file",
        "auth_tokens_file",
        "require a bearer token (metadata 'authorization: Bearer TOKEN') from this file: one a line, # comments; "
        "watched: re-read when it changes",
        Path,
        "FILE",
    ),
    Setting(
        "--auth-token-env",
        "auth_token_env",
        "require a bearer token from the environment variable NAME (comma-separated tokens)",
        str,
        "NAME",
    ),
    Setting(
        "--admin-tokens-file",
        "admin_tokens_file",
        "only these tokens (one a line) may call LoadModel and UnloadModel (they are accepted everywhere else too); "
        "watched: re-read when it changes",
        Path,
        "FILE",
    ),
    Setting(
        "--auth-health",
        "auth_health",
        "with token auth, health checks need a token too (default: exempt, for probes and balancers)",
        _bool,
        switch=True,
    ),
    Setting(
        "--no-engine-process",
        "engine_process",
        "run the models in the front end's process instead of an engine-core process of their own",
        _bool,
        inverted=True,
    ),
    Setting(
        "--engine-threads",
        "engine_threads",
        "torch intra-op threads of the engine process (0: one per core it may use, by its CPU affinity and CPU quota, less "
        "one; with --no-engine-process, 0: torch's default, at most those cores)",
        int,
    ),
    Setting(
        "--busy-poll-us",
        "busy_poll_us",
        "while one request alone waits on the engine process, the front end polls for its answer this many µs at most "
        "instead of sleeping: lower latency for a lone caller, at up to that much CPU per request (0: off; off where "
        "the server may use fewer than 2 cores, by its CPU affinity and CPU quota)",
        int,
        metavar="US",
    ),
    Setting(
        "--quarantine-seconds",
        "quarantine_seconds",
        "a request computing when the engine process died runs alone if it is sent again; if the engine process dies "
        "then too, it and every identical request are refused with FAILED_PRECONDITION for this long (0: off; "
        "without an engine process, unused)",
        float,
        "SECONDS",
    ),
    Setting(
        "--max-front-bytes",
        "max_front_bytes",
        "bytes of requests the front end may hold for the engine process until they are answered (their tensors plus "
        "32 KiB each); a request that would pass it is refused with RESOURCE_EXHAUSTED (0: a thirty-second of the memory "
        "the server may use, at most 256 MiB; without an engine process, unused)",
        int,
        "BYTES",
    ),
    Setting(
        "--max-pending-calls",
        "max_pending_calls",
        "calls gRPC may hold, with their messages, that the front end has not taken yet (while its event loop is behind "
        "a flood); past it gRPC cancels a new call before attrserve sees it (0: gRPC's own, 1,000 to 3,000)",
        int,
        "N",
    ),
    Setting(
        "--allocator",
        "allocator",
        "the engine process's malloc: auto (tcmalloc where installed), tcmalloc, glibc, or a malloc library's path",
        metavar="NAME|PATH",
    ),
    Setting(
        "--event-loop",
        "event_loop",
        "the event loop of the front end and the engine process: auto (uvloop where installed), uvloop or asyncio",
        choices=eventloop.EVENT_LOOPS,
        metavar="LOOP",
    ),
    Setting(
        "--reflection",
        "reflection",
        "serve gRPC server reflection (grpcurl list/describe; needs a token when auth is on)",
        _bool,
        switch=True,
    ),
)


def _defaults() -> dict[str, Any]:
    """Each setting's default: the ServerConfig and EngineLimits field defaults (declared there, once)."""
    from attrserve_service.config import ServerConfig  # imported late: it pulls in grpc

    server = ServerConfig()
    defaults = {f.name: getattr(server, f.name) for f in dataclasses.fields(server) if f.name != "limits"}
    defaults.update({f"limits.{f.name}": getattr(server.limits, f.name) for f in dataclasses.fields(server.limits)})
    return defaults


def _serve_parser() -> argparse.ArgumentParser:
    defaults = _defaults()
    p = argparse.ArgumentParser(
        prog="attrserve serve",
        description="Serve model explanations over gRPC. Each flag can also be set by the environment variable shown.",
    )
    for s in SETTINGS:
        default = defaults[s.field]
        if s.inverted:
            p.add_argument(s.flag, dest=s.field, action="store_false", default=None, help=f"{s.help} [{s.env}=0]")
            continue
        if s.switch:
            p.add_argument(s.flag, dest=s.field, action="store_const", const=True, default=None, help=f"{s.help} [{s.env}=1]")
            continue
        shown = "" if default is None or default == [] else f" (default: {default})"
        metavar = s.metavar or ("N" if s.parse is int else "VALUE")
        p.add_argument(
            s.flag,
            dest=s.field,
            type=s.parse,
            metavar=metavar,
            choices=s.choices,
            default=None,
            action="append" if s.repeatable else "store",
            help=f"{s.help}{shown} [{s.env}]",
        )
    p.add_argument("--log-level", help=f"log level: {', '.join(LEVELS)} (default: INFO) [ATTRSERVE_LOG_LEVEL]")
    p.add_argument(
        "--log-format",
        choices=FORMATS,
        help="json: one JSON object per line, with the request id of each line about a request (default: text) [ATTRSERVE_LOG_FORMAT]",
    )
    return p


def server_config(argv: Sequence[str], environ: dict[str, str] | None = None) -> tuple[ServerConfig, tuple[str, str]]:
    """The ServerConfig and the (log level, log format) for `attrserve serve ARGS`: flags, then ATTRSERVE_* variables,
    then the defaults."""
    from attrserve_service.config import ServerConfig

    environ = dict(os.environ if environ is None else environ)
    parser = _serve_parser()
    args = vars(parser.parse_args(argv))
    server: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for s in SETTINGS:
        value = args[s.field]
        if value is None and s.env in environ:
            raw = environ[s.env]
            try:
                if s.inverted or s.switch:  # the variable names the positive setting: ATTRSERVE_BATCH_PROBE=0 is --no-batch-probe
                    value = _bool(raw)
                elif s.repeatable:
                    value = [s.parse(part) for part in raw.split(",") if part]
                else:
                    value = s.parse(raw)
                if s.choices and value not in s.choices:
                    raise ValueError(f"use one of {', '.join(s.choices)}")
            except ValueError as e:
                parser.error(f"{s.env}={raw!r}: {e}")
        if value is None:
            continue
        given = f"{s.flag} {value}" if args[s.field] is not None else f"{s.env}={environ.get(s.env)!r}"
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below; inf is no time
            parser.error(f"{given}: must be a finite number")
        if s.flag in MINIMUMS and value < MINIMUMS[s.flag]:
            parser.error(f"{given}: must be {MINIMUMS[s.flag]:g} or more")
        if s.flag in MAXIMUMS and value > MAXIMUMS[s.flag]:
            parser.error(f"{given}: must be {MAXIMUMS[s.flag]:g} or less")
        if s.field.startswith("limits."):
            limits[s.field.removeprefix("limits.")] = value
        else:
            server[s.field] = value
    if server.get("metrics_port") is not None and server["metrics_port"] < 0:
        server["metrics_port"] = None
    log_level: str = args["log_level"] or environ.get("ATTRSERVE_LOG_LEVEL", "INFO")
    log_format: str = args["log_format"] or environ.get("ATTRSERVE_LOG_FORMAT", "text")
    if not logs.is_level(log_level):
        given = f"--log-level {log_level}" if args["log_level"] else f"ATTRSERVE_LOG_LEVEL={log_level!r}"
        parser.error(f"{given}: use one of {', '.join(LEVELS)} (any case)")
    if log_format not in FORMATS:
        parser.error(f"ATTRSERVE_LOG_FORMAT={log_format!r}: use one of {', '.join(FORMATS)}")
    return ServerConfig(**server, limits=EngineLimits(**limits)), (log_level, log_format)


# `attrserve serve`'s exit codes: 0 after a clean drain, 2 for a configuration it cannot serve, and this when
# accepted requests were lost at shutdown (still running when the grace ended).
EXIT_LOST = 3


def serve_main(argv: Sequence[str]) -> int:
    from attrserve_service import launch
    from attrserve_service.config import ConfigError

    config, (log_level, log_format) = server_config(argv)
    try:
        logs.configure(log_level, log_format)
    except ValueError as e:  # (server_config refused what it knows is bad: --log-level, ATTRSERVE_LOG_FORMAT)
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.getLogger("attrserve_service.launch").info("front end malloc: %s", launch.tune_front_malloc(os.environ))
    launched = None
    try:
        if config.engine_process:
            # Nothing so far imported torch or grpc's server. The engine process starts now, so that it imports torch
            # and loads the models while this process imports the server (launch.py). A bad TLS or token setting
            # still fails before any model loads: read here, and again (and logged) by create_server.
            from attrserve_service import auth

            auth.tls_files(config)
            auth.token_auth(config)
            launched = launch.start(config, logs.current())
        from attrserve_service.repository import RepositoryError
        from attrserve_service.server import serve

        try:
            lost = eventloop.run(partial(serve, config, launched), config.event_loop)
        except RepositoryError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if launched is not None:
            launched.close()  # an engine process that the server never took over (it failed to start first)
    return EXIT_LOST if lost else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m attrserve_service.cli`: `serve` here; every other word (and `--help`) as the `attrserve` command, which
    both packages install as attrserve_client.cli:main (so the client commands never import torch)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    from attrserve_client import cli as client_cli

    return client_cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
