"""Transport security and authentication: TLS / mutual TLS server credentials, and bearer-token auth.

Tokens come as gRPC metadata `authorization: Bearer <token>` and are checked against the accepted set in constant
time (the SHA-256 of the offered token against that of every accepted one, no early exit). Status codes follow gRPC's
meaning: no usable credentials (no header, a malformed one, a token that is not accepted) → UNAUTHENTICATED; a valid
token that may not call the method (a normal token on LoadModel/UnloadModel when admin tokens are configured) →
PERMISSION_DENIED. Messages never repeat the token. Health is exempt unless `auth_health`.

The files rotate without a restart (cert-manager renewing a certificate, a Kubernetes Secret's volume swapping its
`..data` link): their (inode, mtime, size) are looked at, through links, at most every CHECK_SECONDS -- by gRPC's
core before a new connection's TLS handshake (TlsFiles.fetch), by the token check on a call (TokenAuth.check) -- and a
set that changed is read again and checked as at start-up. One that passes serves from then on (the certificate: to
new connections; those open keep theirs); one that fails is not used: the last good set goes on, a WARNING names the
setting and why (once per distinct failure), and the files are read again when they change again.

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
import threading
import time
from collections.abc import Callable, Iterable, Sequence
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
# How often the TLS and token files are looked at, at most (their stat): gRPC asks for the certificate before every
# new connection's handshake, and the token check runs on every call.
CHECK_SECONDS = 1.0
LOADED, FAILED = "loaded", "failed"
# What is told of each reload: (kind, outcome): ("tls" or "tokens", LOADED or FAILED); metrics.credentials_reloaded.
Reloaded = Callable[[str, str], None]


def _untold(kind: str, outcome: str) -> None:
    pass


class _Watched:
    """Files re-read when they change: their (st_ino, st_mtime_ns, st_size), through links, compared at most every
    CHECK_SECONDS. Tells each reload's outcome (`reloaded`) and logs it: a failure at WARNING once while it stays the
    same failure, a success at INFO."""

    def __init__(self, kind: str, paths: Iterable[Path], reloaded: Reloaded) -> None:
        self.kind = kind
        self.paths = tuple(paths)
        self.reloaded = reloaded
        self.seen = self._stat()  # before the first read: a change during it is seen at the first look
        self.next_look = time.monotonic() + CHECK_SECONDS
        self.complaint = ""  # the failure logged last, until a set is taken

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        found: list[tuple[int, int, int] | None] = []
        for path in self.paths:
            try:
                st = os.stat(path)
                found.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:  # (missing for a moment: the read says why, if it still is)
                found.append(None)
        return tuple(found)

    def changed(self) -> bool:
        """Whether the files changed since they were last read (then they are read now); False until CHECK_SECONDS
        have passed since the last look."""
        now = time.monotonic()
        if now < self.next_look:
            return False
        self.next_look = now + CHECK_SECONDS
        seen = self._stat()
        if seen == self.seen:
            return False
        self.seen = seen
        return True

    def steady(self) -> bool:
        """Whether the files are still as they were before this read: if not, what was read is not used (neither
        taken nor a failure); the next look reads them again."""
        return self._stat() == self.seen

    def failed(self, error: ConfigError) -> None:
        self.reloaded(self.kind, FAILED)
        if str(error) != self.complaint:
            self.complaint = str(error)
            what = "TLS" if self.kind == "tls" else "token"
            log.warning("%s files changed but are not used (the last good ones are, until the files change again): %s", what, error)

    def loaded(self, message: str, *args: object) -> None:
        self.complaint = ""
        self.reloaded(self.kind, LOADED)
        log.info(message, *args)


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


def _usable(cert: Path, key: Path, client_ca: Path | None) -> str:
    """What gRPC would refuse only once the models have loaded, as it binds the port (saying "Invalid private key" in
    its own log, and nothing of which file), and a certificate no client accepts ever again: checked with the ssl
    module. The certificate's notAfter."""
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
    return str(decoded["notAfter"])


def _why(error: ssl.SSLError) -> str:
    return error.reason.lower().replace("_", " ") if error.reason else "malformed PEM"


