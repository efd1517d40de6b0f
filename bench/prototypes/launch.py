"""`attrserve serve` with prototype-only knobs, applied before the server starts (nothing in service/ changes).

    python bench/prototypes/launch.py [--intra N] [--interop N] [--reuseport] -- serve --model-repository ... --port P

--intra: torch.set_num_threads(N) (intra-op threads; OMP_NUM_THREADS in the env does the same for OpenMP)
--interop: torch.set_num_interop_threads(N) (must precede any parallel work)
--reuseport: grpc.aio.server(...) gets ("grpc.so_reuseport", 1) instead of attrserve's 0, so N processes can bind
             one port (the kernel spreads connections across them; each process has its own engine)."""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--intra", type=int)
    p.add_argument("--interop", type=int)
    p.add_argument("--reuseport", action="store_true")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    a = p.parse_args()
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    import torch

    if a.interop:
        torch.set_num_interop_threads(a.interop)
    if a.intra:
        torch.set_num_threads(a.intra)
    if a.reuseport:
        import grpc

        real = grpc.aio.server

        def server(*args, options=None, **kw):
            options = [(k, 1 if k == "grpc.so_reuseport" else v) for k, v in (options or [])]
            return real(*args, options=options, **kw)

        grpc.aio.server = server
    from attrserve_service.cli import main as attrserve_main

    return attrserve_main(rest)


if __name__ == "__main__":
    sys.exit(main())
