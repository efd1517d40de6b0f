"""The TypeScript client (clients/typescript): compiled with tsc and driven by node (tests/clients/ts_smoke.cjs)
against a live in-process server, and its generated code checked fresh against protos/.

Needs node and clients/typescript/node_modules (`make test` runs `npm ci` there): without them these tests fail,
they are never skipped."""

from __future__ import annotations

import filecmp
import json
import os
import pathlib
import shutil
import subprocess
import sys

import grpc
import pytest
import torch
from captum.attr import IntegratedGradients, NoiseTunnel, Saliency
from grpc_health.v1 import health_pb2, health_pb2_grpc

import oracle
from attrserve_service.config import ServerConfig
from servers import ServerThread, oracle_engine, start_server

ROOT = pathlib.Path(__file__).resolve().parents[2]
TS_ROOT = ROOT / "clients" / "typescript"
SMOKE = pathlib.Path(__file__).with_name("ts_smoke.cjs")
X = [[0.2961119413, 0.5165622830, 0.2516707182], [0.6885567904, 0.0739724636, 0.8665219545]]
TOKEN = "ts-client-token-0123456789"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: the TypeScript client tests need Node.js 20+")
    if not (TS_ROOT / "node_modules" / "typescript").is_dir():
        pytest.fail("clients/typescript/node_modules is missing: run `cd clients/typescript && npm ci` (make test does)")
    return node


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> pathlib.Path:
    """src/ compiled with the pinned tsc into a temporary folder (the checkout's dist/ is left alone)."""
    node = _node()
    out = tmp_path_factory.mktemp("ts-dist")
    tsc = TS_ROOT / "node_modules" / "typescript" / "bin" / "tsc"
    done = subprocess.run([node, str(tsc), "-p", str(TS_ROOT / "tsconfig.json"), "--outDir", str(out)],
                          cwd=TS_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"tsc failed:\n{done.stdout}\n{done.stderr}"
    assert (out / "index.js").is_file() and (out / "index.d.ts").is_file()
    return out


def run_smoke(dist: pathlib.Path, *args: str) -> dict:
    # dist/ lies outside clients/typescript: NODE_PATH lets its require() find @grpc/grpc-js and @bufbuild/protobuf.
    env = {**os.environ, "NODE_PATH": str(TS_ROOT / "node_modules")}
    done = subprocess.run([_node(), str(SMOKE), str(dist), *args], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"node {SMOKE.name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def server():
    s = start_server(max_rows_per_request=20_000, max_n_steps=500)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def smoke(dist, server) -> dict:
    return run_smoke(dist, server.address)


def captum_ig(target, **kwargs) -> torch.Tensor:
    model = oracle.MODELS["toy"]().eval()
    x = torch.tensor(X, dtype=torch.float32)
    return IntegratedGradients(model).attribute(x, target=target, **kwargs)


def as_tensor(t: dict) -> torch.Tensor:
    return torch.tensor(t["data"], dtype=torch.float64).reshape(t["shape"])


def test_integrated_gradients_equal_captum(smoke):
    ig = smoke["ig"]
    assert ig["attributions"]["shape"] == [2, 3]
    assert ig["attributions"]["dtype"] == "float32" and ig["attributions"]["typedArray"] == "Float32Array"
    expected, delta = captum_ig(0, baselines=0.0, return_convergence_delta=True)
    torch.testing.assert_close(as_tensor(ig["attributions"]), expected.double(), atol=1e-5, rtol=0)
    assert ig["convergenceDelta"]["shape"] == [2]
    torch.testing.assert_close(as_tensor(ig["convergenceDelta"]), delta.double(), atol=1e-5, rtol=0)
    assert ig["modelVersion"] == "1"
    assert int(ig["seed"]) >= 0
    timing = ig["timing"]
    assert timing["rows"] > 0 and timing["passes"] >= 1 and timing["totalMs"] >= timing["computeMs"] > 0


def test_typed_array_input_per_example_target_and_params(smoke):
    """A Float32Array with a shape, target [0, 1] (one per example) and Captum-named params reach the server."""
    typed = smoke["typed"]
    assert typed["seed"] == "7"
    expected = captum_ig(torch.tensor([0, 1]), n_steps=20, method="riemann_trapezoid", internal_batch_size=3)
    torch.testing.assert_close(as_tensor(typed["attributions"]), expected.double(), atol=1e-5, rtol=0)


def test_captums_memory_hints_are_taken(smoke):
    """internal_batch_size (in the test above) and NoiseTunnel's nt_samples_batch_size reach the server on the typed
    messages and change nothing: the numbers are Captum's, seeded as the server seeds."""
    torch.manual_seed(4)
    x = torch.tensor(X, dtype=torch.float32)
    expected = NoiseTunnel(Saliency(oracle.MODELS["toy"]().eval())).attribute(x, target=0, nt_samples=3, stdevs=0.1, nt_samples_batch_size=3)
    torch.testing.assert_close(as_tensor(smoke["smoothed"]["attributions"]), expected.double(), atol=1e-5, rtol=0)


def test_multi_input_model(smoke):
    """An array of tensors is one per input (a Float64Array cast to float32, a plain number array), with one
    baseline per input (a scalar, a broadcast row); attributions come back one per input, in order."""
    multi = smoke["multi"]
    x1 = torch.tensor([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]])
    x2 = torch.tensor([[0.7, -1.1, 0.05], [-0.3, 0.8, 1.2]])
    expected = IntegratedGradients(oracle.MODELS["multi"]().eval()).attribute(
        (x1, x2), baselines=(0.5, torch.tensor([[0.1, 0.2, 0.3]])), target=1, n_steps=16)
    assert [a["shape"] for a in multi["attributions"]] == [[2, 4], [2, 3]]
    assert [a["typedArray"] for a in multi["attributions"]] == ["Float32Array", "Float32Array"]
    for got, nested, want in zip(multi["attributions"], multi["nested"], expected):
        torch.testing.assert_close(as_tensor(got), want.double(), atol=1e-5, rtol=0)
        assert nested == as_tensor(got).tolist()


@pytest.mark.parametrize(("case", "strides"), [("occlusion", (2, 1)), ("occlusionMixed", (1, (2,)))])
def test_occlusion_strides_in_captums_per_input_forms(smoke, case, strides):
    """strides [2, 1] for two inputs is one int per input, as in Captum (it was sent as one input's list, which the
    server refused), and [1, [2]] mixes an int and a list (it was refused by the client)."""
    from captum.attr import Occlusion

    inputs = (torch.tensor([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]]), torch.tensor([[0.7, -1.1, 0.05], [-0.3, 0.8, 1.2]]))
    want = Occlusion(oracle.MODELS["multi"]().eval()).attribute(inputs, sliding_window_shapes=((2,), (2,)), strides=strides, target=1)
    for got, w in zip(smoke[case], want):
        torch.testing.assert_close(as_tensor(got), w.double(), atol=1e-5, rtol=0)