class TlsFiles:
    """The certificate, key and client CA the server serves TLS with (--tls-cert, --tls-key, --tls-client-ca), read
    and checked at start-up (ConfigError), then followed as they rotate: gRPC's core calls `fetch` before every new
    connection's handshake."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None, reloaded: Reloaded = _untold) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._watched = _Watched("tls", (cert, key) if client_ca is None else (cert, key, client_ca), reloaded)
        self._pems, not_after = self._read()
        self.not_after = ssl.cert_time_to_seconds(not_after)  # of the certificate served: Unix time
        self._fetching = threading.Lock()

    def _read(self) -> tuple[tuple[bytes, ...], str]:
        """The files' PEMs (certificate, key[, client CA]) and the certificate's notAfter; ConfigError if unusable."""
        pems: tuple[bytes, ...] = (_pem(self.cert, "--tls-cert", "CERTIFICATE"), _pem(self.key, "--tls-key", "PRIVATE KEY"))
        if self.client_ca is not None:
            pems += (_pem(self.client_ca, "--tls-client-ca", "CERTIFICATE"),)
        return pems, _usable(self.cert, self.key, self.client_ca)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, *client_ca = self._pems
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca[0] if client_ca else None)

    def credentials(self) -> grpc.ServerCredentials:
        mutual = self.client_ca is not None
        # (the stub's fetcher returns a configuration; gRPC's documentation and code take None: no change)
        return grpc.dynamic_ssl_server_credentials(self._configuration(), self.fetch, require_client_authentication=mutual)  # type: ignore[arg-type]

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: the new configuration when the files changed and pass the start-up checks, else None (no
        change). Runs on gRPC's threads; nothing it raises may reach them (gRPC would log a traceback per connection)."""
        if not self._fetching.acquire(blocking=False):  # another connection's handshake is looking
            return None
        try:
            return self._fetch()
        except Exception:
            log.exception("TLS files: checking them failed (the last good ones serve on)")
            return None
        finally:
            self._fetching.release()

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        watched = self._watched
        if not watched.changed():
            return None
        try:
            pems, not_after = self._read()
        except ConfigError as e:
            if watched.steady():  # (else half written as it was read: read again at the next look)
                watched.failed(e)
            return None
        if not watched.steady():  # changing while read: read again at the next look
            return None
        if pems == self._pems:  # the set served (a Secret synced again, or a bad set undone)
            watched.complaint = ""
            return None
        self._pems, self.not_after = pems, ssl.cert_time_to_seconds(not_after)
        ca = "" if self.client_ca is None else f", --tls-client-ca {self.client_ca}"
        watched.loaded("TLS files reloaded: --tls-cert %s, --tls-key %s%s; the certificate expires %s", self.cert, self.key, ca, not_after)
        return self._configuration()


