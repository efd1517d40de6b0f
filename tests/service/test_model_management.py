"""Runtime model management through a real server built from a repository on disk: versions side by side, a
model that fails to load (reported, never fatal to the others), the ModelRepositoryService (explicit mode) and
repository polling. Every change is followed by Captum's numbers from what serves and by health telling the truth."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve_client import AttributionClient
from attrserve_client.client import NO_RETRY
from attrserve_engine import EngineLimits
from attrserve_service.config import ServerConfig
from attrserve_service.metrics import ATTRSERVE_MODEL_LOAD_FAILURES_TOTAL as LOAD_FAILURES
from servers import ServeProcess, ServerThread, scrape

SERVICE = "attrserve.v1.AttributionService"
X = np.array([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]], dtype=np.float32)
TARGET = [0, 1]
PINNED = 'inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 4 }\n'


def mlp(seed: int, first: str = "") -> str:
    """A model.py building a small MLP seeded with `seed`; `first`: code its build_model runs first (indented)."""
    return f"""
import torch
from torch import nn


def build_model():
{first}    torch.manual_seed({seed})
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
"""


BROKEN = "def build_model():\n    raise RuntimeError('no weights here')\n"


def captum(seed: int) -> np.ndarray:
    namespace: dict = {}
    exec(mlp(seed), namespace)
    model = namespace["build_model"]()
    return IntegratedGradients(model).attribute(torch.from_numpy(X), target=TARGET).numpy()


def write(folder: Path, source: str, config: str = PINNED) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.py").write_text(source)
    if config is not None:
        (folder / "config.pbtxt").write_text(config)


def start(repo: Path, **settings) -> ServerThread:
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False, drain_seconds=10.0)
    return ServerThread(None, ServerConfig(port=0, metrics_port=0, model_repository=repo, limits=limits, **settings))


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status


def ig(client: AttributionClient, model: str, version: str = ""):
    return client.attribute(model, "integrated_gradients", X, target=TARGET, model_version=version, timeout=60)


def states(client: AttributionClient) -> dict[tuple[str, str], tuple[str, str]]:
    return {(m.config.name, m.config.version): (pb.ModelState.Name(m.state), m.reason) for m in client.list_models(timeout=10)}


def in_state_and_serving(client: AttributionClient, server: ServerThread, key: tuple[str, str], state: str) -> bool:
    """Whether model version `key` is in `state` and health says SERVING: False while a new engine process starts
    (the calls get UNAVAILABLE)."""
    try:
        return states(client).get(key, ("",))[0] == state and health(server.address) == SERVING
    except grpc.RpcError:
        return False


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0, every: float = 0.05) -> None:
    until = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(every)


def ready_gauges(server: ServerThread) -> dict[tuple[str, str], float]:
    samples = scrape(server.running.metrics_port)
    return {(dict(labels)["model"], dict(labels)["version"]): v for (name, labels), v in samples.items() if name == "attrserve_model_ready"}


SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_model_that_fails_to_load_is_reported_while_the_others_serve(tmp_path) -> None:
    write(tmp_path / "good", mlp(1))
    write(tmp_path / "broken", BROKEN)
    write(tmp_path / "badconfig", mlp(1), "max_batch_rows: lots\n")
    write(tmp_path / "noreturn", "from torch import nn\n\n\ndef build_model():\n    model = nn.Linear(4, 2)\n")
    write(tmp_path / "m" / "1", mlp(2), config=None)  # versions in folders, one config beside them
    write(tmp_path / "m" / "2", mlp(3), config=None)
    (tmp_path / "m" / "config.pbtxt").write_text(PINNED)
    server = start(tmp_path)
    try:
        with AttributionClient(server.address) as client:
            assert health(server.address) == SERVING
            listed = states(client)
            assert listed[("good", "1")] == ("MODEL_STATE_READY", "")
            assert listed[("m", "1")] == ("MODEL_STATE_READY", "") and listed[("m", "2")] == ("MODEL_STATE_READY", "")
            assert listed[("broken", "1")] == ("MODEL_STATE_UNAVAILABLE", "RuntimeError: no weights here")
            # The files are named inside the repository: where it is on the server is no client's business.
            state, reason = listed[("badconfig", "1")]
            assert state == "MODEL_STATE_UNAVAILABLE" and reason.startswith("RepositoryError: badconfig/config.pbtxt: ") and "max_batch_rows" in reason
            # (it was "AttributeError: 'NoneType' object has no attribute 'to'", naming neither the file nor the function)
            why = "InvalidArgument: noreturn/model.py: build_model() returned NoneType, not a torch.nn.Module"
            assert listed[("noreturn", "1")] == ("MODEL_STATE_UNAVAILABLE", why)
            assert not [r for _, r in listed.values() if str(tmp_path) in r]

            info = client.get_model("broken")
            assert not info.ready and info.reason == "RuntimeError: no weights here" and info.config.inputs[0].name == "x"
            with pytest.raises(grpc.RpcError) as err:
                ig(client, "broken")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "model 'broken' version '1' cannot serve: RuntimeError: no weights here"

            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            newest = ig(client, "m")
            assert newest.model_version == "2"
            np.testing.assert_allclose(newest.attributions, captum(3), atol=1e-5)
            np.testing.assert_allclose(ig(client, "m", "1").attributions, captum(2), atol=1e-5)
            assert client.get_model("m").config.version == "2" and client.get_model("m").config.inputs[0].dims == [4]

        gauges = ready_gauges(server)  # (the registry is the process's: servers of earlier tests left theirs)
        want = {("good", "1"): 1.0, ("m", "1"): 1.0, ("m", "2"): 1.0, ("broken", "1"): 0.0, ("badconfig", "1"): 0.0, ("noreturn", "1"): 0.0}
        assert {key: gauges.get(key) for key in want} == want
        failures = {dict(labels)["model"]: v for (name, labels), v in scrape(server.running.metrics_port).items()
                    if name == "attrserve_model_load_failures_total"}
        assert failures["broken"] == 1.0 and failures["badconfig"] == 1.0 and failures["good"] == 0.0
    finally:
        server.stop()


def test_a_reason_names_the_repositorys_files_inside_it_and_leaves_other_folders_paths_alone(tmp_path) -> None:
    """A failure reason names the repository's files from the repository, and only those: a path elsewhere that ends
    in the repository's own (a mirror of it, or /var/models/... beside a repository in /models) lost that part and
    read "/mnt/snapshotw.pt"; and a version folder's files were named from the model's folder ("1/model.py", where a
    config error of the same version reads "v/1/config.pbtxt")."""
    repo = tmp_path / "models"
    write(repo / "good", mlp(1))
    elsewhere = f"/mnt/snapshot{repo}/w.pt"
    write(repo / "mirrored", f"def build_model():\n    raise RuntimeError({f'no {elsewhere}, nor {repo}/mirrored/w.pt'!r})\n")
    write(repo / "v" / "1", "def build_model():\n    return None\n", config=None)
    write(repo / "v" / "2", mlp(2), config=None)
    (repo / "v" / "config.pbtxt").write_text(PINNED)
    server = start(repo)
    try:
        with AttributionClient(server.address) as client:
            assert health(server.address) == SERVING
            listed = states(client)
            assert listed[("mirrored", "1")] == ("MODEL_STATE_UNAVAILABLE", f"RuntimeError: no {elsewhere}, nor mirrored/w.pt")
            why = "InvalidArgument: v/1/model.py: build_model() returned NoneType, not a torch.nn.Module"
            assert listed[("v", "1")] == ("MODEL_STATE_UNAVAILABLE", why)
            np.testing.assert_allclose(ig(client, "v", "2").attributions, captum(2), atol=1e-5)
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            assert health(server.address) == SERVING
    finally:
        server.stop()


LATIN1 = b'description: "caf\xe9"\n' + PINNED.encode()  # a Latin-1 e-acute, as a Windows editor saves it: not UTF-8


def test_a_config_that_cannot_be_read_or_has_bad_dims_is_unavailable_while_the_others_serve(tmp_path) -> None:
    """A config.pbtxt that is not UTF-8 (or is a folder) killed the engine process at start-up, so nothing served;
    dims of 0 or -2 loaded READY and refused every request. Each is now its model's UNAVAILABLE reason."""
    write(tmp_path / "good", mlp(1))
    write(tmp_path / "latin1", mlp(2), config=None)
    (tmp_path / "latin1" / "config.pbtxt").write_bytes(LATIN1)
    write(tmp_path / "folder", mlp(3), config=None)
    (tmp_path / "folder" / "config.pbtxt").mkdir()
    write(tmp_path / "neg", mlp(4), 'inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: -2 }\n')
    write(tmp_path / "zero", mlp(4), 'inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 0 }\n')
    server = start(tmp_path)
    try:
        with AttributionClient(server.address) as client:
            assert health(server.address) == SERVING
            listed = states(client)
            assert listed[("good", "1")] == ("MODEL_STATE_READY", "")
            why = "RepositoryError: latin1/config.pbtxt: not UTF-8 text: byte 0xe9 at offset 17 (invalid continuation byte)"
            assert listed[("latin1", "1")] == ("MODEL_STATE_UNAVAILABLE", why)
            why = "RepositoryError: folder/config.pbtxt: is a folder, not a file"
            assert listed[("folder", "1")] == ("MODEL_STATE_UNAVAILABLE", why)
            for name, dim in (("neg", -2), ("zero", 0)):
                state, reason = listed[(name, "1")]
                assert state == "MODEL_STATE_UNAVAILABLE" and f"model {name!r} inputs[0] ('x') dims[0] is {dim}: " in reason, reason
                with pytest.raises(grpc.RpcError) as err:
                    ig(client, name)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and f"dims[0] is {dim}" in err.value.details()
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
        gauges = ready_gauges(server)
        assert {key: gauges.get(key) for key in [("good", "1"), ("latin1", "1"), ("neg", "1")]} == {
            ("good", "1"): 1.0, ("latin1", "1"): 0.0, ("neg", "1"): 0.0}
    finally:
        server.stop()


