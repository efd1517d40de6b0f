"""The clients' and the CLI's model control (ModelRepositoryService) against `attrserve serve --model-control explicit`.

One server serves a repository of two models for the whole module: `a` (one flat version) and `b` (version
folders 1 and 2, different weights). The tests run in file order; each one that changes what the server
serves puts it back, and checks that the server still answers an attribution correctly (Captum as the oracle).
"""

from __future__ import annotations

import asyncio
import functools
import json
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import AsyncAttributionClient, AttributionClient
from attrserve_client import cli
from servers import ServeProcess

ATOL = 1e-5
X = np.array([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]], dtype=np.float32)
TARGET = [0, 1]
TIMEOUT = 60
READY, UNLOADED, UNAVAILABLE = pb.MODEL_STATE_READY, pb.MODEL_STATE_UNLOADED, pb.MODEL_STATE_UNAVAILABLE
SERVE_ARGS = ["--device", "cpu", "--no-batch-probe"]
EXPLICIT = ["--model-control", "explicit"]


def mlp(seed: int) -> str:
    """A small MLP's model.py; the seed picks its weights."""
    return f"""
import torch
from torch import nn


def build_model():
    torch.manual_seed({seed})
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
"""


SEEDS = {("a", "1"): 5, ("b", "1"): 5, ("b", "2"): 7}
BROKEN = "def build_model():\n    raise RuntimeError('no weights here')\n"


def write_model(folder: Path, source: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(source)


def make_repository(root: Path) -> Path:
    write_model(root / "a", mlp(SEEDS["a", "1"]))
    write_model(root / "b" / "1", mlp(SEEDS["b", "1"]))
    write_model(root / "b" / "2", mlp(SEEDS["b", "2"]))
    return root


@functools.cache
def oracle(seed: int) -> np.ndarray:
    """Captum's IntegratedGradients, in process, on the module the server's model.py builds. Cached, and to be
    first called from one thread only: build_model seeds torch's global generator."""
    namespace: dict = {}
    exec(compile(mlp(seed), "<model.py>", "exec"), namespace)
    module = namespace["build_model"]().eval()
    return IntegratedGradients(module).attribute(torch.from_numpy(X.copy()), target=TARGET).detach().numpy()


def assert_serves(client: AttributionClient, model: str = "a", version: str = "", *, want_version: str = "1") -> None:
    """A normal Attribute call answers from `want_version`, with Captum's numbers for it."""
    result = client.attribute(model, "integrated_gradients", X, target=TARGET, model_version=version, timeout=TIMEOUT)
    assert result.model_version == want_version
    want = oracle(SEEDS[model, want_version])
    assert np.abs(want).max() > ATOL
    np.testing.assert_allclose(result.attributions, want, atol=ATOL, rtol=0)


def states(statuses) -> list[tuple[str, str, int]]:
    return [(s.model, s.version, s.state) for s in statuses]


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kwargs)
    return err.value


