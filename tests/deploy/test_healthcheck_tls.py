"""The image's HEALTHCHECK (deploy/docker/healthcheck.py) against real servers configured as a container configures
them, by ATTRSERVE_* variables: TLS, mutual TLS and tokens for health (--auth-health). The server's ServerConfig is
read from the very variables the healthcheck gets (attrserve_service.cli.server_config), with only its port and
models set by the test. The healthcheck runs as the HEALTHCHECK runs it: `python healthcheck.py` in that environment.
After a refused check the server still answers a correct request with Captum's numbers and health is SERVING."""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attrserve_client import AttributionClient
from attrserve_engine import EngineLimits
from attrserve_service.cli import server_config
from certs import CertificateAuthority
from servers import ROOT, ServerThread

HEALTHCHECK = ROOT / "deploy" / "docker" / "healthcheck.py"
X = np.array([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]], dtype=np.float32)
TARGET = [0, 1]
MODEL = """
import torch
from torch import nn


def build_model():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
"""
TOKEN = "healthcheck-test-token-0123456789"
ADMIN_TOKEN = "healthcheck-test-admin-9876543210"
TOKEN_VARIABLE = "ATTRSERVE_TEST_HEALTHCHECK_TOKENS"  # named by ATTRSERVE_AUTH_TOKEN_ENV


def captum() -> np.ndarray:
    namespace: dict = {}
    exec(MODEL, namespace)
    return IntegratedGradients(namespace["build_model"]()).attribute(torch.from_numpy(X), target=TARGET).numpy()