def test_a_folder_that_cannot_be_read_never_stops_the_polling(tmp_path) -> None:
    """Under poll control a config.pbtxt that is not UTF-8, added later, made every poll fail with a traceback: no
    folder was added, changed or removed again, and RepositoryIndex answered INTERNAL. Now it is UNAVAILABLE with why,
    the polls go on, and it loads once fixed."""
    write(tmp_path / "good", mlp(1))
    server = start(tmp_path, model_control="poll", repository_poll_seconds=0.1)
    try:
        with AttributionClient(server.address) as client:
            write(tmp_path / "bad", mlp(2), config=None)
            (tmp_path / "bad" / "config.pbtxt").write_bytes(LATIN1)
            wait_for(lambda: "not UTF-8 text" in states(client).get(("bad", "1"), ("", ""))[1], "the unreadable config to be reported")
            write(tmp_path / "folder", mlp(3), config=None)
            (tmp_path / "folder" / "config.pbtxt").mkdir()
            write(tmp_path / "added", mlp(5))
            wait_for(lambda: states(client).get(("added", "1"), ("",))[0] == "MODEL_STATE_READY", "a folder added after it")
            np.testing.assert_allclose(ig(client, "added").attributions, captum(5), atol=1e-5)
            index = {(s.model, s.version): (pb.ModelState.Name(s.state), s.reason) for s in client.repository_index(timeout=10)}
            assert index[("bad", "1")][0] == index[("folder", "1")][0] == "MODEL_STATE_UNAVAILABLE"
            assert "is a folder, not a file" in index[("folder", "1")][1] and index[("good", "1")] == ("MODEL_STATE_READY", "")
            assert health(server.address) == SERVING

            (tmp_path / "bad" / "config.pbtxt").write_text(PINNED)  # fixed: loads and serves
            wait_for(lambda: states(client)[("bad", "1")] == ("MODEL_STATE_READY", ""), "the fixed config to load")
            np.testing.assert_allclose(ig(client, "bad").attributions, captum(2), atol=1e-5)
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            assert health(server.address) == SERVING
    finally:
        server.stop()