def tls_files(config: ServerConfig, reloaded: Reloaded = _untold) -> TlsFiles | None:
    """The TLS files of --tls-cert/--tls-key (and --tls-client-ca: mutual TLS), checked; None: plaintext."""
    if config.tls_cert is None and config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key (client certificates are checked over TLS)")
        return None
    if config.tls_cert is None:
        raise ConfigError("--tls-key is set but --tls-cert is not: TLS needs both")
    if config.tls_key is None:
        raise ConfigError("--tls-cert is set but --tls-key is not: TLS needs both")
    return TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca, reloaded)


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
        self._accepted, self._admin = self._digests(tokens, admin_tokens)
        self.exempt_services = frozenset(exempt_services)
        self._watched: _Watched | None = None  # the token files, where tokens come from files

    @staticmethod
    def _digests(tokens: Iterable[str], admin_tokens: Iterable[str]) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        admin = frozenset(admin_tokens)
        accepted = frozenset(tokens) | admin
        if not accepted:
            raise ConfigError("token auth is on but no token is accepted (the token file or variable is empty)")
        return tuple(_digest(t) for t in sorted(accepted)), tuple(_digest(t) for t in sorted(admin))

    def watch(self, watched: _Watched, read: Callable[[], tuple[frozenset[str], frozenset[str]]]) -> None:
        """Take the tokens and admin tokens `read` returns whenever `watched` (the token files) change."""
        self._watched, self._read = watched, read

    def _reload(self, watched: _Watched) -> None:
        try:
            accepted, admin = self._digests(*self._read())
        except ConfigError as e:
            if watched.steady():  # (else written as it was read: read again at the next look)
                watched.failed(e)
            return
        if not watched.steady():  # changing while read: read again at the next look
            return
        if (accepted, admin) == (self._accepted, self._admin):  # the tokens taken (a Secret synced again, or a bad file undone)
            watched.complaint = ""
            return
        self._accepted, self._admin = accepted, admin
        files = ", ".join(str(path) for path in watched.paths)
        watched.loaded("token files reloaded: %s (%d tokens accepted, %d of them admin)", files, len(accepted), len(admin))

    def check(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may go on; else its status code and message."""
        watched = self._watched
        if watched is not None and watched.changed():  # a stat at most every CHECK_SECONDS, not one a call
            self._reload(watched)
        token, why = bearer_token(metadata)
        if token is None:
            return grpc.StatusCode.UNAUTHENTICATED, why
        offered = _digest(token)
        if not _accepted(offered, self._accepted):
            return grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not accepted"
        if self._admin and method in ADMIN_METHODS and not _accepted(offered, self._admin):
            return grpc.StatusCode.PERMISSION_DENIED, f"{method.rpartition('/')[2]} needs an admin token"
        return None


def token_auth(config: ServerConfig, environ: dict[str, str] | None = None, reloaded: Reloaded = _untold) -> TokenAuth | None:
    """The token check the settings ask for; None when no token source is set (auth off). The token files are read
    again when they change; the variable's tokens stay."""
    if config.auth_tokens_file is None and config.admin_tokens_file is None and config.auth_token_env is None:
        if config.auth_health:
            raise ConfigError("--auth-health needs tokens: --auth-tokens-file, --auth-token-env or --admin-tokens-file")
        return None
    fixed = frozenset() if config.auth_token_env is None else env_tokens(config.auth_token_env, environ)
    files = [path for path in (config.auth_tokens_file, config.admin_tokens_file) if path is not None]

    def read() -> tuple[frozenset[str], frozenset[str]]:
        tokens = fixed
        if config.auth_tokens_file is not None:
            tokens |= read_tokens(config.auth_tokens_file, "--auth-tokens-file")
        admin = frozenset() if config.admin_tokens_file is None else read_tokens(config.admin_tokens_file, "--admin-tokens-file")
        if config.admin_tokens_file is not None and not admin:
            raise ConfigError(f"--admin-tokens-file {config.admin_tokens_file}: holds no token")
        if config.auth_tokens_file is not None and not tokens | admin:
            raise ConfigError(f"--auth-tokens-file {config.auth_tokens_file}: holds no token")
        return tokens, admin

    watched = _Watched("tokens", files, reloaded) if files else None  # (its stat before the read)
    auth = TokenAuth(*read(), exempt_services=() if config.auth_health else (HEALTH_SERVICE,))
    if watched is not None:
        auth.watch(watched, read)
    return auth


@dataclass(frozen=True)
class ServerSecurity:
    """What create_server binds and checks calls with: read from the settings before anything loads, so a bad
    setting fails at once (ConfigError); the files are followed as they rotate, each reload told to `reloaded`."""

    tls: TlsFiles | None  # None: plaintext
    auth: TokenAuth | None  # None: no token auth

    @property
    def credentials(self) -> grpc.ServerCredentials | None:
        """What gRPC binds with (None: plaintext)."""
        return None if self.tls is None else self.tls.credentials()

    @property
    def watched(self) -> tuple[str, ...]:
        """The kinds of credentials read again when their files change: "tls", "tokens"."""
        tls = () if self.tls is None else ("tls",)
        return tls + (() if self.auth is None or self.auth._watched is None else ("tokens",))

    @classmethod
    def from_config(cls, config: ServerConfig, environ: dict[str, str] | None = None, reloaded: Reloaded = _untold) -> ServerSecurity:
        security = cls(tls_files(config, reloaded), token_auth(config, environ, reloaded))
        log.info(
            "transport: %s; token auth: %s",
            "plaintext" if security.tls is None else "mutual TLS" if config.tls_client_ca is not None else "TLS",
            "off" if security.auth is None else "on" + (", admin tokens for model control" if security.auth._admin else ""),
        )
        return security
