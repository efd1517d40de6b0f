"""Security of a real server built from a repository on disk: TLS and mutual TLS, bearer tokens (with admin tokens
for model control), reflection off unless asked, INTERNAL errors that say nothing of the exception, and model
weights that are never unpickled as code. After every refusal the server still answers a correct request with
Captum's numbers and health is SERVING."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import pickle
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_service.kserve import grpc_predict_v2_pb2 as oip
from attrserve_client import AsyncAttributionClient, AttributionClient
from attrserve_client import cli as client_cli
from attrserve_client.tensors import from_tensor_proto
from attrserve_engine import EngineLimits
from attrserve_service import auth
from attrserve_service.auth import ServerSecurity, TokenAuth, bearer_token, read_tokens
from attrserve_service.config import ConfigError, ServerConfig
from attrserve_service.server import create_server
from certs import DAY, CertificateAuthority, SecretVolume, ed448_pair
from servers import ROOT, ServeProcess, ServerThread, scrape

SERVICE = "attrserve.v1.AttributionService"
REPOSITORY = "attrserve.v1.ModelRepositoryService"
X = np.array([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]], dtype=np.float32)
TARGET = [0, 1]
PINNED = 'inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 4 }\n'
SERVING = health_pb2.HealthCheckResponse.SERVING
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
MODEL = """
import torch
from torch import nn


def build_model():
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
"""
USER_TOKEN = "user-token-0123456789abcdef"
ENV_TOKEN = "env-token-fedcba9876543210"
ADMIN_TOKEN = "admin-token-00112233445566778899"
RETIRED_TOKEN = "retired-token-aabbccddeeff"  # in the token file, but commented out
TOKEN_FILE = f"""# attrserve tokens: one a line
{USER_TOKEN}   # the batch pipeline

#{RETIRED_TOKEN}
"""
TOKEN_VARIABLE = "ATTRSERVE_TEST_SECURITY_TOKENS"
# What a plugin's bug carries in its message: it must reach the log, never a client.
SECRET = "SECRET-DETAIL /srv/private/credentials.yaml"
FAILING_PLUGIN = f'''
from attrserve_engine.algorithms.saliency import Saliency


class FailsOnHugeInputs(Saliency):
    """Saliency, except that inputs beyond 1000 hit a bug (a RuntimeError, not an AttributionError: INTERNAL)."""

    name = "fails_on_huge_inputs"

    def plan(self, task):
        if float(task.inputs[0].abs().max()) > 1000:
            raise RuntimeError({SECRET!r})
        return (yield from super().plan(task))


ALGORITHM = FailsOnHugeInputs
'''


class _Payload:
    """Unpickling this calls open(marker, "w"): code execution, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def captum() -> np.ndarray:
    namespace: dict = {}
    exec(MODEL, namespace)
    return IntegratedGradients(namespace["build_model"]()).attribute(torch.from_numpy(X), target=TARGET).numpy()


EXPECTED = captum()


def write_model(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(MODEL)
    (folder / "config.pbtxt").write_text(PINNED)


def start(repo: Path, **settings) -> ServerThread:
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False, drain_seconds=5.0)
    return ServerThread(None, ServerConfig(port=0, metrics_port=0, model_repository=repo, limits=limits, **settings))


def ig(client: AttributionClient):
    return client.attribute("m", "integrated_gradients", X, target=TARGET, timeout=60)


def health(channel: grpc.Channel, metadata=None) -> int:
    request = health_pb2.HealthCheckRequest(service=SERVICE)
    return health_pb2_grpc.HealthStub(channel).Check(request, metadata=metadata, timeout=10).status


def reflection_services(channel: grpc.Channel, metadata=None) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    reply = next(iter(stub.ServerReflectionInfo(requests, metadata=metadata, timeout=10)))
    return {s.name for s in reply.list_services_response.service}


def code_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details() or ""