def test_list_and_get_model(smoke):
    names = [m["name"] for m in smoke["models"]]
    assert {"toy", "mlp", "conv", "multi"} <= set(names)
    assert all(m["ready"] for m in smoke["models"])
    listed_toy = next(m for m in smoke["models"] if m["name"] == "toy")
    toy = smoke["toy"]
    assert toy["name"] == "toy"
    assert toy["layers"] == ["lin1", "relu", "lin2"]
    assert "integrated_gradients" in toy["algorithms"] and "saliency" in toy["algorithms"]
    assert toy["algorithms"] == listed_toy["algorithms"]


@pytest.mark.parametrize(("case", "code", "names"), [
    ("badTarget", 3, "target"),  # refused by the server
    ("badParams", 3, "n_steps"),  # refused by the server
    ("unknownParam", 3, "nsteps"),  # refused by the client before sending, with the same error class and code
    ("unknownModel", 5, "no-such-model"),
])
def test_errors_carry_the_status_code_and_message(smoke, case, code, names):
    error = smoke[case]
    assert error["thrown"], f"{case} did not throw"
    assert error["isAttrserveError"] and error["isError"] and error["name"] == "AttrserveError"
    assert error["code"] == code
    assert error["codeName"] == {3: "INVALID_ARGUMENT", 5: "NOT_FOUND"}[code]
    assert names in error["details"]
    assert error["message"] == f"{error['codeName']}: {error['details']}"


