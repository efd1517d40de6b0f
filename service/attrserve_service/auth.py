"""Transport security and authentication: TLS / mutual TLS server credentials, and bearer-token auth.

Tokens come as gRPC metadata `authorization: Bearer <token>` and are checked against the accepted set in constant
time (the SHA-256 of the offered token against that of every accepted one, no early exit). Status codes follow gRPC's
meaning: no usable credentials (no header, a malformed one, a token that is not accepted) → UNAUTHENTICATED; a valid
token that may not call the method (a normal token on LoadModel/UnloadModel when admin tokens are configured) →
PERMISSION_DENIED. Messages never repeat the token. Health is exempt unless `auth_health`.

methods.py checks the token inside what counts a call: a refusal is counted once in grpc_server_handled_total with its
code.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from attrserve_service.config import ConfigError, ServerConfig

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
REPOSITORY_SERVICE = "attrserve.v1.ModelRepositoryService"
# Methods that change what the server serves: with admin tokens configured, only they may call these.
ADMIN_METHODS = frozenset({f"/{REPOSITORY_SERVICE}/LoadModel", f"/{REPOSITORY_SERVICE}/UnloadModel"})
_TOKEN = re.compile(r"[\x21-\x7e]+")  # one word of visible ASCII: what a metadata value can carry
_TRAILING_COMMENT = re.compile(r"\s+#")


def _read(path: Path, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{setting} {path}: cannot be read ({e.strerror or type(e).__name__})") from None


def _pem(path: Path, setting: str, kind: str) -> bytes:
    data = _read(path, setting)
    if not re.search(rb"-----BEGIN [A-Z ]*" + kind.encode() + rb"-----", data):
        raise ConfigError(f"{setting} {path}: not a PEM {kind.lower()}")
    return data


def _usable(cert: Path, key: Path, client_ca: Path | None) -> None:
    """What gRPC would refuse only once the models have loaded, as it binds the port (saying "Invalid private key" in
    its own log, and nothing of which file), and a certificate no client accepts ever again: checked with the ssl
    module."""
    for path, setting in ((cert, "--tls-cert"), (client_ca, "--tls-client-ca")):
        if path is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
            except ssl.SSLError as e:
                raise ConfigError(f"{setting} {path}: holds a certificate that cannot be decoded ({_why(e)})") from None
    decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]  # the first certificate: the server's
    now = time.time()
    if ssl.cert_time_to_seconds(decoded["notAfter"]) < now:
        raise ConfigError(f"--tls-cert {cert}: the certificate expired on {decoded['notAfter']}")
    if ssl.cert_time_to_seconds(decoded["notBefore"]) > now:  # (a clock behind the issuer's: it serves once valid)
        log.warning("--tls-cert %s: the certificate is not valid until %s: clients refuse it until then", cert, decoded["notBefore"])

    def encrypted() -> bytes:
        raise ConfigError(f"--tls-key {key}: is encrypted; gRPC needs the key unencrypted")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # what gRPC takes and OpenSSL's level would refuse: a 1024-bit RSA key, say
    try:
        context.load_cert_chain(cert, key, password=encrypted)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"--tls-key {key}: is not the key of the certificate in --tls-cert {cert}") from None
        raise ConfigError(f"--tls-key {key}: not a usable private key ({_why(e)})") from None


def _why(error: ssl.SSLError) -> str:
    return error.reason.lower().replace("_", " ") if error.reason else "malformed PEM"


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (and --tls-client-ca: mutual TLS); None: plaintext."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (client certificates are checked over TLS)")
        return None
    if config.tls_cert is None:
        raise ConfigError("--tls-key is set but --tls-cert is not: TLS needs both")
    if config.tls_key is None:
        raise ConfigError("--tls-cert is set but --tls-key is not: TLS needs both")
    cert = _pem(config.tls_cert, "--tls-cert", "CERTIFICATE")
    key = _pem(config.tls_key, "--tls-key", "PRIVATE KEY")
    client_ca = None if config.tls_client_ca is None else _pem(config.tls_client_ca, "--tls-client-ca", "CERTIFICATE")
    _usable(config.tls_cert, config.tls_key, config.tls_client_ca)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None)


def read_tokens(path: Path, setting: str = "--auth-tokens-file") -> frozenset[str]:
    """The tokens of a file: one a line; blank lines and `#` comments (whole lines, or after a token and a space) ignored."""
    try:
        text = _read(path, setting).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{setting} {path}: not UTF-8 text") from None
    tokens = set()
    for number, line in enumerate(text.splitlines(), 1):
        token = _TRAILING_COMMENT.split(line, maxsplit=1)[0].strip()
        if not token or token.startswith("#"):
            continue
        if not _TOKEN.fullmatch(token):  # the message names the line, never the token
            raise ConfigError(f"{setting} {path} line {number}: a token is one word of visible ASCII characters")
        tokens.add(token)
    return frozenset(tokens)


def env_tokens(name: str, environ: dict[str, str] | None = None) -> frozenset[str]:
    """The comma-separated tokens of the environment variable `name`."""
    environ = dict(os.environ if environ is None else environ)
    if not name:  # (an empty ATTRSERVE_AUTH_TOKEN_ENV turned auth off without a word)
        raise ConfigError("--auth-token-env is empty: give the name of the environment variable that holds the tokens")
    if name not in environ:
        raise ConfigError(f"--auth-token-env: the environment variable {name} is not set")
    tokens = {part.strip() for part in environ[name].split(",") if part.strip()}
    if not all(_TOKEN.fullmatch(t) for t in tokens):
        raise ConfigError(f"--auth-token-env: {name} holds a token that is not one word of visible ASCII characters")
    return frozenset(tokens)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _accepted(offered: bytes, digests: Sequence[bytes]) -> bool:
    """Whether `offered` (a digest) is one of `digests`: every one is compared, whatever matched before."""
    found = False
    for digest in digests:
        found |= hmac.compare_digest(offered, digest)
    return found


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> tuple[str | None, str]:
    """The bearer token of a call's metadata, or None and why there is none usable (a message without the token)."""
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if not values:
        return None, "this call needs a bearer token (metadata 'authorization: Bearer <token>')"
    if len(values) > 1:
        return None, "more than one authorization header"
    value = values[0].decode("ascii", "replace") if isinstance(values[0], bytes) else str(values[0])
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN.fullmatch(token):
        return None, "the authorization header is not 'Bearer <token>'"
    return token, ""