def handled(server: ServerThread, grpc_type: str, service: str, method: str, code: str) -> float:
    labels = frozenset({"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method, "grpc_code": code}.items())
    return scrape(server.running.metrics_port).get(("grpc_server_handled_total", labels), 0.0)


def still_serving(server: ServerThread | ServeProcess, **client_args) -> None:
    """The server answers a correct request with Captum's numbers, and health is SERVING."""
    with AttributionClient(server.address, **client_args) as client:
        np.testing.assert_allclose(ig(client).attributions, EXPECTED, atol=1e-5)
        assert health(client._channel) == SERVING  # the client's channel sends its token, if any


def _auth(token: str | None):
    return None if token is None else [("authorization", f"Bearer {token}")]


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger_ca = CertificateAuthority("attrserve test CA"), CertificateAuthority("unrelated CA")
    paths = {"ca": ca.write(folder, "ca"), "stranger_ca": stranger_ca.write(folder, "stranger_ca")}
    paths["server_cert"], paths["server_key"] = ca.issue("attrserve test server", server=True).write(folder, "server")
    paths["client_cert"], paths["client_key"] = ca.issue("attrserve test client").write(folder, "client")
    paths["stranger_cert"], paths["stranger_key"] = stranger_ca.issue("stranger").write(folder, "stranger")
    return paths


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("repo")
    write_model(folder / "m")
    return folder


@pytest.fixture(scope="module")
def tls_server(repo, pki) -> Iterator[ServerThread]:
    server = start(repo, tls_cert=pki["server_cert"], tls_key=pki["server_key"], reflection=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_server(repo, pki, tmp_path_factory) -> Iterator[ServerThread]:
    """Mutual TLS and tokens together (the client sends its token as call credentials over TLS)."""
    tokens = tmp_path_factory.mktemp("mtls-tokens") / "tokens"
    tokens.write_text(USER_TOKEN + "\n")
    server = start(repo, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_client_ca=pki["ca"], auth_tokens_file=tokens)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_server(repo, tmp_path_factory) -> Iterator[ServerThread]:
    """Plaintext; tokens from a file (with comments) and a variable; admin tokens for LoadModel/UnloadModel."""
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "tokens").write_text(TOKEN_FILE)
    (folder / "admin").write_text(f"# operators\n{ADMIN_TOKEN}\n")
    os.environ[TOKEN_VARIABLE] = f"{ENV_TOKEN}, "
    try:
        server = start(
            repo,
            model_control="explicit",
            auth_tokens_file=folder / "tokens",
            auth_token_env=TOKEN_VARIABLE,
            admin_tokens_file=folder / "admin",
        )
    finally:
        del os.environ[TOKEN_VARIABLE]  # read once, at start-up
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guarded_health_server(repo, tmp_path_factory) -> Iterator[ServerThread]:
    tokens = tmp_path_factory.mktemp("guarded") / "tokens"
    tokens.write_text(USER_TOKEN + "\n")
    server = start(repo, auth_tokens_file=tokens, auth_health=True, reflection=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def markers(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("markers")
    return {"server": folder / "server-ran-the-pickle", "control": folder / "control-ran-the-pickle"}


@pytest.fixture(scope="module")
def plain_server(repo, markers, tmp_path_factory) -> Iterator[ServerThread]:
    """No security settings (the defaults), a plugin with a bug, and a model whose weights.pt is a malicious pickle."""
    folder = tmp_path_factory.mktemp("plain")
    write_model(folder / "m")
    write_model(folder / "evil")
    torch.save({"0.weight": _Payload(markers["server"])}, folder / "evil" / "weights.pt")
    plugin = folder / "fails_on_huge_inputs.py"
    plugin.write_text(FAILING_PLUGIN)
    # One process, so the test's log capture sees the engine's log lines (the engine process's are checked in
    # test_internal_errors_in_the_engine_process_carry_an_id_not_the_exception).
    server = start(folder, plugins=[str(plugin)], engine_process=False)
    yield server
    server.stop()


# -- TLS ------------------------------------------------------------------------------------------


def test_a_tls_client_gets_captums_numbers_and_plaintext_is_refused(tls_server, pki) -> None:
    with AttributionClient(tls_server.address, root_certificates=pki["ca"]) as client:
        np.testing.assert_allclose(ig(client).attributions, EXPECTED, atol=1e-5)
        assert health(client._channel) == SERVING
        assert {SERVICE, REPOSITORY, "grpc.health.v1.Health"} <= reflection_services(client._channel)  # --reflection
    with AttributionClient(tls_server.address, root_certificates=pki["ca"].read_bytes()) as client:  # PEM bytes too
        np.testing.assert_allclose(ig(client).attributions, EXPECTED, atol=1e-5)

    with AttributionClient(tls_server.address) as plaintext:
        assert code_of(lambda: plaintext.list_models(timeout=10))[0] == grpc.StatusCode.UNAVAILABLE
    still_serving(tls_server, root_certificates=pki["ca"])
    with AttributionClient(tls_server.address, root_certificates=pki["stranger_ca"]) as distrustful:  # not the server's CA
        assert code_of(lambda: distrustful.list_models(timeout=10))[0] == grpc.StatusCode.UNAVAILABLE
    still_serving(tls_server, root_certificates=pki["ca"])


def test_the_async_client_speaks_tls(tls_server, pki) -> None:
    async def main() -> np.ndarray:
        async with AsyncAttributionClient(tls_server.address, root_certificates=pki["ca"]) as client:
            result = await client.attribute("m", "integrated_gradients", X, target=TARGET, timeout=60)
            return result.attributions

    np.testing.assert_allclose(asyncio.run(main()), EXPECTED, atol=1e-5)


def test_mutual_tls_wants_a_client_certificate_from_its_ca(mtls_server, pki) -> None:
    good = {"root_certificates": pki["ca"], "client_cert": (pki["client_cert"], pki["client_key"]), "token": USER_TOKEN}
    with AttributionClient(mtls_server.address, root_certificates=pki["ca"], token=USER_TOKEN) as no_cert:
        assert code_of(lambda: no_cert.list_models(timeout=10))[0] == grpc.StatusCode.UNAVAILABLE
    still_serving(mtls_server, **good)
    stranger = (pki["stranger_cert"], pki["stranger_key"])
    with AttributionClient(mtls_server.address, root_certificates=pki["ca"], client_cert=stranger, token=USER_TOKEN) as wrong_ca:
        assert code_of(lambda: wrong_ca.list_models(timeout=10))[0] == grpc.StatusCode.UNAVAILABLE
    still_serving(mtls_server, **good)
    # The right certificate gets through TLS; the token is still needed (call credentials composed with TLS).
    with AttributionClient(mtls_server.address, root_certificates=pki["ca"], client_cert=good["client_cert"]) as no_token:
        assert code_of(lambda: no_token.list_models(timeout=10))[0] == grpc.StatusCode.UNAUTHENTICATED
    cert_bytes = (pki["client_cert"].read_bytes(), pki["client_key"].read_bytes())
    still_serving(mtls_server, root_certificates=pki["ca"], client_cert=cert_bytes, token=USER_TOKEN)


# -- tokens ---------------------------------------------------------------------------------------


def test_tokens_unauthenticated_without_an_accepted_one(token_server) -> None:
    before = handled(token_server, "unary", SERVICE, "ListModels", "UNAUTHENTICATED")
    details = []
    with grpc.insecure_channel(token_server.address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        for metadata in (
            None,  # no token
            [("authorization", "Bearer not-a-token-we-know")],  # unknown token
            [("authorization", f"Bearer {RETIRED_TOKEN}")],  # commented out in the file
            [("authorization", f"Basic {USER_TOKEN}")],  # not a bearer token
            [("authorization", "Bearer")],  # malformed
            [("authorization", f"Bearer {USER_TOKEN} extra")],  # malformed
        ):
            code, detail = code_of(lambda metadata=metadata: stub.ListModels(pb.ListModelsRequest(), metadata=metadata, timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (metadata, code, detail)
            details.append(detail)
        # A stream is refused the same way.
        request = pb.AttributeStreamRequest(request=AttributionClient.build_request("m", "saliency", X, target=TARGET))
        stream = stub.AttributeStream(iter([request]), metadata=[("authorization", "Bearer nope-nope-nope")], timeout=10)
        code, detail = code_of(lambda: list(stream))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        details.append(detail)
    for detail in details:
        for token in ("not-a-token-we-know", RETIRED_TOKEN, USER_TOKEN, "nope-nope-nope"):
            assert token not in detail
    assert "needs a bearer token" in details[0] and details[1] == "the bearer token is not accepted"
    # Every refusal counted once, with its code.
    assert handled(token_server, "unary", SERVICE, "ListModels", "UNAUTHENTICATED") - before == 6
    assert handled(token_server, "bidi_stream", SERVICE, "AttributeStream", "UNAUTHENTICATED") >= 1
    still_serving(token_server, token=USER_TOKEN)


def test_every_method_of_every_service_needs_a_token(token_server) -> None:
    """Every method the server serves is wrapped where it is registered (methods.Registrar): each refuses a call without
    a token before it reads the request, and counts it. A method registered around the registrar would answer (an
    empty request is a valid message: ServerLive says live) or fail otherwise. Health stays open (exempt by default)."""
    services = [*pb.DESCRIPTOR.services_by_name.values(), *oip.DESCRIPTOR.services_by_name.values()]
    methods = [(service.full_name, method) for service in services for method in service.methods]
    assert len(methods) == 13  # AttributionService 4, ModelRepositoryService 3, GRPCInferenceService 6
    with grpc.insecure_channel(token_server.address) as channel:
        for service, method in methods:
            path = f"/{service}/{method.name}"
            counted = ("bidi_stream" if method.client_streaming else "unary", service, method.name, "UNAUTHENTICATED")
            before = handled(token_server, *counted)
            if method.client_streaming:
                call = lambda path=path: list(channel.stream_stream(path)(iter([b""]), timeout=10))  # noqa: E731
            else:
                call = lambda path=path: channel.unary_unary(path)(b"", timeout=10)  # noqa: E731
            assert code_of(call)[0] == grpc.StatusCode.UNAUTHENTICATED, path
            assert handled(token_server, *counted) == before + 1, path
        assert health(channel) == SERVING
    still_serving(token_server, token=USER_TOKEN)


def test_tokens_from_the_file_and_the_variable_get_captums_numbers(token_server) -> None:
    before = handled(token_server, "unary", SERVICE, "Attribute", "OK")
    for token in (USER_TOKEN, ENV_TOKEN, ADMIN_TOKEN):
        with AttributionClient(token_server.address, token=token) as client:
            np.testing.assert_allclose(ig(client).attributions, EXPECTED, atol=1e-5)
            request = client.build_request("m", "integrated_gradients", X, target=TARGET)
            (answer,) = client.attribute_stream([request], timeout=60)
            assert answer.WhichOneof("result") == "response"
            np.testing.assert_allclose(from_tensor_proto(answer.response.attributions[0]), EXPECTED, atol=1e-5)
    assert handled(token_server, "unary", SERVICE, "Attribute", "OK") - before == 3
    with grpc.insecure_channel(token_server.address) as channel:
        assert health(channel) == SERVING  # health is exempt by default
        assert code_of(lambda: reflection_services(channel, _auth(USER_TOKEN)))[0] == grpc.StatusCode.UNIMPLEMENTED  # off by default


def test_the_async_client_sends_its_token_over_plaintext(token_server) -> None:
    async def main() -> tuple[np.ndarray, str]:
        async with AsyncAttributionClient(token_server.address, token=ENV_TOKEN) as client:
            result = await client.attribute("m", "integrated_gradients", X, target=TARGET, timeout=60)
            request = client.build_request("m", "integrated_gradients", X, target=TARGET)
            answers = [r async for r in client.attribute_stream([request], timeout=60)]
            return result.attributions, answers[0].WhichOneof("result")

    attributions, kind = asyncio.run(main())
    np.testing.assert_allclose(attributions, EXPECTED, atol=1e-5)
    assert kind == "response"

    async def refused() -> grpc.StatusCode:
        async with AsyncAttributionClient(token_server.address, token="not-this-one") as client:
            try:
                await client.list_models(timeout=10)
            except grpc.aio.AioRpcError as e:
                assert "not-this-one" not in (e.details() or "")
                return e.code()
        return grpc.StatusCode.OK

    assert asyncio.run(refused()) == grpc.StatusCode.UNAUTHENTICATED


def test_model_control_needs_an_admin_token(token_server) -> None:
    before = handled(token_server, "unary", REPOSITORY, "LoadModel", "PERMISSION_DENIED")
    with AttributionClient(token_server.address, token=USER_TOKEN) as user:
        assert [s.model for s in user.repository_index(timeout=10)] == ["m"]  # reading the index is not model control
        code, detail = code_of(lambda: user.load_model("m", timeout=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED and detail == "LoadModel needs an admin token"
        assert code_of(lambda: user.unload_model("m", timeout=30))[0] == grpc.StatusCode.PERMISSION_DENIED
    with AttributionClient(token_server.address) as anonymous:
        assert code_of(lambda: anonymous.load_model("m", timeout=30))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert handled(token_server, "unary", REPOSITORY, "LoadModel", "PERMISSION_DENIED") - before == 1
    assert handled(token_server, "unary", REPOSITORY, "UnloadModel", "PERMISSION_DENIED") >= 1
    still_serving(token_server, token=USER_TOKEN)
    with AttributionClient(token_server.address, token=ADMIN_TOKEN) as admin:
        statuses = admin.load_model("m", timeout=60)  # a reload: the new load serves once warm
        assert [(s.model, pb.ModelState.Name(s.state)) for s in statuses] == [("m", "MODEL_STATE_READY")]
    still_serving(token_server, token=USER_TOKEN)


def health_watch(channel: grpc.Channel, metadata=None) -> int:
    """The first status health's Watch streams (a server-streaming method)."""
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), metadata=metadata, timeout=10)
    try:
        return next(iter(stream)).status
    finally:
        stream.cancel()


def test_health_and_reflection_need_a_token_with_auth_health(guarded_health_server) -> None:
    """Every kind of method is checked (unary Check, server-streaming Watch, bidi reflection), and each refusal is
    counted with its status (methods.py wraps each method once, where it is registered)."""
    server = guarded_health_server
    methods = [
        ("unary", "grpc.health.v1.Health", "Check", 1),
        ("server_stream", "grpc.health.v1.Health", "Watch", 2),
        ("bidi_stream", REFLECTION, "ServerReflectionInfo", 1),
    ]
    before = {m: handled(server, *m[:3], "UNAUTHENTICATED") for m in methods}
    with grpc.insecure_channel(server.address) as channel:
        assert code_of(lambda: health(channel))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert health(channel, _auth(USER_TOKEN)) == SERVING
        assert code_of(lambda: health_watch(channel))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: health_watch(channel, _auth("wrong-token-123")))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert health_watch(channel, _auth(USER_TOKEN)) == SERVING
        assert code_of(lambda: reflection_services(channel))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert SERVICE in reflection_services(channel, _auth(USER_TOKEN))
    for m in methods:
        assert handled(server, *m[:3], "UNAUTHENTICATED") == before[m] + m[3], m
    assert handled(server, "unary", "grpc.health.v1.Health", "Check", "OK") >= 1
    still_serving(server, token=USER_TOKEN)


def test_the_cli_connects_with_tokens_and_certificates(token_server, mtls_server, tls_server, pki, capsys, monkeypatch) -> None:
    monkeypatch.delenv("ATTRSERVE_TOKEN", raising=False)
    assert client_cli.models_main(["--target-address", token_server.address, "--token", USER_TOKEN, "--json"]) == 0
    assert '"name": "m"' in capsys.readouterr().out
    assert client_cli.models_main(["--target-address", token_server.address]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert client_cli.models_main(["--target-address", token_server.address, "--token", "wrong-token-123"]) == 2
    err = capsys.readouterr().err
    assert "UNAUTHENTICATED" in err and "wrong-token-123" not in err
    monkeypatch.setenv("ATTRSERVE_TOKEN", ENV_TOKEN)
    assert client_cli.repository_main(["--target-address", token_server.address]) == 0
    assert "ready" in capsys.readouterr().out
    assert client_cli.load_main(["m", "--target-address", token_server.address]) == 2  # a user token
    assert "PERMISSION_DENIED" in capsys.readouterr().err
    assert client_cli.load_main(["m", "--target-address", token_server.address, "--token", ADMIN_TOKEN, "--timeout", "60"]) == 0
    capsys.readouterr()
    monkeypatch.delenv("ATTRSERVE_TOKEN")
    inputs = json.dumps(X.tolist())
    attribute = ["attribute", "--model", "m", "--algorithm", "integrated_gradients", "--inputs", inputs, "--target", "[0,1]", "--json"]
    assert client_cli.main([*attribute, "--target-address", token_server.address, "--token", USER_TOKEN]) == 0
    np.testing.assert_allclose(np.array(json.loads(capsys.readouterr().out)["attributions"]), EXPECTED, atol=1e-5)

    assert client_cli.models_main(["--target-address", tls_server.address, "--root-cert", str(pki["ca"])]) == 0
    assert "m" in capsys.readouterr().out
    mtls = ["--target-address", mtls_server.address, "--root-cert", str(pki["ca"]), "--token", USER_TOKEN]
    assert client_cli.models_main(mtls) == 2  # no client certificate
    capsys.readouterr()
    assert client_cli.models_main([*mtls, "--client-cert", str(pki["client_cert"]), "--client-key", str(pki["client_key"])]) == 0
    assert "m" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        client_cli.models_main([*mtls, "--client-cert", str(pki["client_cert"])])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        client_cli.models_main(["--target-address", tls_server.address, "--root-cert", str(pki["ca"]) + ".missing"])
    assert "cannot read" in capsys.readouterr().err


# -- rotation: TLS and token files read again when they change ------------------------------------


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    until = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.02)


def served(address: str, ca: bytes, client: tuple[Path, Path] | None = None) -> bytes:
    """The certificate (DER) the server presents to a new connection, verified against `ca`."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cadata=ca.decode())
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(*client)
    with socket.create_connection((host, int(port)), timeout=10) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
        return tls.getpeercert(binary_form=True)


def reloads(metrics_port: int, kind: str) -> dict[str, float | None]:
    page = scrape(metrics_port)
    series = {outcome: frozenset({"kind": kind, "outcome": outcome}.items()) for outcome in ("loaded", "failed")}
    return {outcome: page.get(("attrserve_credentials_reloads_total", labels)) for outcome, labels in series.items()}


def expiry(metrics_port: int) -> float | None:
    return scrape(metrics_port).get(("attrserve_tls_certificate_expiry_timestamp_seconds", frozenset()))


def replace(path: Path, data: bytes) -> None:
    """`data` into `path` as one change: written beside it, then renamed over it."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)


def test_a_rotated_certificate_serves_new_connections_and_a_bad_one_is_not_used(repo, tmp_path, monkeypatch, caplog) -> None:
    """cert-manager renews a certificate every few weeks and the kubelet swaps the Secret's files; the server read them
    at start-up only and served the old certificate until a restart, expired in the end. Now a new connection gets
    the new one (an open connection goes on), and a set that fails the start-up checks is not used: the last good one
    serves on, each distinct failure is logged once, naming the setting, and counted."""
    monkeypatch.setattr(auth, "CHECK_SECONDS", 0.02)  # (1 s in service)
    caplog.set_level(logging.INFO, logger="attrserve_service.auth")
    ca = CertificateAuthority("rotation CA")
    first, second, third = (ca.issue(f"server {n}", server=True) for n in (1, 2, 3))
    volume = SecretVolume(tmp_path / "secret", {"tls.crt": first.cert, "tls.key": first.key})
    cert, key = volume.path("tls.crt"), volume.path("tls.key")
    server = start(repo, tls_cert=cert, tls_key=key, engine_process=False)
    port = server.running.metrics_port
    try:
        before = reloads(port, "tls")
        assert None not in before.values()  # made at start

        def counted() -> dict[str, float]:
            return {o: n - before[o] for o, n in reloads(port, "tls").items()}

        with AttributionClient(server.address, root_certificates=ca.cert) as opened:
            np.testing.assert_allclose(ig(opened).attributions, EXPECTED, atol=1e-5)
            assert served(server.address, ca.cert) == first.der and expiry(port) == first.not_after
            # The kubelet's swap of ..data: new connections get the new certificate, the open one goes on.
            volume.update({"tls.crt": second.cert, "tls.key": second.key})
            wait_for(lambda: served(server.address, ca.cert) == second.der, "the swapped certificate")
            np.testing.assert_allclose(ig(opened).attributions, EXPECTED, atol=1e-5)
            assert expiry(port) == second.not_after and counted() == {"loaded": 1, "failed": 0}

            now = datetime.datetime.now(datetime.timezone.utc)
            expired = ca.issue("old server", server=True, valid=(now - 10 * DAY, now - DAY))
            mismatch = f"--tls-key {key}: is not the key of the certificate in --tls-cert {cert}"
            bad = [
                ({"tls.crt": second.cert, "tls.key": third.key}, mismatch),  # a key of another certificate
                ({"tls.crt": second.cert, "tls.key": first.key}, mismatch),  # the same failure again: counted, not logged again
                ({"tls.crt": expired.cert, "tls.key": expired.key}, f"--tls-cert {cert}: the certificate expired on"),
                ({"tls.crt": second.cert[: len(second.cert) // 2], "tls.key": second.key}, f"--tls-cert {cert}: holds a certificate that"),
            ]
            for failures, (files, _) in enumerate(bad, 1):
                volume.update(files)
                # (a new connection first: the files are looked at as it is made)
                wait_for(lambda n=failures: served(server.address, ca.cert) == second.der and counted()["failed"] == n, "a failure")
                assert served(server.address, ca.cert) == second.der and expiry(port) == second.not_after
            # A good set again, each file renamed over the old one: taken.
            replace(volume.path("..data") / "tls.key", first.key)
            replace(volume.path("..data") / "tls.crt", first.cert)
            wait_for(lambda: served(server.address, ca.cert) == first.der, "the renamed certificate")
            assert counted() == {"loaded": 2, "failed": 4} and expiry(port) == first.not_after
            np.testing.assert_allclose(ig(opened).attributions, EXPECTED, atol=1e-5)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "attrserve_service.auth"]
        for _, why in bad[1:]:
            assert len([m for m in warnings if why in m]) == 1, (why, warnings)
        assert len(warnings) == 3 and not any(b"PRIVATE" in r.getMessage().encode() for r in caplog.records)
        loaded = [r.getMessage() for r in caplog.records if r.getMessage().startswith("TLS files reloaded")]
        assert len(loaded) == 2 and str(cert) in loaded[0] and str(key) in loaded[0]
        still_serving(server, root_certificates=ca.cert)
    finally:
        server.stop()


@pytest.mark.parametrize("layout", [[], ["--no-engine-process"]], ids=["engine process", "no engine process"])
def test_attrserve_serve_follows_a_kubelet_secret_swap(repo, tmp_path, layout) -> None:
    """`attrserve serve` as deployed (TLS is the front's, in either layout): the 1 s check of the files, and the
    metrics of the front on /metrics."""
    ca = CertificateAuthority("rotation CA")
    first, second = ca.issue("server 1", server=True), ca.issue("server 2", server=True)
    volume = SecretVolume(tmp_path / "secret", {"tls.crt": first.cert, "tls.key": first.key})
    tls = ["--tls-cert", str(volume.path("tls.crt")), "--tls-key", str(volume.path("tls.key"))]
    args = ["--model-repository", str(repo), "--no-batch-probe", "--device", "cpu", *tls, *layout]
    with ServeProcess(args, metrics=True) as server:
        assert served(server.address, ca.cert) == first.der and expiry(server.metrics_port) == first.not_after
        assert reloads(server.metrics_port, "tls") == {"loaded": 0, "failed": 0}
        assert reloads(server.metrics_port, "tokens") == {"loaded": None, "failed": None}  # no token file
        with AttributionClient(server.address, root_certificates=ca.cert) as opened:
            np.testing.assert_allclose(ig(opened).attributions, EXPECTED, atol=1e-5)
            volume.update({"tls.crt": second.cert, "tls.key": second.key})
            wait_for(lambda: served(server.address, ca.cert) == second.der, "the swapped certificate")
            np.testing.assert_allclose(ig(opened).attributions, EXPECTED, atol=1e-5)  # the open connection goes on
        assert expiry(server.metrics_port) == second.not_after
        assert reloads(server.metrics_port, "tls") == {"loaded": 1, "failed": 0}
        with AttributionClient(server.address, root_certificates=ca.cert) as client:
            np.testing.assert_allclose(ig(client).attributions, EXPECTED, atol=1e-5)
            assert health(client._channel) == SERVING
        assert "TLS files reloaded: --tls-cert" in server.output() and "PRIVATE KEY" not in server.output()


def test_mutual_tls_follows_a_rotated_client_ca(repo, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(auth, "CHECK_SECONDS", 0.02)
    server_ca = CertificateAuthority("server CA")
    old_ca, new_ca = CertificateAuthority("clients CA 1"), CertificateAuthority("clients CA 2")
    pair = server_ca.issue("server", server=True)
    old_client, new_client = old_ca.issue("old client").write(tmp_path, "old"), new_ca.issue("new client").write(tmp_path, "new")
    volume = SecretVolume(tmp_path / "secret", {"tls.crt": pair.cert, "tls.key": pair.key, "ca.crt": old_ca.cert})
    tls = {"tls_cert": volume.path("tls.crt"), "tls_key": volume.path("tls.key"), "tls_client_ca": volume.path("ca.crt")}
    server = start(repo, **tls, engine_process=False)
    before = reloads(server.running.metrics_port, "tls")["loaded"]

    def accepts(client_cert: tuple[Path, Path]) -> bool:
        with AttributionClient(server.address, root_certificates=server_ca.cert, client_cert=client_cert) as client:
            try:
                return [m.config.name for m in client.list_models(timeout=10)] == ["m"]
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                return False

    try:
        assert accepts(old_client) and not accepts(new_client)
        with AttributionClient(server.address, root_certificates=server_ca.cert, client_cert=old_client) as opened:
            np.testing.assert_allclose(ig(opened).attributions, EXPECTED, atol=1e-5)
            volume.update({"tls.crt": pair.cert, "tls.key": pair.key, "ca.crt": new_ca.cert})
            wait_for(lambda: accepts(new_client), "a client of the new CA")
            assert not accepts(old_client)  # a new connection of a client of the old CA
            np.testing.assert_allclose(ig(opened).attributions, EXPECTED, atol=1e-5)  # its open connection goes on
        assert reloads(server.running.metrics_port, "tls")["loaded"] == before + 1
        still_serving(server, root_certificates=server_ca.cert, client_cert=new_client)
    finally:
        server.stop()


def test_rotated_token_files_take_effect_and_a_bad_one_is_not_used(repo, tmp_path) -> None:
    """Token files rotate as certificates do (a Secret): a token added is accepted and one removed refused from the
    next look at the files on (at most 1 s), without a restart; a file that fails the start-up checks (a line that is
    no token, not UTF-8, an admin file without a token) is not used and the tokens before it stay. The variable's
    tokens cannot change and stay."""
    new_token, new_admin = "rotated-token-5566778899aabbcc", "rotated-admin-ddeeff0011223344"
    tokens, admin = tmp_path / "tokens", tmp_path / "admin"
    tokens.write_text(USER_TOKEN + "\n")
    admin.write_text(ADMIN_TOKEN + "\n")
    files = ["--auth-tokens-file", str(tokens), "--admin-tokens-file", str(admin), "--auth-token-env", TOKEN_VARIABLE]
    args = ["--model-repository", str(repo), "--no-batch-probe", "--device", "cpu", "--no-engine-process", *files]
    env = dict(os.environ, **{TOKEN_VARIABLE: ENV_TOKEN})
    ok, refused, denied = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED

    with ServeProcess(args, metrics=True, env=env) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.AttributionServiceStub(channel)
        repository = pb_grpc.ModelRepositoryServiceStub(channel)

        def code(token: str, admin: bool = False) -> grpc.StatusCode:
            """ListModels' code with `token`; with `admin`, LoadModel's (FAILED_PRECONDITION past the token check:
            --model-control none)."""
            try:
                if admin:
                    repository.LoadModel(pb.LoadModelRequest(model="m"), metadata=_auth(token), timeout=10)
                else:
                    stub.ListModels(pb.ListModelsRequest(), metadata=_auth(token), timeout=10)
            except grpc.RpcError as e:
                return e.code()
            return ok

        def failed() -> float:
            return reloads(server.metrics_port, "tokens")["failed"]

        assert reloads(server.metrics_port, "tokens") == {"loaded": 0, "failed": 0}
        assert expiry(server.metrics_port) is None  # plaintext: no certificate
        assert code(USER_TOKEN) == code(ENV_TOKEN) == ok and code(new_token) == refused
        replace(tokens, f"# rotated\n{new_token}\n".encode())
        wait_for(lambda: code(new_token) == ok, "the added token")
        assert code(USER_TOKEN) == refused and code(ENV_TOKEN) == ok
        assert reloads(server.metrics_port, "tokens") == {"loaded": 1, "failed": 0}
        for n, text in enumerate([b"two words\n", b"\xff\xfe not UTF-8\n"], 1):
            replace(tokens, text)
            wait_for(lambda n=n: code(new_token) == ok and failed() == n, "a failed reload")
            assert code(USER_TOKEN) == refused and code(ENV_TOKEN) == ok
        # Emptied where other tokens are left (the variable's, the admin file's): taken, as at start-up.
        replace(tokens, b"# emptied\n")
        wait_for(lambda: code(new_token) == refused, "the emptied file")
        assert code(ENV_TOKEN) == code(ADMIN_TOKEN) == ok
        replace(tokens, f"{new_token}\n".encode())
        wait_for(lambda: code(new_token) == ok, "the token back")
        # Admin tokens: an emptied admin file is not used; a new admin token is taken, and the old one refused.
        assert code(ADMIN_TOKEN, admin=True) == grpc.StatusCode.FAILED_PRECONDITION and code(new_token, admin=True) == denied
        replace(admin, b"\n")
        wait_for(lambda: code(new_token) == ok and failed() == 3, "a failed reload")
        assert code(ADMIN_TOKEN, admin=True) == grpc.StatusCode.FAILED_PRECONDITION
        replace(admin, f"{new_admin}\n".encode())
        wait_for(lambda: code(new_admin, admin=True) == grpc.StatusCode.FAILED_PRECONDITION, "the new admin token")
        assert code(ADMIN_TOKEN) == refused and code(new_token, admin=True) == denied
        assert reloads(server.metrics_port, "tokens") == {"loaded": 4, "failed": 3}
        assert reloads(server.metrics_port, "tls") == {"loaded": None, "failed": None}
        still_serving(server, token=new_token)
        output = server.output()
        warned = (f"--auth-tokens-file {tokens} line 1", f"--auth-tokens-file {tokens}: not UTF-8", f"--admin-tokens-file {admin}: holds")
        for why in warned:
            assert output.count(why) == 1, (why, output)
        assert output.count("token files reloaded") == 4
        for secret in (USER_TOKEN, ENV_TOKEN, ADMIN_TOKEN, new_token, new_admin, "two words"):
            assert secret not in output


def test_a_token_file_left_without_a_token_is_not_used(tmp_path, monkeypatch, caplog) -> None:
    """Where the file is the only source of tokens, an emptied one would refuse every call: the tokens before stay."""
    monkeypatch.setattr(auth, "CHECK_SECONDS", 0.0)
    path = tmp_path / "tokens"
    path.write_text(USER_TOKEN + "\n")
    told: list[tuple[str, str]] = []
    guard = auth.token_auth(ServerConfig(auth_tokens_file=path), {}, lambda kind, outcome: told.append((kind, outcome)))
    method = f"/{SERVICE}/ListModels"
    replace(path, b"# emptied\n")
    with caplog.at_level(logging.WARNING, logger="attrserve_service.auth"):
        assert guard.check(method, _auth(USER_TOKEN)) is None
        assert guard.check(method, _auth(USER_TOKEN)) is None  # (looked at again: unchanged)
    assert told == [("tokens", "failed")] and len(caplog.records) == 1
    assert f"--auth-tokens-file {path}: holds no token" in caplog.text and USER_TOKEN not in caplog.text
    replace(path, b"another-token-00112233\n")
    assert guard.check(method, _auth(USER_TOKEN))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert guard.check(method, _auth("another-token-00112233")) is None
    assert told == [("tokens", "failed"), ("tokens", "loaded")]


def test_nothing_the_certificate_check_raises_reaches_grpc(pki, monkeypatch, caplog) -> None:
    """gRPC's core calls the fetcher before every handshake: what it raised, gRPC would log with a traceback for every
    new connection. It is logged once per change, and the set served goes on (None: no change)."""
    monkeypatch.setattr(auth, "CHECK_SECONDS", 0.0)
    files = auth.TlsFiles(pki["server_cert"], pki["server_key"], None)

    def broken(*_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(auth, "_usable", broken)
    monkeypatch.setattr(files._watched, "seen", ())  # as if the files had changed
    with caplog.at_level(logging.ERROR, logger="attrserve_service.auth"):
        assert files.fetch() is None and files.fetch() is None
    assert len(caplog.records) == 1 and "RuntimeError: a bug" in caplog.text


# -- reflection, INTERNAL errors, weights ---------------------------------------------------------


def test_reflection_is_off_by_default(plain_server) -> None:
    with grpc.insecure_channel(plain_server.address) as channel:
        assert code_of(lambda: reflection_services(channel))[0] == grpc.StatusCode.UNIMPLEMENTED
    still_serving(plain_server)


def test_internal_errors_carry_an_id_not_the_exception(plain_server, caplog) -> None:
    caplog.set_level(logging.ERROR)
    huge = X * 10_000
    with AttributionClient(plain_server.address) as client:
        np.testing.assert_allclose(  # the plugin works on ordinary inputs (Saliency)
            client.attribute("m", "fails_on_huge_inputs", X, target=TARGET, timeout=60).attributions,
            np.abs(_gradients()),
            atol=1e-5,
        )
        code, detail = code_of(lambda: client.attribute("m", "fails_on_huge_inputs", huge, target=TARGET, timeout=60))
        assert code == grpc.StatusCode.INTERNAL
        match = re.fullmatch(r"internal error \(id ([0-9a-f]{16})\); the server's log has the details", detail)
        assert match, detail
        assert "RuntimeError" not in detail and "SECRET" not in detail
        # The same in a stream's error entry.
        answers = list(client.attribute_stream([client.build_request("m", "fails_on_huge_inputs", huge, target=TARGET)], timeout=60))
        assert answers[0].WhichOneof("result") == "error" and answers[0].error.code == grpc.StatusCode.INTERNAL.value[0]
        assert answers[0].error.message.startswith("internal error (id ") and "SECRET" not in answers[0].error.message
    # The log has the id, the exception and its traceback, once per failure.
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert len(logged) == 1 and SECRET in logged[0].getMessage() and logged[0].exc_info is not None
    still_serving(plain_server)


def test_internal_errors_in_the_engine_process_carry_an_id_not_the_exception(tmp_path) -> None:
    write_model(tmp_path / "m")
    plugin = tmp_path / "fails_on_huge_inputs.py"
    plugin.write_text(FAILING_PLUGIN)
    args = ["--model-repository", str(tmp_path), "--plugins", str(plugin), "--no-batch-probe", "--device", "cpu"]
    with ServeProcess(args) as server, AttributionClient(server.address) as client:
        code, detail = code_of(lambda: client.attribute("m", "fails_on_huge_inputs", X * 10_000, target=TARGET, timeout=60))
        assert code == grpc.StatusCode.INTERNAL
        match = re.fullmatch(r"internal error \(id ([0-9a-f]{16})\); the server's log has the details", detail)
        assert match, detail
        assert "RuntimeError" not in detail and "SECRET" not in detail
        np.testing.assert_allclose(ig(client).attributions, EXPECTED, atol=1e-5)  # still serving
        assert health(client._channel) == SERVING
        # The engine process logged it once, with the exception and its traceback, under the same id.
        output = server.output()
        assert output.count(match.group(1)) == 1
        logged = output[output.index(match.group(1)) :]
        assert SECRET in logged.splitlines()[0] and "Traceback (most recent call last)" in logged


def _gradients() -> np.ndarray:
    namespace: dict = {}
    exec(MODEL, namespace)
    x = torch.from_numpy(X).requires_grad_()
    out = namespace["build_model"]()(x)
    out.gather(1, torch.tensor(TARGET).view(-1, 1)).sum().backward()
    return x.grad.numpy()


def test_a_malicious_weights_pickle_is_refused_not_run(plain_server, markers, tmp_path) -> None:
    # The payload is live: an unrestricted unpickler runs it (here, on a copy aimed at another marker).
    control = tmp_path / "control.pt"
    torch.save({"0.weight": _Payload(markers["control"])}, control)
    torch.load(control, weights_only=False)
    assert markers["control"].exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(control, weights_only=True)

    with AttributionClient(plain_server.address) as client:
        listed = {m.config.name: m for m in client.list_models(timeout=10)}
        assert listed["evil"].state == pb.MODEL_STATE_UNAVAILABLE and not listed["evil"].ready
        assert listed["evil"].reason.startswith("UnpicklingError: Weights only load failed"), listed["evil"].reason
        assert code_of(lambda: client.attribute("evil", "saliency", X, target=TARGET, timeout=30))[0] == grpc.StatusCode.UNAVAILABLE
    assert not markers["server"].exists()
    still_serving(plain_server)


# -- settings -------------------------------------------------------------------------------------


def test_bad_security_settings_fail_at_start_up_naming_the_setting(pki, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n\n")
    bad_line = tmp_path / "bad"
    bad_line.write_text("two words\n")
    cases = {
        "--tls-key": ServerConfig(tls_cert=pki["server_cert"]),
        "--tls-cert": ServerConfig(tls_key=pki["server_key"]),
        "--tls-client-ca": ServerConfig(tls_client_ca=pki["ca"]),
        "--tls-cert ": ServerConfig(tls_cert=tmp_path / "missing.crt", tls_key=pki["server_key"]),
        "--tls-key ": ServerConfig(tls_cert=pki["server_cert"], tls_key=pki["server_cert"]),  # not a key
        "--auth-tokens-file": ServerConfig(auth_tokens_file=tmp_path / "missing"),
        "--auth-token-env": ServerConfig(auth_token_env="ATTRSERVE_TEST_NO_SUCH_VARIABLE"),
        "--admin-tokens-file": ServerConfig(admin_tokens_file=empty),
        "no token": ServerConfig(auth_tokens_file=empty),
        "line 1": ServerConfig(auth_tokens_file=bad_line),
        "--auth-health": ServerConfig(auth_health=True),
    }
    for needle, config in cases.items():
        with pytest.raises(ConfigError) as error:
            ServerSecurity.from_config(config, environ={})
        assert needle.strip() in str(error.value), (needle, str(error.value))
        assert "two words" not in str(error.value)
    assert ServerSecurity.from_config(ServerConfig(), environ={}) == ServerSecurity(None, None)


def test_tls_files_grpc_cannot_use_and_an_empty_token_variable_fail_at_start_up_naming_the_setting(tls_server, pki, repo, tmp_path,
                                                                                                    caplog) -> None:
    """gRPC reads the TLS files only as it binds the port, after the models have loaded; it refused a key that is not
    the certificate's (or one that does not decode, or is encrypted, or a certificate that does not decode) with "the
    address could not be bound", blaming --port. An expired certificate served and every client's handshake failed.
    An empty --auth-token-env turned token auth off."""
    ca = CertificateAuthority("attrserve test CA")
    now = datetime.datetime.now(datetime.timezone.utc)
    server = ca.issue("server", server=True)
    cert, key = server.write(tmp_path, "server")
    other_key = ca.issue("another server", server=True).write(tmp_path, "other")[1]
    expired = ca.issue("old server", server=True, valid=(now - 10 * DAY, now - DAY)).write(tmp_path, "expired")
    early = ca.issue("new server", server=True, valid=(now + DAY, now + 10 * DAY)).write(tmp_path, "early")
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(server.encrypted_key(b"a passphrase"))
    garbled_cert, garbled_key = tmp_path / "garbled.crt", tmp_path / "garbled.key"
    garbled_cert.write_text("-----BEGIN CERTIFICATE-----\nAAAAAAAAAAAAAAAA\n-----END CERTIFICATE-----\n")
    garbled_key.write_text("-----BEGIN PRIVATE KEY-----\nAAAAAAAAAAAAAAAA\n-----END PRIVATE KEY-----\n")
    cases = [
        (ServerConfig(tls_cert=cert, tls_key=other_key), f"--tls-key {other_key}: is not the key of the certificate in --tls-cert"),
        (ServerConfig(tls_cert=cert, tls_key=garbled_key), f"--tls-key {garbled_key}: not a usable private key"),
        (ServerConfig(tls_cert=cert, tls_key=encrypted), f"--tls-key {encrypted}: is encrypted"),
        (ServerConfig(tls_cert=garbled_cert, tls_key=key), f"--tls-cert {garbled_cert}: holds a certificate that cannot be decoded"),
        (ServerConfig(tls_cert=expired[0], tls_key=expired[1]), f"--tls-cert {expired[0]}: the certificate expired on"),
        (ServerConfig(tls_cert=cert, tls_key=key, tls_client_ca=garbled_cert), f"--tls-client-ca {garbled_cert}: holds a certificate that"),
        (ServerConfig(auth_token_env=""), "--auth-token-env is empty"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError) as error:
            ServerSecurity.from_config(config, environ={})
        assert str(error.value).startswith(message), (message, str(error.value))
    # One not valid yet (the server's clock behind its issuer's) serves once it is valid: a warning, not a refusal.
    with caplog.at_level(logging.WARNING, logger="attrserve_service.auth"):
        assert ServerSecurity.from_config(ServerConfig(tls_cert=early[0], tls_key=early[1])).credentials is not None
    assert f"--tls-cert {early[0]}: the certificate is not valid until" in caplog.text
    # What gRPC takes is taken, where OpenSSL's default security level would refuse it (a 1024-bit RSA key).
    weak = ca.issue("weak server", server=True, rsa_bits=1024).write(tmp_path, "weak")
    assert ServerSecurity.from_config(ServerConfig(tls_cert=weak[0], tls_key=weak[1])).credentials is not None
    # A key type OpenSSL reads and gRPC does not: refused as gRPC binds, naming the TLS settings, not --port.
    odd_cert, odd_key = ed448_pair("ed448 server").write(tmp_path, "ed448")
    assert ServerSecurity.from_config(ServerConfig(tls_cert=odd_cert, tls_key=odd_key)).credentials is not None
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False)
    tls = {"tls_cert": odd_cert, "tls_key": odd_key}
    config = ServerConfig(port=0, metrics_port=None, model_repository=repo, limits=limits, engine_process=False, **tls)
    with pytest.raises(ConfigError) as error:
        asyncio.run(create_server(config))
    assert str(error.value).startswith(f"--tls-cert {odd_cert}, --tls-key {odd_key}: gRPC cannot serve TLS"), str(error.value)
    still_serving(tls_server, root_certificates=pki["ca"])


def test_serve_exits_with_2_on_a_bad_security_setting(pki) -> None:
    command = [sys.executable, "-m", "attrserve_service.cli", "serve", "--port", "0", "--metrics-port", "-1"]
    out = subprocess.run([*command, "--tls-cert", str(pki["server_cert"])], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "--tls-key" in out.stderr and "Traceback" not in out.stderr
    # A key that is not the certificate's: refused before the engine process starts, naming the key (not --port).
    mismatched = ["--tls-cert", str(pki["server_cert"]), "--tls-key", str(pki["client_key"])]
    out = subprocess.run([*command, *mismatched], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert f"error: --tls-key {pki['client_key']}: is not the key of the certificate" in out.stderr, out.stderr
    assert "--port" not in out.stderr and "Traceback" not in out.stderr and "engine process" not in out.stderr


def test_token_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == ("abc", "")
    assert bearer_token([("authorization", "bearer abc")]) == ("abc", "")  # the scheme is case-insensitive
    assert bearer_token([])[0] is None and bearer_token([("authorization", "Bearer a"), ("authorization", "Bearer a")])[0] is None
    auth = TokenAuth({"a-token"}, {"an-admin"})
    assert auth.check(f"/{SERVICE}/Attribute", [("authorization", "Bearer a-token")]) is None
    assert auth.check(f"/{SERVICE}/Attribute", [("authorization", "Bearer an-admin")]) is None
    assert auth.check(f"/{REPOSITORY}/LoadModel", [("authorization", "Bearer an-admin")]) is None
    assert auth.check(f"/{REPOSITORY}/LoadModel", [("authorization", "Bearer a-token")])[0] == grpc.StatusCode.PERMISSION_DENIED
    assert auth.check(f"/{REPOSITORY}/LoadModel", [("authorization", "Bearer a-tokenX")])[0] == grpc.StatusCode.UNAUTHENTICATED


def test_token_files_skip_comments_and_blank_lines(tmp_path) -> None:
    path = tmp_path / "tokens"
    path.write_text(TOKEN_FILE)
    assert read_tokens(path) == {USER_TOKEN}