def test_a_version_int_cannot_read_is_a_name_and_never_stops_the_server(tmp_path) -> None:
    """A config's `version` of digits that int() does not read ("²", or more than 4,300 digits) broke the ordering of
    every model's versions: at start-up the engine process died (nothing served); added under polling, ListModels
    answered INTERNAL from then on and no model could be loaded or unloaded again. Versions are ordered as digits now
    (events.version_order never raises): "²" is a name, 5,000 ones a number; and a version folder named "²" is not a
    version folder (it made its whole model unreadable)."""
    write(tmp_path / "good", mlp(1))
    write(tmp_path / "super", mlp(2), PINNED + 'version: "\u00b2"\n')
    server = start(tmp_path, model_control="poll", repository_poll_seconds=0.1)
    try:
        with AttributionClient(server.address) as client:
            assert states(client)[("super", "\u00b2")][0] == "MODEL_STATE_READY"
            long = "1" * 5000
            write(tmp_path / "long", mlp(3), PINNED + f'version: "{long}"\n')
            wait_for(lambda: states(client).get(("long", long), ("",))[0] == "MODEL_STATE_READY", "the folder added later to load")
            write(tmp_path / "numbered" / "1", mlp(4))
            write(tmp_path / "numbered" / "\u00b2", mlp(5))
            write(tmp_path / "added", mlp(6))  # polling, loading and listing go on
            wait_for(lambda: states(client).get(("added", "1"), ("",))[0] == "MODEL_STATE_READY", "a folder added after them")
            wait_for(lambda: states(client).get(("numbered", "1"), ("",))[0] == "MODEL_STATE_READY", "the numbered folder")
            assert [key for key in states(client) if key[0] == "numbered"] == [("numbered", "1")]
            for name, seed in (("added", 6), ("numbered", 4), ("good", 1), ("super", 2), ("long", 3)):
                np.testing.assert_allclose(ig(client, name).attributions, captum(seed), atol=1e-5)
            index = {(s.model, s.version): pb.ModelState.Name(s.state) for s in client.repository_index(timeout=10)}
            assert index[("long", long)] == index[("super", "\u00b2")] == "MODEL_STATE_READY"
            assert health(server.address) == SERVING
        gauges = ready_gauges(server)
        assert {key: gauges.get(key) for key in [("good", "1"), ("super", "\u00b2"), ("long", long), ("added", "1")]} == {
            ("good", "1"): 1.0, ("super", "\u00b2"): 1.0, ("long", long): 1.0, ("added", "1"): 1.0}
    finally:
        server.stop()


