"""The container's HEALTHCHECK: one Check on the standard gRPC health service of the server in this container.

Exit 0 when the server answers SERVING (every model loaded and warm, its device worker up), 1 otherwise. It
connects where `attrserve serve` listens: ATTRSERVE_PORT (default 50051) on ATTRSERVE_HOST, or on 127.0.0.1
when that is a wildcard address. Kubernetes does not use it: its probes call the same service natively
(deploy/k8s/base/deployment.yaml).

    python healthcheck.py [--timeout SECONDS] [ADDRESS]
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def default_address() -> str:
    host = os.environ.get("ATTRSERVE_HOST", "127.0.0.1")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{os.environ.get('ATTRSERVE_PORT', '50051')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default=None, help="host:port (default: from ATTRSERVE_HOST and ATTRSERVE_PORT)")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    address = args.address or default_address()
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"{address}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{address}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
