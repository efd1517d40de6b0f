"""The container's HEALTHCHECK: one Check on the standard gRPC health service of the server in this container.

Exit 0 when the server answers SERVING (every model loaded and warm, its device worker up), 1 otherwise. It
connects where `attrserve serve` listens: ATTRSERVE_PORT (default 50051) on ATTRSERVE_HOST, or on 127.0.0.1
when that is a wildcard address. On Kubernetes the base's probes call the same service natively (plaintext, no
client certificate, no token: deploy/k8s/base/deployment.yaml); deploy/k8s/components/tls, mutual-tls and
exec-probes run this script as exec probes instead.

It speaks to the server as the server's ATTRSERVE_* variables configure it, read by the server's own code
(attrserve_service.cli.server_config and attrserve_service.auth, in the image's virtualenv); flags given as the
container's command are not seen here, so give these settings as variables:

- TLS (ATTRSERVE_TLS_CERT, ATTRSERVE_TLS_KEY): the server's own certificate (ATTRSERVE_TLS_CERT) is the root it
  trusts, and where the address is not one of the names in that certificate (127.0.0.1 for a certificate that
  names only a DNS name), the certificate's first name is the name checked (gRPC's ssl_target_name_override).
- Mutual TLS (ATTRSERVE_TLS_CLIENT_CA): the server accepts only a client certificate that CA signed, and the
  image holds none of its own. The healthcheck presents ATTRSERVE_HEALTHCHECK_TLS_CERT and
  ATTRSERVE_HEALTHCHECK_TLS_KEY (variables of the healthcheck only; the server ignores them) where they are set,
  else the server's own certificate and key, which the server accepts only where the client CA signed that
  certificate for client authentication too (extended key usage clientAuth, or none).
- Tokens with ATTRSERVE_AUTH_HEALTH=1: a token the server accepts, from its own sources (ATTRSERVE_AUTH_TOKEN_ENV,
  ATTRSERVE_AUTH_TOKENS_FILE, then ATTRSERVE_ADMIN_TOKENS_FILE). Without ATTRSERVE_AUTH_HEALTH health needs none
  and none is sent.

    python healthcheck.py [--timeout SECONDS] [ADDRESS]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

# The healthcheck's own client certificate for a server that requires mutual TLS (PEM files).
CLIENT_CERT = "ATTRSERVE_HEALTHCHECK_TLS_CERT"
CLIENT_KEY = "ATTRSERVE_HEALTHCHECK_TLS_KEY"


class HealthcheckError(Exception):
    """A setting the healthcheck cannot use; its message says which."""


def default_address() -> str:
    host = os.environ.get("ATTRSERVE_HOST", "127.0.0.1")
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{os.environ.get('ATTRSERVE_PORT', '50051')}"


def _server_config() -> Any:
    """The server's ServerConfig from this environment, read as `attrserve serve` reads it (without flags)."""
    from attrserve_service.cli import server_config

    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            return server_config([])[0]
    except SystemExit:  # argparse's usage, then what is wrong with an ATTRSERVE_* variable (the server would not start)
        why = printed.getvalue().strip().splitlines()[-1:] or ["?"]
        raise HealthcheckError(f"the server would not start with these ATTRSERVE_* variables: {why[0]}") from None


def _host(address: str) -> str:
    """The host of `host:port` (an IPv6 address without its brackets)."""
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") else address
    return host.strip("[]")


def _certificate_names(cert: Path) -> tuple[list[str], list[str]]:
    """The DNS names (subjectAltName, else the common name) and the IP addresses a certificate names. Read with the
    ssl module's own decoder of PEM certificates (the image has no `cryptography`); ([], []) if it cannot."""
    try:
        decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
    except Exception:
        return [], []
    alt = decoded.get("subjectAltName", ())
    dns = [value for kind, value in alt if kind == "DNS"]
    ips = [value.strip() for kind, value in alt if kind == "IP Address"]
    if not dns:
        dns = [value for rdn in decoded.get("subject", ()) for key, value in rdn if key == "commonName"]
    return dns, ips