@pytest.mark.parametrize("control", ["none", "explicit", "poll"])
def test_a_model_whose_load_ends_the_engine_process_is_unavailable_while_the_others_serve(tmp_path: Path, control: str) -> None:
    """A model whose code ends the engine process while it loads (os._exit here; a crash in a C extension, the OOM
    killer) was loaded again by every engine process after it: at start-up the server never started; added under
    polling, or loaded with LoadModel, every restart died the same way, and no model served again. Like a load the
    heartbeat kills, it is now not loaded by the processes after it: UNAVAILABLE with why, while the others serve."""
    write(tmp_path / "good", mlp(1))
    crasher = mlp(2, first="    import os\n    os._exit(7)\n")
    if control == "none":
        write(tmp_path / "crasher", crasher)
    server = start(tmp_path, model_control=control, repository_poll_seconds=0.1)
    try:
        with AttributionClient(server.address, retry=NO_RETRY) as client:
            if control == "explicit":
                write(tmp_path / "crasher", crasher)
                with pytest.raises(grpc.RpcError) as err:
                    client.load_model("crasher", timeout=60)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "exited (exit code 7)" in err.value.details()
            elif control == "poll":
                write(tmp_path / "crasher", crasher)
            settled = partial(in_state_and_serving, client, server, ("crasher", "1"), "MODEL_STATE_UNAVAILABLE")
            wait_for(settled, "the crashing model to be UNAVAILABLE and the server to serve again", timeout=120, every=0.2)
            assert "exited (exit code 7) while this version loaded" in states(client)[("crasher", "1")][1]
            with pytest.raises(grpc.RpcError) as err:
                ig(client, "crasher")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "exited (exit code 7)" in err.value.details()
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            if control == "poll":  # fixed: the next poll loads it
                write(tmp_path / "crasher", mlp(2))
                wait_for(lambda: states(client)[("crasher", "1")][0] == "MODEL_STATE_READY", "the fixed model to load")
                np.testing.assert_allclose(ig(client, "crasher").attributions, captum(2), atol=1e-5)
        gauges = ready_gauges(server)
        assert gauges[("good", "1")] == 1.0 and gauges[("crasher", "1")] == (1.0 if control == "poll" else 0.0)
    finally:
        server.stop()


def test_a_model_version_in_two_folders_is_an_error_and_never_replaces_the_one_that_serves(tmp_path) -> None:
    """Two folders whose configs name the same model and version: the first by folder name was served, so a folder
    added under polling (a copy of a model folder, its config's name kept) took the place of the load that served,
    silently (a log line at every poll, nothing in ListModels). Now the version is an error naming both folders: the
    load that serves keeps serving with it as its reason, and once one folder is gone it is that folder's again."""
    write(tmp_path / "good", mlp(1), PINNED + 'name: "good"\n')
    write(tmp_path / "x1", mlp(2), PINNED + 'name: "twice"\n')
    write(tmp_path / "x2", mlp(3), PINNED + 'name: "twice"\n')
    server = start(tmp_path, model_control="poll", repository_poll_seconds=0.1)
    try:
        with AttributionClient(server.address) as client:
            state, reason = states(client)[("twice", "1")]
            assert state == "MODEL_STATE_UNAVAILABLE" and "is in 2 folders (x1, x2)" in reason, reason
            write(tmp_path / "backup", mlp(4), PINNED + 'name: "good"\n')  # sorts before "good"
            wait_for(lambda: "is in 2 folders" in states(client)[("good", "1")][1], "the second folder to be reported")
            assert states(client)[("good", "1")][0] == "MODEL_STATE_READY"
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)  # still the first load's
            assert health(server.address) == SERVING
            shutil.rmtree(tmp_path / "backup")
            shutil.rmtree(tmp_path / "x1")
            wait_for(lambda: states(client)[("twice", "1")] == ("MODEL_STATE_READY", ""), "the folder left to load")
            wait_for(lambda: states(client)[("good", "1")] == ("MODEL_STATE_READY", ""), "the reason to go")
            np.testing.assert_allclose(ig(client, "twice").attributions, captum(3), atol=1e-5)
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            assert health(server.address) == SERVING
        gauges = ready_gauges(server)
        assert gauges[("good", "1")] == gauges[("twice", "1")] == 1.0
    finally:
        server.stop()


