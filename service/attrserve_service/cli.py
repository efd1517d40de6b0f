"""`attrserve` command: `serve` runs the server; `attribute` and `models` call one (from attrserve-client)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Sequence

from attrserve_engine import EngineLimits


def _serve_parser() -> argparse.ArgumentParser:
    defaults = EngineLimits()
    p = argparse.ArgumentParser(prog="attrserve serve", description="Serve model explanations over gRPC.")
    p.add_argument("--model-repository", type=Path, help="folder of model folders (default: the built-in demo models)")
    p.add_argument("--plugins", action="append", default=[], metavar="PATH",
                   help="algorithm plugin: a .py file, a folder of them, or a module path (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics port (-1: off)")
    p.add_argument("--device", default="auto", help="default device for models: auto (CUDA when present), cpu, cuda:0, ...")
    p.add_argument("--max-batch-rows", type=int, default=defaults.default_max_batch_rows,
                   help="rows per fused pass for models whose size is neither configured nor measured")
    p.add_argument("--no-batch-probe", action="store_true",
                   help="do not measure each model's best pass size at load (config.pbtxt max_batch_rows always wins)")
    p.add_argument("--max-queue-delay-us", type=int, default=defaults.default_max_queue_delay_us,
                   help="default longest wait for company before a pass is cut")
    p.add_argument("--max-rows-per-request", type=int, default=defaults.max_rows_per_request)
    p.add_argument("--max-n-steps", type=int, default=defaults.max_n_steps)
    p.add_argument("--max-nt-samples", type=int, default=defaults.max_nt_samples)
    p.add_argument("--max-request-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--grace-seconds", type=float, default=10.0,
                   help="on SIGTERM, how long in-flight requests may take to finish before they are cancelled")
    p.add_argument("--worker-restart-delay", type=float, default=defaults.worker_restart_delay_s, metavar="SECONDS",
                   help="a device worker that died restarts after this long (doubling while it keeps dying)")
    p.add_argument("--log-level", default="INFO")
    return p


def serve_main(argv: Sequence[str]) -> int:
    from attrserve_service.config import RepositoryError, ServerConfig
    from attrserve_service.server import serve

    args = _serve_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = ServerConfig(
        host=args.host,
        port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        model_repository=args.model_repository,
        plugins=args.plugins,
        max_request_bytes=args.max_request_bytes,
        grace_seconds=args.grace_seconds,
        limits=EngineLimits(
            max_n_steps=args.max_n_steps,
            max_nt_samples=args.max_nt_samples,
            max_rows_per_request=args.max_rows_per_request,
            default_max_batch_rows=args.max_batch_rows,
            default_max_queue_delay_us=args.max_queue_delay_us,
            default_device=args.device,
            probe_batch_rows=not args.no_batch_probe,
            worker_restart_delay_s=args.worker_restart_delay,
        ),
    )
    try:
        asyncio.run(serve(config))
    except RepositoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve", "attribute", "models"}
    if not argv or argv[0] not in commands:
        print("usage: attrserve {serve,attribute,models} [options]  (attrserve COMMAND --help)", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve_main(rest)
    from attrserve_client import cli as client_cli

    return client_cli.main(rest) if command == "attribute" else client_cli.models_main(rest)


if __name__ == "__main__":
    sys.exit(main())