def test_bad_params_message_names_the_field(smoke):
    assert smoke["badParams"]["details"] == "integrated_gradients.n_steps must be at least 1, got 0"
    assert "valid: n_steps, method, multiply_by_inputs" in smoke["unknownParam"]["details"]


@pytest.mark.parametrize(("case", "names"), [
    ("wideUint8", "inputs[0].data[0]: 300 is outside uint8's range [0, 255]"),  # was sent as 44
    ("wideInt32", "inputs[0].data[0]: 3000000000 is outside int32's range"),  # was sent as -1294967296
    ("fractionalParam", "params.n_steps: 1.5 does not fit the field"),  # was INTERNAL (grpc-js's serializer)
    ("wideParam", "params.n_steps: 1099511627776 does not fit the field"),  # was INTERNAL
    ("wideTarget", "target: 1180591620717411303424 is outside int64's range"),  # was INTERNAL
    ("bigintPluginParam", "params.k: 1n cannot be sent as JSON-like parameters"),  # was INTERNAL
    ("nanDeadline", "deadline: expected a positive number of milliseconds (Infinity: none), got NaN"),  # was DEADLINE_EXCEEDED
    ("negativeDeadline", "deadline: expected a positive number of milliseconds (Infinity: none), got -5"),
])
def test_values_the_wire_cannot_hold_are_invalid_argument_naming_the_field(smoke, case, names):
    error = smoke[case]
    assert error["thrown"] and error["isAttrserveError"], error
    assert error["code"] == 3 and error["codeName"] == "INVALID_ARGUMENT", error
    assert names in error["details"], error


def test_a_deadline_past_what_grpc_js_holds_is_none_and_the_server_still_answers(smoke, server):
    """A deadline of 1e20 ms made grpc-js throw outside any promise: the node process exited."""
    assert smoke["farDeadline"] >= 4
    assert smoke["igAgain"]["attributions"] == smoke["ig"]["attributions"]
    expected, delta = captum_ig(0, baselines=0.0, return_convergence_delta=True)
    torch.testing.assert_close(as_tensor(smoke["igAgain"]["attributions"]), expected.double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(as_tensor(smoke["igAgain"]["convergenceDelta"]), delta.double(), atol=1e-5, rtol=0)
    with grpc.insecure_channel(server.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_token_is_sent_as_bearer_header(dist, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    s = ServerThread(oracle_engine(), ServerConfig(port=0, metrics_port=0, auth_tokens_file=tokens))
    try:
        out = run_smoke(dist, s.address, TOKEN)
    finally:
        s.stop()
    assert "toy" in out["models"]
    for case in ("withoutToken", "wrongToken"):
        assert out[case]["thrown"] and out[case]["isAttrserveError"], out[case]
        assert out[case]["code"] == 16, out[case]  # UNAUTHENTICATED


def test_generated_code_is_fresh(tmp_path):
    """src/gen/ is what generate.sh makes of protos/ now."""
    _node()
    out = tmp_path / "gen"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(TS_ROOT / "generate.sh"), str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"generate.sh failed:\n{done.stdout}\n{done.stderr}"
    committed = TS_ROOT / "src" / "gen"
    fresh = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    kept = sorted(p.relative_to(committed).as_posix() for p in committed.rglob("*") if p.is_file())
    stale = "clients/typescript/src/gen is stale: run clients/typescript/generate.sh (or make protos) and commit the result"
    assert fresh == kept, f"{stale}\nfiles differ: generated {fresh}, committed {kept}"
    differing = [f for f in fresh if not filecmp.cmp(out / f, committed / f, shallow=False)]
    assert not differing, f"{stale}\ndiffering files: {differing}"