def test_a_model_that_sets_torchs_defaults_as_it_loads_sets_them_for_itself_alone(tmp_path) -> None:
    """A model.py that called torch.set_default_dtype(torch.float64) set it for the whole engine process: every model
    loaded after it failed its warm-up ("mat1 and mat2 must have the same dtype"), and those loaded before it failed
    gradient_shap (its random baselines were float64). torch's defaults are put back once a model's code has run."""
    double = mlp(2, first="    torch.set_default_dtype(torch.float64)\n    torch.set_float32_matmul_precision('high')\n")
    write(tmp_path / "a_double", double, 'inputs { name: "x" dtype: DATA_TYPE_FLOAT64 dims: 4 }\n')  # loads first
    write(tmp_path / "good", mlp(1))
    server = start(tmp_path)
    try:
        with AttributionClient(server.address) as client:
            assert states(client) == {("a_double", "1"): ("MODEL_STATE_READY", ""), ("good", "1"): ("MODEL_STATE_READY", "")}
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            shap = client.attribute("good", "gradient_shap", X, target=TARGET, timeout=60)
            assert shap.attributions.dtype == np.float32 and np.isfinite(shap.attributions).all()
            got = client.attribute("a_double", "integrated_gradients", X.astype(np.float64), target=TARGET, timeout=60)
            assert got.attributions.dtype == np.float64
            assert health(server.address) == SERVING
    finally:
        server.stop()
    namespace: dict = {}
    exec(double, namespace)
    try:
        model = namespace["build_model"]()
    finally:
        torch.set_default_dtype(torch.float32)
        torch.set_float32_matmul_precision("highest")
    want = IntegratedGradients(model).attribute(torch.from_numpy(X.astype(np.float64)), target=TARGET).numpy()
    np.testing.assert_allclose(got.attributions, want, atol=1e-9)


def test_strict_readiness_is_not_serving_while_a_model_is_not_ready(tmp_path) -> None:
    write(tmp_path / "good", mlp(1))
    write(tmp_path / "broken", BROKEN)
    server = start(tmp_path, strict_readiness=True, model_control="explicit")
    try:
        with AttributionClient(server.address) as client:
            assert health(server.address) == NOT_SERVING
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)  # it still computes
            client.unload_model("broken", timeout=30)  # the operator removes what cannot serve
            assert health(server.address) == SERVING
    finally:
        server.stop()


def test_explicit_reload_under_load_loses_nothing_and_swaps_the_numbers(tmp_path) -> None:
    write(tmp_path / "good", mlp(1))
    write(tmp_path / "other", mlp(4))
    server = start(tmp_path, model_control="explicit")
    old, new = captum(1), captum(7)
    results: list[np.ndarray] = []
    errors: list[BaseException] = []
    healths: list[int] = []
    stop = threading.Event()

    def caller() -> None:
        with AttributionClient(server.address) as client:
            while not stop.is_set():
                try:
                    results.append(ig(client, "good").attributions)
                except BaseException as e:  # noqa: BLE001 - any failure fails the test
                    errors.append(e)

    def watcher() -> None:
        while not stop.is_set():
            healths.append(health(server.address))
            time.sleep(0.02)

    threads = [threading.Thread(target=caller) for _ in range(4)] + [threading.Thread(target=watcher)]
    try:
        with AttributionClient(server.address) as client:
            for t in threads:
                t.start()
            wait_for(lambda: len(results) >= 20, "requests before the reload")
            write(tmp_path / "good", mlp(7))
            statuses = client.load_model("good", timeout=120)
            assert [(s.model, s.version, pb.ModelState.Name(s.state)) for s in statuses] == [("good", "1", "MODEL_STATE_READY")]
            after = len(results)
            wait_for(lambda: len(results) >= after + 20, "requests after the reload")
            stop.set()
            for t in threads:
                t.join(60)
            assert not errors, errors[:3]
            matches_old = [np.allclose(r, old, atol=1e-5) for r in results]
            matches_new = [np.allclose(r, new, atol=1e-5) for r in results]
            assert all(o or n for o, n in zip(matches_old, matches_new))  # every answer is one load's exact numbers
            assert any(matches_old) and all(matches_new[after + 4 :])  # the old load answered; later calls get the new one
            assert set(healths) == {SERVING}
            np.testing.assert_allclose(ig(client, "other").attributions, captum(4), atol=1e-5)
    finally:
        stop.set()
        server.stop()


