"""The two layouts behave the same: `attrserve serve` runs the engine in an engine process (EngineProcess), and
`--no-engine-process` in the front's own (LocalCore). Each test runs its checks against both, on the same models: what
a client is answered (statuses and messages), what the metrics count, what health says."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from servers import ServerThread, scrape
from test_model_management import BROKEN, SERVING, TARGET, X, captum, health, ig, mlp, start, states, wait_for, write

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve_client import AttributionClient
from attrserve_client.client import NO_RETRY
from attrserve_engine import EngineLimits
from attrserve_service.config import ServerConfig

LAYOUTS = {"engine process": True, "one process": False}


def outcome(call: Callable[[], object]) -> tuple[str, str]:
    try:
        call()
    except grpc.RpcError as e:
        return e.code().name, e.details()
    return "OK", ""


def counted(server: ServerThread) -> dict[tuple[str, frozenset], float]:
    """The counters a client's calls move (the registry is this process's: tests compare before and after); not the
    seconds and bytes that only the engine process layout spends (busy polling, heap releases)."""
    moved = ("attrserve_", "grpc_server_")
    spent = ("attrserve_busy_poll", "attrserve_heap_")
    samples = scrape(server.running.metrics_port)
    return {key: n for key, n in samples.items() if key[0].endswith("_total") and key[0].startswith(moved) and not key[0].startswith(spent)}


BAD_CALLS: dict[str, Callable[[AttributionClient], object]] = {
    "unknown model": lambda c: c.attribute("nope", "saliency", X, target=TARGET, timeout=30),
    "unknown version": lambda c: c.attribute("good", "saliency", X, target=TARGET, model_version="7", timeout=30),
    "a model that failed to load": lambda c: c.attribute("broken", "saliency", X, target=TARGET, timeout=30),
    "target out of range": lambda c: c.attribute("good", "saliency", X, target=9, timeout=30),
    "inputs of the wrong width": lambda c: c.attribute("good", "saliency", X[:, :3], target=0, timeout=30),
    "inputs of the wrong dtype": lambda c: c.attribute("good", "saliency", X.astype(np.int32), target=0, timeout=30),
    "rows over the limit": lambda c: c.attribute("good", "saliency", np.ones((201, 4), np.float32), target=0, timeout=30),
    "n_steps over the limit": lambda c: c.attribute("good", "integrated_gradients", X, target=TARGET, params={"n_steps": 1000}, timeout=30),
    "an unknown layer": lambda c: c.attribute("good", "layer_conductance", X, target=TARGET, layer="nope", timeout=30),
    "an unknown algorithm in also": lambda c: c._stub.Attribute(
        pb.AttributeRequest(model="good", algorithm=pb.ALGORITHM_SALIENCY, also=[pb.AlgorithmSpec(custom_algorithm="zz")]), timeout=30
    ),
    "GetModel of an unknown model": lambda c: c.get_model("nope", timeout=30),
    "GetModel of an unknown version": lambda c: c.get_model("good", "9", timeout=30),
    "LoadModel of an unknown model": lambda c: c.load_model("nope", timeout=30),
    "LoadModel of an unknown version": lambda c: c.load_model("good", "5", timeout=30),
    "LoadModel of a model that fails": lambda c: c.load_model("broken", timeout=30),
    "UnloadModel of an unknown model": lambda c: c.unload_model("nope", timeout=30),
}


def test_bad_requests_get_the_same_answers_and_counts_in_both_layouts(tmp_path: Path) -> None:
    write(tmp_path / "good", mlp(1))
    write(tmp_path / "broken", BROKEN)
    answers, counts = {}, {}
    for layout, engine_process in LAYOUTS.items():
        limits = EngineLimits(default_device="cpu", probe_batch_rows=False, max_rows_per_request=200, max_n_steps=100)
        config = ServerConfig(port=0, metrics_port=0, model_repository=tmp_path, limits=limits, model_control="explicit")
        server = ServerThread(None, dataclasses.replace(config, engine_process=engine_process))
        try:
            with AttributionClient(server.address, retry=NO_RETRY) as client:
                before = counted(server)
                answers[layout] = {name: outcome(lambda call=call: call(client)) for name, call in BAD_CALLS.items()}
                np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)  # still serving
                after = counted(server)
                counts[layout] = {key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)}
                listed = states(client)
                assert listed[("good", "1")] == ("MODEL_STATE_READY", "")
                assert listed[("broken", "1")] == ("MODEL_STATE_UNAVAILABLE", "RuntimeError: no weights here")
                assert health(server.address) == SERVING
        finally:
            server.stop()
    assert all(code not in ("OK", "INTERNAL", "UNKNOWN") for code, _ in answers["one process"].values()), answers
    assert answers["one process"] == answers["engine process"]
    assert counts["one process"] == counts["engine process"]


@pytest.mark.parametrize("engine_process", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_a_load_whose_caller_left_loads_every_version(tmp_path: Path, engine_process: bool) -> None:
    """A LoadModel whose deadline passed while a version loaded went on to its end in the engine process, and stopped
    half-way in one process: cancelled with the call, it never loaded the versions after that one."""
    gate = tmp_path / "gate"  # the builds of `two` wait for it: a load that takes as long as the test wants
    wait = f"    import os, time\n    while not os.path.exists({str(gate)!r}):\n        time.sleep(0.02)\n"
    repo = tmp_path / "models"
    write(repo / "good", mlp(1))
    write(repo / "two" / "1", mlp(2, wait))
    write(repo / "two" / "2", mlp(3, wait))
    gate.touch()
    server = start(repo, model_control="explicit", engine_process=engine_process)
    try:
        with AttributionClient(server.address, retry=NO_RETRY) as client:
            client.unload_model("two", timeout=30)
            assert ("two", "1") not in states(client) and ("two", "2") not in states(client)
            gate.unlink()
            assert outcome(lambda: client.load_model("two", timeout=1.0))[0] == "DEADLINE_EXCEEDED"
            gate.touch()
            wait_for(lambda: states(client).get(("two", "2")) == ("MODEL_STATE_READY", ""), "version 2 to load after its caller left")
            assert states(client)[("two", "1")] == ("MODEL_STATE_READY", "")
            for version, seed in (("1", 2), ("2", 3)):
                np.testing.assert_allclose(ig(client, "two", version).attributions, captum(seed), atol=1e-5)
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            indexed = {(m.model, m.version): pb.ModelState.Name(m.state) for m in client.repository_index(timeout=30)}
            assert indexed == {("good", "1"): "MODEL_STATE_READY", ("two", "1"): "MODEL_STATE_READY", ("two", "2"): "MODEL_STATE_READY"}
            assert health(server.address) == SERVING
    finally:
        gate.touch()
        server.stop()