class TokenAuth:
    """Which calls may go on: those with an accepted bearer token; with admin tokens, ADMIN_METHODS need one of them.
    methods.py asks it before each call of a service it guards (all but `exempt_services`)."""

    def __init__(
        self, tokens: Iterable[str], admin_tokens: Iterable[str] = (), *, exempt_services: Iterable[str] = (HEALTH_SERVICE,)
    ) -> None:
        admin = frozenset(admin_tokens)
        accepted = frozenset(tokens) | admin
        if not accepted:
            raise ConfigError("token auth is on but no token is accepted (the token file or variable is empty)")
        self._accepted = tuple(_digest(t) for t in sorted(accepted))
        self._admin = tuple(_digest(t) for t in sorted(admin))
        self.exempt_services = frozenset(exempt_services)

    def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may go on; else its status code and message."""
        token, why = bearer_token(metadata)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, why
        offered = _digest(token)
        if not _accepted(offered, self._accepted):
            return grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not accepted"
        if self._admin and method in ADMIN_METHODS and not _accepted(offered, self._admin):
            return grpc.StatusCode.PERMISSION_DENIED, f"{method.rpartition('/')[2]} needs an admin token"
        return None


def token_auth(config: ServerConfig, environ: dict[str, str] | None = None) -> TokenAuth | None:
    """The token check the settings ask for; None when no token source is set (auth off)."""
    if config.auth_tokens_file is None and config.admin_tokens_file is None and config.auth_token_env is None:
        if config.auth_health:
            raise ConfigError("--auth-health needs tokens: --auth-tokens-file, --auth-token-env or --admin-tokens-file")
        return None
    tokens: frozenset[str] = frozenset()
    if config.auth_tokens_file is not None:
        tokens |= read_tokens(config.auth_tokens_file, "--auth-tokens-file")
    if config.auth_token_env is not None:
        tokens |= env_tokens(config.auth_token_env, environ)
    admin = frozenset() if config.admin_tokens_file is None else read_tokens(config.admin_tokens_file, "--admin-tokens-file")
    if config.admin_tokens_file is not None and not admin:
        raise ConfigError(f"--admin-tokens-file {config.admin_tokens_file}: holds no token")
    return TokenAuth(tokens, admin, exempt_services=() if config.auth_health else (HEALTH_SERVICE,))


@dataclass(frozen=True)
class ServerSecurity:
    """What create_server binds and checks calls with: read from the settings before anything loads, so a bad
    setting fails at once (ConfigError)."""

    credentials: grpc.ServerCredentials | None  # None: plaintext
    auth: TokenAuth | None  # None: no token auth

    @classmethod
    def from_config(cls, config: ServerConfig, environ: dict[str, str] | None = None) -> ServerSecurity:
        security = cls(server_credentials(config), token_auth(config, environ))
        log.info(
            "transport: %s; token auth: %s",
            "plaintext" if security.credentials is None else "mutual TLS" if config.tls_client_ca is not None else "TLS",
            "off" if security.auth is None else "on" + (", admin tokens for model control" if security.auth._admin else ""),
        )
        return security