ALL_READY = [("a", "1", READY), ("b", "1", READY), ("b", "2", READY)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def server(repo):
    with ServeProcess(["--model-repository", str(repo), *SERVE_ARGS, *EXPLICIT]) as process:
        yield process


@pytest.fixture
def client(server):
    with AttributionClient(server.address) as c:
        yield c
        # Every test leaves the repository as it found it, all of it serving.
        assert states(c.repository_index(timeout=TIMEOUT)) == ALL_READY, server.output()


def test_repository_index_lists_every_version_with_its_state(client):
    index = client.repository_index(timeout=TIMEOUT)
    assert states(index) == ALL_READY
    assert [s.reason for s in index] == ["", "", ""]
    assert states(client.repository_index(ready_only=True, timeout=TIMEOUT)) == ALL_READY
    models = client.list_models(timeout=TIMEOUT)
    assert sorted((m.config.name, m.config.version, m.ready, m.state) for m in models) == [
        ("a", "1", True, READY), ("b", "1", True, READY), ("b", "2", True, READY)]
    assert_serves(client, "a")
    assert_serves(client, "b", want_version="2")  # no version: the newest


def test_unload_then_load_a_model(client):
    assert states(client.unload_model("a", timeout=TIMEOUT)) == [("a", "1", UNLOADED)]
    err = rpc_error(client.attribute, "a", "integrated_gradients", X, target=TARGET, timeout=TIMEOUT)
    assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
    assert states(client.repository_index(timeout=TIMEOUT)) == [("a", "1", UNLOADED), *ALL_READY[1:]]
    assert states(client.repository_index(ready_only=True, timeout=TIMEOUT)) == ALL_READY[1:]
    assert_serves(client, "b", want_version="2")  # the other model is untouched
    # Unloading what is not loaded names the model.
    err = rpc_error(client.unload_model, "a", timeout=TIMEOUT)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "'a'" in err.details(), err.details()

    loaded = client.load_model("a", timeout=TIMEOUT)
    assert states(loaded) == [("a", "1", READY)] and loaded[0].reason == ""
    assert_serves(client, "a")


def test_unload_one_version_leaves_the_other_serving(client):
    statuses = client.unload_model("b", "2", timeout=TIMEOUT)
    assert states(statuses) == [("b", "1", READY), ("b", "2", UNLOADED)]
    assert_serves(client, "b", want_version="1")  # no version: now version 1
    assert_serves(client, "b", "1", want_version="1")
    err = rpc_error(client.attribute, "b", "integrated_gradients", X, target=TARGET, model_version="2", timeout=TIMEOUT)
    assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()

    assert states(client.load_model("b", "2", timeout=TIMEOUT)) == [("b", "1", READY), ("b", "2", READY)]
    assert_serves(client, "b", want_version="2")
    assert_serves(client, "b", "1", want_version="1")


def test_reload_of_a_loaded_model_drops_no_request(client):
    errors: list[BaseException] = []
    answered = 0
    stop = threading.Event()

    def send() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                assert_serves(client, "a")
                answered += 1
            except BaseException as e:  # reported below
                errors.append(e)
                return

    assert_serves(client, "a")  # the oracle's numbers are computed here, not by four threads at once
    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert states(client.load_model("a", timeout=TIMEOUT)) == [("a", "1", READY)]
    finally:
        stop.set()
        for t in threads:
            t.join(TIMEOUT)
    assert not errors, errors[0]
    assert answered > 0
    assert_serves(client, "a")


def test_load_that_fails_is_failed_precondition_with_the_error(client, repo):
    write_model(repo / "c", BROKEN)
    try:
        err = rpc_error(client.load_model, "c", timeout=TIMEOUT)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
        assert "'c'" in err.details() and "version '1'" in err.details() and "no weights here" in err.details(), err.details()
        (c,) = [s for s in client.repository_index(timeout=TIMEOUT) if s.model == "c"]
        assert (c.version, c.state) == ("1", UNAVAILABLE) and "no weights here" in c.reason
        assert "c" not in {s.model for s in client.repository_index(ready_only=True, timeout=TIMEOUT)}
        (info,) = [m for m in client.list_models(timeout=TIMEOUT) if m.config.name == "c"]
        assert (info.ready, info.state) == (False, UNAVAILABLE) and "no weights here" in info.reason
        err = rpc_error(client.attribute, "c", "integrated_gradients", X, target=TARGET, timeout=TIMEOUT)
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "no weights here" in err.details(), err.details()
        assert_serves(client, "a")
        # Unloading the failed version forgets the failure.
        assert states(client.unload_model("c", timeout=TIMEOUT)) == [("c", "1", UNLOADED)]
    finally:
        shutil.rmtree(repo / "c")
    assert_serves(client, "a")


def test_failed_reload_keeps_the_previous_load_serving(client, repo):
    source = (repo / "a" / "model.py").read_text()
    (repo / "a" / "model.py").write_text(BROKEN)
    try:
        err = rpc_error(client.load_model, "a", timeout=TIMEOUT)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "no weights here" in err.details(), err.details()
        (a,) = [s for s in client.repository_index(timeout=TIMEOUT) if s.model == "a"]
        assert a.state == READY and "no weights here" in a.reason
        assert_serves(client, "a")
    finally:
        (repo / "a" / "model.py").write_text(source)
    loaded = client.load_model("a", timeout=TIMEOUT)
    assert states(loaded) == [("a", "1", READY)] and loaded[0].reason == ""
    assert_serves(client, "a")


def test_cli_repository_load_unload(client, server, capsys):
    address = ["--target-address", server.address, "--timeout", str(TIMEOUT)]
    capsys.readouterr()
    assert cli.repository_main(address) == 0
    assert capsys.readouterr().out.splitlines() == [
        "model  version  state",
        "a      1        ready",
        "b      1        ready",
        "b      2        ready",
    ]

    assert cli.unload_main(["b", "--version", "2", *address]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "model  version  state",
        "b      1        ready",
        "b      2        unloaded",
    ]
    assert cli.repository_main([*address, "--ready-only", "--json"]) == 0
    assert capsys.readouterr().out.strip() == (
        '{"models": [{"model": "a", "version": "1", "state": "ready", "reason": ""}, '
        '{"model": "b", "version": "1", "state": "ready", "reason": ""}]}'
    )
    assert_serves(client, "b", want_version="1")

    assert cli.load_main(["b", "--version", "2", *address, "--json"]) == 0
    assert capsys.readouterr().out.strip() == (
        '{"models": [{"model": "b", "version": "1", "state": "ready", "reason": ""}, '
        '{"model": "b", "version": "2", "state": "ready", "reason": ""}]}'
    )
    assert_serves(client, "b", want_version="2")

    # `attrserve load`, `unload` and `repository` through the `attrserve` entry point's dispatch.
    from attrserve_service.cli import main as attrserve_main

    assert attrserve_main(["load", "a", *address]) == 0
    assert capsys.readouterr().out.splitlines() == ["model  version  state", "a      1        ready"]
    assert attrserve_main(["repository", *address, "--ready-only"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4
    assert_serves(client, "a")

    # Errors: "error: CODE: details" on stderr, exit 2.
    assert cli.load_main(["nope", *address]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: NOT_FOUND: ") and "'nope'" in captured.err
    assert attrserve_main(["unload", "b", "--version", "9", *address]) == 2
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")
    assert_serves(client, "b", want_version="2")


def test_cli_models_shows_states_and_reasons(client, server, repo, capsys):
    address = ["--target-address", server.address, "--timeout", str(TIMEOUT)]
    write_model(repo / "c", BROKEN)
    try:
        assert cli.load_main(["c", *address]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("error: FAILED_PRECONDITION: ") and "no weights here" in captured.err
        assert cli.models_main(address) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["name", "version", "ready", "state", "inputs", "layers", "algorithms"]
        rows = {tuple(line.split()[:4]) for line in lines[1:5]}
        assert rows == {("a", "1", "yes", "ready"), ("b", "1", "yes", "ready"), ("b", "2", "yes", "ready"),
                        ("c", "1", "no", "unavailable")}, lines
        assert lines[5] == ""
        assert lines[6].startswith("c v1: ") and "no weights here" in lines[6], lines
        assert len(lines) == 7, lines
        assert cli.models_main([*address, "--json"]) == 0
        rows_json = {(r["name"], r["version"]): r for r in json.loads(capsys.readouterr().out)["models"]}
        assert (rows_json["a", "1"]["state"], rows_json["a", "1"]["reason"]) == ("ready", "")
        assert rows_json["c", "1"]["state"] == "unavailable" and "no weights here" in rows_json["c", "1"]["reason"]
        assert cli.repository_main(address) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[4].split() == ["c", "1", "unavailable"] and lines[6].startswith("c v1: "), lines
        assert cli.unload_main(["c", *address]) == 0
        assert capsys.readouterr().out.splitlines() == ["model  version  state", "c      1        unloaded"]
    finally:
        shutil.rmtree(repo / "c")
    assert_serves(client, "a")


def test_async_client(client, server):
    async def run() -> tuple[list, list, list, list]:
        async with AsyncAttributionClient(server.address) as aclient:
            index = await aclient.repository_index(timeout=TIMEOUT)
            unloaded = await aclient.unload_model("b", "2", timeout=TIMEOUT)
            ready = await aclient.repository_index(ready_only=True, timeout=TIMEOUT)
            loaded = await aclient.load_model("b", "2", timeout=TIMEOUT)
            return index, unloaded, ready, loaded

    index, unloaded, ready, loaded = asyncio.run(run())
    assert states(index) == ALL_READY
    assert states(unloaded) == [("b", "1", READY), ("b", "2", UNLOADED)]
    assert states(ready) == [("a", "1", READY), ("b", "1", READY)]
    assert states(loaded) == [("b", "1", READY), ("b", "2", READY)]
    assert_serves(client, "b", want_version="2")


def test_load_and_unload_need_explicit_model_control(tmp_path):
    repo = make_repository(tmp_path / "repo")
    with ServeProcess(["--model-repository", str(repo), *SERVE_ARGS]) as server, AttributionClient(server.address) as client:
        for call, args in ((client.load_model, ("a",)), (client.unload_model, ("a",)), (client.load_model, ("b", "2"))):
            err = rpc_error(call, *args, timeout=TIMEOUT)
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, err.details()
            assert "--model-control explicit" in err.details(), err.details()
        assert states(client.repository_index(timeout=TIMEOUT)) == ALL_READY
        assert cli.unload_main(["a", "--target-address", server.address]) == 2
        assert_serves(client, "a")
        assert_serves(client, "b", "1", want_version="1")