def dns_only_certificate(ca: CertificateAuthority, name: str) -> tuple[bytes, bytes]:
    """A server certificate that names only the DNS name `name` (not 127.0.0.1), for server and client authentication
    (as an internal CA may issue one): the healthcheck must check it as `name`, and may present it to the server."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem


class Container:
    """A server configured by `variables` (ATTRSERVE_*), and the environment its healthcheck runs in."""

    def __init__(self, variables: dict[str, str], repo: Path) -> None:
        self.variables = variables
        config = server_config([], variables)[0]
        limits = EngineLimits(default_device="cpu", probe_batch_rows=False)
        config = dataclasses.replace(config, host="127.0.0.1", port=0, metrics_port=None, model_repository=repo, engine_process=False,
                                     limits=limits)
        self.server = ServerThread(None, config)
        self.port = self.server.running.port

    def healthcheck(self, drop: tuple[str, ...] = (), **extra: str) -> subprocess.CompletedProcess:
        """`python healthcheck.py` in the container's environment, with `extra` variables and without `drop`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRSERVE_")}
        env.update(self.variables, ATTRSERVE_HOST="0.0.0.0", ATTRSERVE_PORT=str(self.port), **extra)
        for name in drop:
            del env[name]
        if TOKEN_VARIABLE in os.environ:
            env[TOKEN_VARIABLE] = os.environ[TOKEN_VARIABLE]
        return subprocess.run([sys.executable, str(HEALTHCHECK), "--timeout", "10"], env=env, capture_output=True, text=True,
                              timeout=60)

    def still_serving(self, **client_args) -> None:
        """A correct request gets Captum's numbers, and health is SERVING."""
        with AttributionClient(f"127.0.0.1:{self.port}", **client_args) as client:
            answer = client.attribute("m", "integrated_gradients", X, target=TARGET, timeout=60)
            np.testing.assert_allclose(answer.attributions, captum(), atol=1e-5)
            reply = health_pb2_grpc.HealthStub(client._channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("healthcheck")
    (folder / "repo" / "m").mkdir(parents=True)
    (folder / "repo" / "m" / "model.py").write_text(MODEL)
    (folder / "repo" / "m" / "config.pbtxt").write_text('inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 4 }\n')
    return folder


@pytest.fixture(scope="module")
def ca(folder) -> CertificateAuthority:
    ca = CertificateAuthority("healthcheck test CA")
    ca.write(folder, "ca")
    return ca


@pytest.fixture(scope="module")
def tls(folder, ca) -> Iterator[Container]:
    """TLS, as the audit found it: a certificate for 127.0.0.1 and localhost, nothing else."""
    cert, key = ca.issue("attrserve", server=True).write(folder, "tls")
    container = Container({"ATTRSERVE_TLS_CERT": str(cert), "ATTRSERVE_TLS_KEY": str(key)}, folder / "repo")
    yield container
    container.stop()


@pytest.fixture(scope="module")
def named_mtls_tokens(folder, ca) -> Iterator[Container]:
    """Mutual TLS with a certificate that names only attrserve.internal (for server and client authentication), tokens
    from a file, health behind a token."""
    cert, key = folder / "named.crt", folder / "named.key"
    cert_pem, key_pem = dns_only_certificate(ca, "attrserve.internal")
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    (folder / "tokens").write_text(f"# the healthcheck's pick: any of them\n{TOKEN}  # batch\n")
    (folder / "admins").write_text(f"{ADMIN_TOKEN}\n")
    variables = {
        "ATTRSERVE_TLS_CERT": str(cert),
        "ATTRSERVE_TLS_KEY": str(key),
        "ATTRSERVE_TLS_CLIENT_CA": str(folder / "ca.crt"),
        "ATTRSERVE_AUTH_TOKENS_FILE": str(folder / "tokens"),
        "ATTRSERVE_ADMIN_TOKENS_FILE": str(folder / "admins"),
        "ATTRSERVE_AUTH_HEALTH": "1",
    }
    container = Container(variables, folder / "repo")
    yield container
    container.stop()


@pytest.fixture(scope="module")
def mtls_env_token(folder, ca) -> Iterator[Container]:
    """Mutual TLS with a server certificate for server authentication only, tokens from a variable, health behind a
    token: the healthcheck needs a client certificate of its own."""
    cert, key = ca.issue("attrserve", server=True).write(folder, "server")
    client_cert, client_key = ca.issue("healthcheck").write(folder, "healthcheck")
    variables = {
        "ATTRSERVE_TLS_CERT": str(cert),
        "ATTRSERVE_TLS_KEY": str(key),
        "ATTRSERVE_TLS_CLIENT_CA": str(folder / "ca.crt"),
        "ATTRSERVE_AUTH_TOKEN_ENV": TOKEN_VARIABLE,
        "ATTRSERVE_AUTH_HEALTH": "1",
    }
    os.environ[TOKEN_VARIABLE] = f" {TOKEN}, other-token-abcdef"
    container = Container(variables, folder / "repo")
    container.client_files = (client_cert, client_key)
    yield container
    container.stop()
    del os.environ[TOKEN_VARIABLE]


def test_a_tls_server_is_checked_over_tls(tls, folder) -> None:
    check = tls.healthcheck()
    assert check.returncode == 0 and check.stdout.strip() == f"127.0.0.1:{tls.port}: SERVING", check.stdout + check.stderr
    tls.still_serving(root_certificates=folder / "ca.crt")


def test_a_certificate_without_the_address_is_checked_as_its_name_and_health_gets_a_token(named_mtls_tokens, folder) -> None:
    # The certificate names attrserve.internal only; its client CA signed it for client authentication too, so the
    # healthcheck presents it. Health needs a token: one of the token file's.
    check = named_mtls_tokens.healthcheck()
    assert check.returncode == 0 and "SERVING" in check.stdout, check.stdout + check.stderr
    # Only admin tokens: the healthcheck takes one of them (they are accepted everywhere).
    only_admin = named_mtls_tokens.healthcheck(drop=("ATTRSERVE_AUTH_TOKENS_FILE",))
    assert only_admin.returncode == 0 and "SERVING" in only_admin.stdout, only_admin.stdout + only_admin.stderr


def test_mutual_tls_needs_the_healthchecks_own_certificate_and_says_so(mtls_env_token, folder) -> None:
    refused = mtls_env_token.healthcheck()
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "UNAVAILABLE" in refused.stderr and "ATTRSERVE_HEALTHCHECK_TLS_CERT" in refused.stderr, refused.stderr
    mtls_env_token.still_serving(root_certificates=folder / "ca.crt", client_cert=mtls_env_token.client_files, token=TOKEN)
    cert, key = mtls_env_token.client_files
    check = mtls_env_token.healthcheck(ATTRSERVE_HEALTHCHECK_TLS_CERT=str(cert), ATTRSERVE_HEALTHCHECK_TLS_KEY=str(key))
    assert check.returncode == 0 and "SERVING" in check.stdout, check.stdout + check.stderr
    # A token the server does not accept is refused (UNAUTHENTICATED): health does need it here.
    os.environ[TOKEN_VARIABLE], kept = "not-the-servers-token", os.environ[TOKEN_VARIABLE]
    try:
        wrong = mtls_env_token.healthcheck(ATTRSERVE_HEALTHCHECK_TLS_CERT=str(cert), ATTRSERVE_HEALTHCHECK_TLS_KEY=str(key))
    finally:
        os.environ[TOKEN_VARIABLE] = kept
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr, wrong.stdout + wrong.stderr
    mtls_env_token.still_serving(root_certificates=folder / "ca.crt", client_cert=mtls_env_token.client_files, token=TOKEN)