def _is_named(host: str, dns: list[str], ips: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return any(host.lower() == name.lower() or (name.startswith("*.") and host.lower().endswith(name[1:].lower())) for name in dns)
    named = set()
    for ip in ips:
        try:
            named.add(ipaddress.ip_address(ip))
        except ValueError:
            continue
    return address in named


def _override(host: str, cert: Path) -> str | None:
    """The name to check the server's certificate against where `host` is not one it names: its first DNS name (a
    wildcard's with `healthcheck` for its `*`)."""
    dns, ips = _certificate_names(cert)
    if _is_named(host, dns, ips) or not dns:
        return None
    name = dns[0]
    return "healthcheck" + name[1:] if name.startswith("*.") else name


def _read(path: Path, variable: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise HealthcheckError(f"{variable}={str(path)!r}: cannot be read ({e.strerror or type(e).__name__})") from None


def connection(config: Any, address: str, environ: dict[str, str]) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]], str]:
    """The channel credentials (None: plaintext), channel options and a description of them, for `config`."""
    if config.tls_cert is None:
        return None, [], "plaintext"
    if config.tls_key is None:
        raise HealthcheckError("ATTRSERVE_TLS_CERT is set but ATTRSERVE_TLS_KEY is not: the server does not start so")
    root = _read(config.tls_cert, "ATTRSERVE_TLS_CERT")
    options = []
    if (name := _override(_host(address), config.tls_cert)) is not None:
        options.append(("grpc.ssl_target_name_override", name))
    described = "TLS, trusting ATTRSERVE_TLS_CERT" + (f" as {name}" if name else "")
    if config.tls_client_ca is None:
        return grpc.ssl_channel_credentials(root), options, described
    if environ.get(CLIENT_CERT) or environ.get(CLIENT_KEY):
        if not (environ.get(CLIENT_CERT) and environ.get(CLIENT_KEY)):
            raise HealthcheckError(f"{CLIENT_CERT} and {CLIENT_KEY} go together: set both")
        cert = _read(Path(environ[CLIENT_CERT]), CLIENT_CERT)
        key = _read(Path(environ[CLIENT_KEY]), CLIENT_KEY)
        described = f"mutual {described}, presenting {CLIENT_CERT}"
    else:
        cert, key = root, _read(config.tls_key, "ATTRSERVE_TLS_KEY")
        described = f"mutual {described}, presenting the server's own certificate (no {CLIENT_CERT})"
    return grpc.ssl_channel_credentials(root, private_key=key, certificate_chain=cert), options, described


def health_token(config: Any, environ: dict[str, str]) -> str | None:
    """A token the server accepts for health, where health needs one (--auth-health); None where it needs none."""
    from attrserve_service import auth
    from attrserve_service.config import ConfigError

    if not config.auth_health:
        return None
    try:
        if config.auth_token_env and (tokens := auth.env_tokens(config.auth_token_env, environ)):
            return min(tokens)
        if config.auth_tokens_file is not None and (tokens := auth.read_tokens(config.auth_tokens_file, "--auth-tokens-file")):
            return min(tokens)
        if config.admin_tokens_file is not None and (tokens := auth.read_tokens(config.admin_tokens_file, "--admin-tokens-file")):
            return min(tokens)
    except ConfigError as e:
        raise HealthcheckError(f"health needs a token (ATTRSERVE_AUTH_HEALTH), and {e}") from None
    raise HealthcheckError("health needs a token (ATTRSERVE_AUTH_HEALTH) but the server's token settings hold none")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", nargs="?", default=None, help="host:port (default: from ATTRSERVE_HOST and ATTRSERVE_PORT)")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    address = args.address or default_address()
    environ = dict(os.environ)
    try:
        config = _server_config()
        credentials, options, described = connection(config, address, environ)
        token = health_token(config, environ)
    except HealthcheckError as e:
        print(f"{address}: {e}", file=sys.stderr)
        return 1
    metadata = None if token is None else (("authorization", f"Bearer {token}"),)
    try:
        with grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials, options) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=args.timeout, metadata=metadata
            )
    except grpc.RpcError as e:
        print(f"{address} ({described}): {e.code().name}: {e.details()}", file=sys.stderr)
        if config.tls_client_ca is not None and e.code() == grpc.StatusCode.UNAVAILABLE:
            print(
                f"{address}: the server requires a client certificate signed by ATTRSERVE_TLS_CLIENT_CA "
                f"({config.tls_client_ca}); if it refused this one, set {CLIENT_CERT} and {CLIENT_KEY} to a client "
                "certificate that CA signed, and its key",
                file=sys.stderr,
            )
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{address}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