def test_unload_and_load_back_through_the_admin_service(tmp_path) -> None:
    write(tmp_path / "good", mlp(1))
    write(tmp_path / "m" / "1", mlp(2))
    write(tmp_path / "m" / "2", mlp(3))
    server = start(tmp_path, model_control="explicit")
    try:
        with AttributionClient(server.address) as client, grpc.insecure_channel(server.address) as channel:
            admin = pb_grpc.ModelRepositoryServiceStub(channel)
            admin.UnloadModel(pb.UnloadModelRequest(model="m", version="2"), timeout=30)
            assert ig(client, "m").model_version == "1"  # the newest version left
            index = admin.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
            assert [(s.model, s.version, pb.ModelState.Name(s.state)) for s in index] == [
                ("good", "1", "MODEL_STATE_READY"), ("m", "1", "MODEL_STATE_READY"), ("m", "2", "MODEL_STATE_UNLOADED")]
            assert [s.version for s in admin.RepositoryIndex(pb.RepositoryIndexRequest(ready_only=True), timeout=10).models] == ["1", "1"]
            assert ("m", "2") not in ready_gauges(server)  # its series is gone, not stuck at 0

            admin.UnloadModel(pb.UnloadModelRequest(model="good"), timeout=30)
            admin.UnloadModel(pb.UnloadModelRequest(model="m"), timeout=30)
            assert health(server.address) == NOT_SERVING  # nothing left that can compute
            with pytest.raises(grpc.RpcError) as err:
                ig(client, "good")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND

            loaded = admin.LoadModel(pb.LoadModelRequest(model="m"), timeout=120).models
            assert [(s.version, pb.ModelState.Name(s.state)) for s in loaded] == [("1", "MODEL_STATE_READY"), ("2", "MODEL_STATE_READY")]
            assert health(server.address) == SERVING
            newest = ig(client, "m")
            assert newest.model_version == "2"
            np.testing.assert_allclose(newest.attributions, captum(3), atol=1e-5)

            # A version removed from the folder is unloaded by a load of the whole model.
            shutil.rmtree(tmp_path / "m" / "2")
            loaded = admin.LoadModel(pb.LoadModelRequest(model="m"), timeout=120).models
            assert [s.version for s in loaded] == ["1"]

            # Errors name what is wrong.
            with pytest.raises(grpc.RpcError) as err:
                admin.LoadModel(pb.LoadModelRequest(model="nope"), timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "model 'nope' is not in the model repository"
            with pytest.raises(grpc.RpcError) as err:  # (both named the repository's folder on the server)
                admin.LoadModel(pb.LoadModelRequest(model="m", version="7"), timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND and err.value.details() == "model 'm' has no version '7' in the model repository"
            assert health(server.address) == SERVING
            np.testing.assert_allclose(ig(client, "m").attributions, captum(2), atol=1e-5)
            with pytest.raises(grpc.RpcError) as err:
                admin.UnloadModel(pb.UnloadModelRequest(model="good"), timeout=30)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            write(tmp_path / "good", BROKEN)
            with pytest.raises(grpc.RpcError) as err:
                admin.LoadModel(pb.LoadModelRequest(model="good"), timeout=60)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert err.value.details() == "model 'good' version '1' could not be loaded: RuntimeError: no weights here"
            assert health(server.address) == SERVING  # m still serves
            np.testing.assert_allclose(ig(client, "m").attributions, captum(2), atol=1e-5)
    finally:
        server.stop()


def test_a_reload_right_after_an_edit_runs_the_edited_code(tmp_path, monkeypatch) -> None:
    """model.py rewritten at the same length within a second: Python's .pyc check (mtime in seconds, size) would
    call it unchanged; every load compiles the source as it is."""
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as in a server run without PYTHONDONTWRITEBYTECODE
    source = tmp_path / "good" / "model.py"
    second = int(time.time()) * 10**9

    def edit(seed: int) -> None:  # the same length, and an mtime within the same second as the last edit
        write(tmp_path / "good", mlp(seed))
        os.utime(source, ns=(second + seed, second + seed))

    edit(1)
    server = start(tmp_path, model_control="explicit")
    try:
        with AttributionClient(server.address) as client:
            for seed in (2, 3, 4):
                edit(seed)
                client.load_model("good", timeout=60)
                np.testing.assert_allclose(ig(client, "good").attributions, captum(seed), atol=1e-5)
    finally:
        server.stop()


def test_the_admin_service_is_refused_unless_explicit(tmp_path) -> None:
    write(tmp_path / "good", mlp(1))
    server = start(tmp_path)
    try:
        with AttributionClient(server.address) as client, grpc.insecure_channel(server.address) as channel:
            admin = pb_grpc.ModelRepositoryServiceStub(channel)
            for call in (lambda: admin.LoadModel(pb.LoadModelRequest(model="good"), timeout=10),
                         lambda: admin.UnloadModel(pb.UnloadModelRequest(model="good"), timeout=10)):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--model-control explicit" in err.value.details()
            assert [s.model for s in admin.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models] == ["good"]
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            assert health(server.address) == SERVING
    finally:
        server.stop()


def test_polling_follows_the_repository(tmp_path) -> None:
    write(tmp_path / "good", mlp(1))
    server = start(tmp_path, model_control="poll", repository_poll_seconds=0.1)
    try:
        with AttributionClient(server.address) as client:
            write(tmp_path / "added", mlp(5))
            wait_for(lambda: states(client).get(("added", "1"), ("",))[0] == "MODEL_STATE_READY", "a new folder to load")
            np.testing.assert_allclose(ig(client, "added").attributions, captum(5), atol=1e-5)

            write(tmp_path / "added", mlp(6))  # changed: reloaded
            wait_for(lambda: np.allclose(ig(client, "added").attributions, captum(6), atol=1e-5), "the changed folder to reload")

            write(tmp_path / "added", BROKEN)  # a broken change: the previous load keeps serving
            wait_for(lambda: "its last reload failed" in states(client)[("added", "1")][1], "the failed reload to be reported")
            np.testing.assert_allclose(ig(client, "added").attributions, captum(6), atol=1e-5)

            write(tmp_path / "late", BROKEN)  # broken from the start: reported, then fixed
            wait_for(lambda: states(client).get(("late", "1"), ("",))[0] == "MODEL_STATE_UNAVAILABLE", "the broken folder")
            write(tmp_path / "late", mlp(8))
            wait_for(lambda: states(client)[("late", "1")][0] == "MODEL_STATE_READY", "the fixed folder to load")
            np.testing.assert_allclose(ig(client, "late").attributions, captum(8), atol=1e-5)

            shutil.rmtree(tmp_path / "added")  # removed: unloaded
            wait_for(lambda: ("added", "1") not in states(client), "the removed folder to unload")
            with pytest.raises(grpc.RpcError) as err:
                ig(client, "added")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            assert health(server.address) == SERVING
            with pytest.raises(grpc.RpcError) as err:  # the folder is the truth: no explicit loads
                client.load_model("good", timeout=10)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        server.stop()


def stuck_mlp(seed: int, release: Path) -> str:
    """mlp(seed), whose build waits until `release` exists: a load stuck in the model's code (a download that stalls)."""
    return mlp(seed, f"    import os, time\n    while not os.path.exists({str(release)!r}):\n        time.sleep(0.02)\n")


def start_stuck(repo: Path, **settings) -> tuple[ServerThread, float]:
    """A server whose loads are given up after 2 s, and the seconds it took to start."""
    limits = EngineLimits(default_device="cpu", probe_batch_rows=False, drain_seconds=10.0, stuck_load_seconds=2.0)
    started = time.monotonic()
    server = ServerThread(None, ServerConfig(port=0, metrics_port=0, model_repository=repo, limits=limits, **settings))
    return server, time.monotonic() - started


def load_failures(server: ServerThread) -> float:
    return scrape(server.running.metrics_port)[("attrserve_model_load_failures_total", frozenset({("model", "stuck")}))]


STUCK_REASON = "LoadStuck: its load did not finish within 2 s (stuck_load_seconds): the model's code"


@pytest.mark.parametrize("engine_process", [True, False], ids=["engine-process", "one-process"])
def test_a_load_stuck_in_the_models_code_is_given_up_the_others_serve_and_it_serves_once_it_returns(tmp_path, engine_process) -> None:
    """A model whose build never returned held the server's start-up for ever: the port never opened, and Kubernetes'
    start-up probe restarted the pod into the same wait. Now its load is given up after --stuck-load-seconds: the server
    starts with the other models, the stuck one is UNAVAILABLE saying why, and when its load returns after all it
    serves Captum's numbers."""
    release = tmp_path / "release"
    repo = tmp_path / "models"
    write(repo / "good", mlp(1))
    write(repo / "stuck", stuck_mlp(4, release))
    failed_before = LOAD_FAILURES.labels("stuck")._value.get()
    server, seconds = start_stuck(repo, model_control="explicit", engine_process=engine_process)
    try:
        assert seconds >= 2.0
        with AttributionClient(server.address) as client:
            assert health(server.address) == SERVING
            listed = states(client)
            assert listed[("good", "1")] == ("MODEL_STATE_READY", "")
            assert listed[("stuck", "1")][0] == "MODEL_STATE_UNAVAILABLE" and listed[("stuck", "1")][1].startswith(STUCK_REASON)
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            with pytest.raises(grpc.RpcError) as err:
                ig(client, "stuck")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details().startswith(f"model 'stuck' version '1' cannot serve: {STUCK_REASON}")
            with pytest.raises(grpc.RpcError) as err:  # not loaded again while the stuck load runs
                client.load_model("stuck", timeout=30)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and STUCK_REASON in err.value.details()
            assert load_failures(server) == failed_before + 1.0  # (this process's registry holds earlier servers' too)
            assert ready_gauges(server)[("stuck", "1")] == 0.0

            release.touch()  # the stuck load returns: it serves
            wait_for(lambda: states(client)[("stuck", "1")] == ("MODEL_STATE_READY", ""), "the stuck load to return and serve")
            np.testing.assert_allclose(ig(client, "stuck").attributions, captum(4), atol=1e-5)
            client.load_model("stuck", timeout=60)  # and it loads again
            np.testing.assert_allclose(ig(client, "stuck").attributions, captum(4), atol=1e-5)
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            assert health(server.address) == SERVING
            assert ready_gauges(server)[("stuck", "1")] == 1.0 and load_failures(server) == failed_before + 1.0
    finally:
        release.touch()
        server.stop()


def test_a_stuck_load_no_longer_holds_the_polling_of_the_repository(tmp_path) -> None:
    """Polling loads one folder after another: a load that never returned stopped every later poll, so no model was
    added, changed or removed again. Now the stuck load is given up and the polls go on."""
    release = tmp_path / "release"
    repo = tmp_path / "models"
    write(repo / "good", mlp(1))
    server, _ = start_stuck(repo, model_control="poll", repository_poll_seconds=0.1)
    try:
        with AttributionClient(server.address) as client:
            write(repo / "stuck", stuck_mlp(4, release))
            wait_for(lambda: states(client).get(("stuck", "1"), ("", ""))[1].startswith(STUCK_REASON), "the load to be given up")
            write(repo / "added", mlp(5))
            wait_for(lambda: states(client).get(("added", "1"), ("",))[0] == "MODEL_STATE_READY", "a folder added after it")
            np.testing.assert_allclose(ig(client, "added").attributions, captum(5), atol=1e-5)
            release.touch()
            wait_for(lambda: states(client)[("stuck", "1")] == ("MODEL_STATE_READY", ""), "the stuck load to return and serve")
            np.testing.assert_allclose(ig(client, "stuck").attributions, captum(4), atol=1e-5)
            np.testing.assert_allclose(ig(client, "good").attributions, captum(1), atol=1e-5)
            assert health(server.address) == SERVING
    finally:
        release.touch()
        server.stop()


def test_the_start_up_line_names_the_models_that_serve_and_those_that_do_not(tmp_path) -> None:
    """It named every model the engine knew as served, one whose load failed or was given up among them."""
    write(tmp_path / "good", mlp(1))
    write(tmp_path / "broken", BROKEN)
    with ServeProcess(["--model-repository", str(tmp_path), "--no-batch-probe"]) as server:
        assert "attrserve serving good (not serving: broken v1: unavailable) on " in server.output(), server.output()


def test_a_pass_that_ends_the_engine_process_while_a_load_runs_leaves_the_load_to_the_next_one(tmp_path: Path) -> None:
    """The engine process exits while a pass runs (a query of death) and a load runs beside it: the pass is the suspect,
    and the load is not skipped by the engine processes after it (a load that ends the process is; blaming every load
    that ran at a death left a version a poll had just added UNAVAILABLE until its files changed)."""
    gate = tmp_path / "gate"
    write(tmp_path / "repo" / "good", mlp(1))
    crash_on = "    def forward(self, x):\n        if bool((x == 4242.0).any()):\n            import os, time\n            time.sleep(1.0)\n            os._exit(13)\n        return super().forward(x)\n"
    write(tmp_path / "repo" / "crashy", mlp(2).replace("def build_model():", "class Crashy(nn.Sequential):\n" + crash_on + "\n\ndef build_model():")
          .replace("return nn.Sequential(", "return Crashy("))
    server = start(tmp_path / "repo", model_control="poll", repository_poll_seconds=0.1)
    try:
        with AttributionClient(server.address, retry=NO_RETRY) as client:
            np.testing.assert_allclose(ig(client, "crashy").attributions, captum(2), atol=1e-5)
            write(tmp_path / "repo" / "slow", mlp(3, first=f"    import os, time\n    while not os.path.exists({str(gate)!r}):\n        time.sleep(0.02)\n"))
            wait_for(lambda: bool(server.running.core._loading), "the poll to start loading `slow`")
            with pytest.raises(grpc.RpcError) as crashed:
                client.attribute("crashy", "saliency", np.full((1, 4), 4242.0, np.float32), target=0, timeout=30)
            assert crashed.value.code() == grpc.StatusCode.UNAVAILABLE and "exit code 13" in crashed.value.details()
            gate.touch()
            slow_serves = partial(in_state_and_serving, client, server, ("slow", "1"), "MODEL_STATE_READY")
            wait_for(slow_serves, "the next engine process to load `slow`", timeout=120, every=0.2)
            assert ("slow", "1") not in server.running.core._stuck_loads
            for name, seed in (("slow", 3), ("good", 1)):
                np.testing.assert_allclose(ig(client, name).attributions, captum(seed), atol=1e-5)
    finally:
        server.stop()
