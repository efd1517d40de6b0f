"""Both clients and the CLI against in-process fake AttributionServices (sync and grpc.aio)."""

import contextlib
import json
import os
import pathlib
import subprocess
import sys

import grpc
import numpy as np
import pytest

from attrserve.v1 import attribution_service_pb2 as pb
from attrserve.v1 import attribution_service_pb2_grpc as pb_grpc
from attrserve.v1 import tensor_pb2
from attrserve_client import AsyncAttributionClient, AttributionClient, from_tensor_proto, to_tensor_proto
from attrserve_client import cli
from servers import fake_server

CLIENT_ROOT = pathlib.Path(__file__).resolve().parents[2] / "clients" / "python"
X = np.array([[0.2961, 0.5166, 0.2517], [0.6886, 0.0740, 0.8665]], dtype=np.float32)
Y = np.array([[1.0], [2.0]], dtype=np.float32)
BROKEN = "model 'broken' rejects every request"
MODEL = pb.ModelInfo(config={"name": "toy", "version": "1"}, ready=True, state=pb.MODEL_STATE_READY,
                     algorithms=[pb.ALGORITHM_INTEGRATED_GRADIENTS, pb.ALGORITHM_SALIENCY],
                     refused=[pb.RefusedAlgorithm(name="lrp", reason="LRP has no rule for module 'norm' (LayerNorm)")])
DT = tensor_pb2.DataType


def typed_model(name, *dtypes):
    """A model whose config declares its inputs' dtypes (what the CLI casts JSON data to)."""
    inputs = [{"name": f"x{i}", "dtype": d, "dims": [-1]} for i, d in enumerate(dtypes)]
    return pb.ModelInfo(config={"name": name, "version": "1", "inputs": inputs}, ready=True,
                        algorithms=[pb.ALGORITHM_INTEGRATED_GRADIENTS, pb.ALGORITHM_SALIENCY])


# What GetModel knows; Attribute answers for any model but "broken" (so "unlisted" tests a failing GetModel).
GET_MODEL = {m.config.name: m for m in [
    MODEL,
    typed_model("toy_f32", DT.DATA_TYPE_FLOAT32),
    typed_model("toy_i64", DT.DATA_TYPE_INT64),
    typed_model("toy_mixed", DT.DATA_TYPE_FLOAT64, DT.DATA_TYPE_INT32, DT.DATA_TYPE_BFLOAT16, DT.DATA_TYPE_UNSPECIFIED),
]}


def respond(request: pb.AttributeRequest) -> pb.AttributeResponse:
    """Attributions are the inputs times 2; the delta is zeros; outputs are the row sums."""
    first = from_tensor_proto(request.inputs[0])
    rows = first.shape[0]
    response = pb.AttributeResponse(
        request_id=request.request_id,
        attributions=[to_tensor_proto(from_tensor_proto(t) * 2) for t in request.inputs],
        model_version=request.model_version or "1",
        seed=request.seed if request.HasField("seed") else 1234,
        timing=pb.Timing(queue_ms=0.5, compute_ms=1.25, total_ms=2.0, rows=rows, passes=1,
                         pass_rows=rows + 4, pass_requests=3),
    )
    if request.return_convergence_delta:
        response.convergence_delta.CopyFrom(to_tensor_proto(np.zeros(rows, np.float32)))
    if request.return_outputs:
        response.outputs.CopyFrom(to_tensor_proto(first.reshape(rows, -1).sum(axis=1)))
    return response


def stream_response(request: pb.AttributeRequest) -> pb.AttributeStreamResponse:
    if request.model == "broken":
        error = pb.RequestError(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=BROKEN)
        return pb.AttributeStreamResponse(request_id=request.request_id, error=error)
    return pb.AttributeStreamResponse(request_id=request.request_id, response=respond(request))


class SyncFake(pb_grpc.AttributionServiceServicer):
    def __init__(self):
        self.requests = []
        self.get_model_requests = []

    def Attribute(self, request, context):
        self.requests.append(request)
        if request.model == "broken":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, BROKEN)
        return respond(request)

    def AttributeStream(self, request_iterator, context):
        for item in request_iterator:
            yield stream_response(item.request)

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[MODEL])

    def GetModel(self, request, context):
        self.get_model_requests.append(request)
        if request.model not in GET_MODEL:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        return pb.GetModelResponse(model=GET_MODEL[request.model])


class AsyncFake(pb_grpc.AttributionServiceServicer):
    def __init__(self):
        self.requests = []
        self.get_model_requests = []

    async def Attribute(self, request, context):
        self.requests.append(request)
        if request.model == "broken":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, BROKEN)
        return respond(request)

    async def AttributeStream(self, request_iterator, context):
        async for item in request_iterator:
            yield stream_response(item.request)

    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[MODEL])

    async def GetModel(self, request, context):
        self.get_model_requests.append(request)
        if request.model not in GET_MODEL:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        return pb.GetModelResponse(model=GET_MODEL[request.model])


@pytest.fixture
def sync_server():
    fake = SyncFake()
    with fake_server(fake, workers=4) as address:
        yield address, fake


@contextlib.asynccontextmanager
async def aio_server():
    fake = AsyncFake()
    server = grpc.aio.server()
    pb_grpc.add_AttributionServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", fake
    finally:
        await server.stop(None)


# --- sync client -------------------------------------------------------------------------------

def test_sync_single_input(sync_server):
    address, fake = sync_server
    with AttributionClient(address) as client:
        result = client.attribute("toy", "integrated_gradients", X, target=0, baselines=0,
                                  params={"n_steps": 50}, seed=7, return_convergence_delta=True,
                                  return_outputs=True, request_id="r1", timeout=5)
    assert isinstance(result.attributions, np.ndarray)
    np.testing.assert_array_equal(result.attributions, X * 2)
    np.testing.assert_array_equal(result.convergence_delta, np.zeros(2, np.float32))
    np.testing.assert_allclose(result.outputs, X.sum(axis=1))
    assert (result.seed, result.model_version, result.request_id) == (7, "1", "r1")
    assert result.timing == {"queue_ms": 0.5, "compute_ms": 1.25, "total_ms": 2.0, "rows": 2,
                             "passes": 1, "pass_rows": 6, "pass_requests": 3}
    sent = fake.requests[-1]
    assert sent.target.index == 0 and sent.integrated_gradients.n_steps == 50


def test_sync_multi_input_and_absent_optionals(sync_server):
    address, _ = sync_server
    with AttributionClient(address) as client:
        result = client.attribute("toy", "saliency", (X, Y))
    assert isinstance(result.attributions, tuple) and len(result.attributions) == 2
    np.testing.assert_array_equal(result.attributions[1], Y * 2)
    assert result.convergence_delta is None and result.outputs is None
    assert result.seed == 1234


def test_sync_models_stream_and_errors(sync_server):
    address, _ = sync_server
    with AttributionClient(address) as client:
        assert [m.config.name for m in client.list_models()] == ["toy"]
        assert client.get_model("toy").ready
        with pytest.raises(grpc.RpcError) as err:
            client.get_model("nope")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            client.attribute("broken", "saliency", X)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, BROKEN)
        requests = [client.build_request("toy", "saliency", X, request_id="a"),
                    client.build_request("broken", "saliency", X, request_id="b")]
        answers = {r.request_id: r for r in client.attribute_stream(requests)}
    assert answers["a"].WhichOneof("result") == "response"
    assert answers["b"].error.message == BROKEN


# --- async client ------------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_async_client():
    async with aio_server() as (address, fake):
        async with AsyncAttributionClient(address) as client:
            single = await client.attribute("toy", "integrated_gradients", X, target=[0, 1],
                                            return_convergence_delta=True, seed=0)
            multi = await client.attribute("toy", "deep_lift", [X, Y], baselines=(None, 0.5))
            models = await client.list_models()
            info = await client.get_model("toy", "1")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.attribute("broken", "saliency", X)
    np.testing.assert_array_equal(single.attributions, X * 2)
    np.testing.assert_array_equal(single.convergence_delta, np.zeros(2, np.float32))
    assert single.seed == 0 and single.outputs is None
    np.testing.assert_array_equal(multi.attributions[0], X * 2)
    np.testing.assert_array_equal(multi.attributions[1], Y * 2)
    assert list(fake.requests[1].baselines) == [pb.Baseline(), pb.Baseline(scalar=0.5)]
    assert [m.config.name for m in models] == ["toy"] and info.config.version == "1"
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, BROKEN)


@pytest.mark.asyncio
async def test_async_stream_from_sync_and_async_iterables():
    requests = [AsyncAttributionClient.build_request(model, "saliency", X * i, request_id=str(i))
                for i, model in enumerate(["toy", "toy", "broken"])]

    async def agen():
        for r in requests:
            yield r

    async with aio_server() as (address, _):
        async with AsyncAttributionClient(address) as client:
            from_list = [r async for r in client.attribute_stream(requests)]
            from_agen = [r async for r in client.attribute_stream(agen())]
            first = None
            async for r in client.attribute_stream(requests):  # leaving early cancels the call
                first = r
                break
    for answers in (from_list, from_agen):
        by_id = {r.request_id: r for r in answers}
        assert set(by_id) == {"0", "1", "2"}
        np.testing.assert_array_equal(from_tensor_proto(by_id["1"].response.attributions[0]), X * 2)
        assert by_id["2"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert first is not None


# --- CLI ---------------------------------------------------------------------------------------

def attribute_args(address, *extra):
    return ["attribute", "--target-address", address, "--model", "toy",
            "--algorithm", "integrated_gradients", *extra]


def test_cli_json(sync_server, capsys):
    address, fake = sync_server
    rc = cli.main(attribute_args(
        address, "--inputs", json.dumps(X.tolist()), "--target", "0", "--baselines", "0",
        "--params", '{"n_steps": 50}', "--noise-tunnel", '{"nt_type": "smoothgrad", "nt_samples": 4}',
        "--return-convergence-delta", "--seed", "0", "--json"))
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(out["attributions"], X * 2, rtol=1e-6)
    assert out["convergence_delta"] == [0.0, 0.0] and out["outputs"] is None
    assert out["seed"] == 0 and out["timing"]["passes"] == 1
    sent = fake.requests[-1]
    assert sent.target == pb.Target(index=0)
    assert list(sent.baselines) == [pb.Baseline(scalar=0.0)]
    assert sent.integrated_gradients == pb.IntegratedGradientsParams(n_steps=50)
    assert sent.noise_tunnel == pb.NoiseTunnel(nt_type="smoothgrad", nt_samples=4)
    assert sent.HasField("seed") and sent.seed == 0 and sent.return_convergence_delta


def test_cli_table_truncates_wide_rows(sync_server, capsys):
    address, _ = sync_server
    wide = np.round(np.linspace(0, 1, 28, dtype=np.float32).reshape(2, 14), 4)
    assert cli.main(attribute_args(address, "--inputs", json.dumps(wide.tolist()),
                                   "--return-convergence-delta", "--return-outputs")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "model version 1, seed 1234"
    assert lines[1] == "attributions (2, 14)"
    assert lines[2].split() == ["example", *map(str, range(12)), "…"]
    first = lines[3].split()
    assert first[:3] == ["0", "0.0000", f"{wide[0, 1] * 2:.4f}"] and len(first) == 14 and first[-1] == "…"
    assert lines[5:8] == ["convergence delta", "example      0", "      0 0.0000"]
    assert lines[-1] == ("timing: queue 0.50 ms, compute 1.25 ms, total 2.00 ms, passes 1, "
                         "pass_rows 6, pass_requests 3")


def test_cli_multi_input_from_files(sync_server, capsys, tmp_path):
    address, fake = sync_server
    np.save(tmp_path / "x.npy", X)
    (tmp_path / "y.json").write_text(json.dumps(Y.tolist()))
    rc = cli.main(attribute_args(address, "--inputs", str(tmp_path / "x.npy"),
                                 "--inputs", str(tmp_path / "y.json"),
                                 "--baselines", "null", "--baselines", "0.5",
                                 "--target", "1,2", "--json"))
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose(out["attributions"][0], X * 2)
    np.testing.assert_allclose(out["attributions"][1], Y * 2)
    sent = fake.requests[-1]
    assert sent.target == pb.Target(tuple=pb.TargetIndex(index=[1, 2]))
    assert list(sent.baselines) == [pb.Baseline(), pb.Baseline(scalar=0.5)]


def test_cli_grpc_error_exits_2(sync_server, capsys):
    address, _ = sync_server
    args = attribute_args(address, "--inputs", "[[1.0]]")
    args[args.index("toy")] = "broken"
    assert cli.main(args) == 2
    assert capsys.readouterr().err == f"error: INVALID_ARGUMENT: {BROKEN}\n"


def test_cli_bad_arguments_exit_2(sync_server, capsys):
    address, _ = sync_server
    assert cli.main(attribute_args(address, "--inputs", "[[1.0]]", "--params", '{"steps": 1}')) == 2
    assert "unknown integrated_gradients params steps" in capsys.readouterr().err
    assert cli.main(attribute_args(address, "--inputs", "not json")) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_models(sync_server, capsys):
    address, _ = sync_server
    assert cli.main(["models", "--target-address", address]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "name  version  ready  state  inputs  layers  algorithms",
        "toy   1        yes    ready  -       0       integrated_gradients, saliency",
    ]
    assert cli.models_main(["--target-address", address, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"models": [
        {"name": "toy", "version": "1", "ready": True, "state": "ready", "reason": "", "inputs": [], "layers": [],
         "algorithms": ["integrated_gradients", "saliency"],
         "refused": {"lrp": "LRP has no rule for module 'norm' (LayerNorm)"}}]}


def test_python_m_cli(sync_server):
    address, _ = sync_server
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CLIENT_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "attrserve_client.cli", "attribute", "--target-address", address,
         "--model", "toy", "--algorithm", "saliency", "--inputs", "[[1.5, -2.0]]", "--json"],
        capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["attributions"] == [[3.0, -4.0]]


# --- CLI: JSON data follows the model's declared input dtypes -----------------------------------

def sent_inputs(fake):
    return [(t.dtype, from_tensor_proto(t).tolist()) for t in fake.requests[-1].inputs]


def test_cli_casts_json_inputs_to_a_float32_model(sync_server, capsys):
    address, fake = sync_server
    args = attribute_args(address, "--inputs", "[[1, 2, 3]]", "--baselines", "[[0, 0, 1]]", "--json")
    args[args.index("toy")] = "toy_f32"
    assert cli.main(args) == 0
    assert sent_inputs(fake) == [(DT.DATA_TYPE_FLOAT32, [[1.0, 2.0, 3.0]])]
    baseline = fake.requests[-1].baselines[0].tensor
    assert (baseline.dtype, from_tensor_proto(baseline).tolist()) == (DT.DATA_TYPE_FLOAT32, [[0.0, 0.0, 1.0]])
    assert json.loads(capsys.readouterr().out)["attributions"] == [[2.0, 4.0, 6.0]]
    assert [(r.model, r.model_version) for r in fake.get_model_requests] == [("toy_f32", "")]


def test_cli_casts_json_inputs_to_an_int64_model(sync_server, capsys):
    address, fake = sync_server
    args = attribute_args(address, "--model-version", "1", "--inputs", "[[1, 2, 3]]", "--json")
    args[args.index("toy")] = "toy_i64"
    assert cli.main(args) == 0
    assert sent_inputs(fake) == [(DT.DATA_TYPE_INT64, [[1, 2, 3]])]
    assert json.loads(capsys.readouterr().out)["attributions"] == [[2, 4, 6]]
    assert fake.get_model_requests[-1].model_version == "1"
    # Whole-number floats become ids too; 1.5 is not silently truncated: it goes as float32, for
    # the server to name the dtype mismatch. An int model's baselines are left to the server.
    args[args.index("[[1, 2, 3]]")] = "[[1.0, 2.0, 3.0]]"
    assert cli.main(args + ["--baselines", "[[0.5, 0, 0]]"]) == 0
    assert sent_inputs(fake) == [(DT.DATA_TYPE_INT64, [[1, 2, 3]])]
    assert fake.requests[-1].baselines[0].tensor.dtype == DT.DATA_TYPE_FLOAT32
    args[args.index("[[1.0, 2.0, 3.0]]")] = "[[1.5, 2, 3]]"
    assert cli.main(args) == 0
    assert sent_inputs(fake) == [(DT.DATA_TYPE_FLOAT32, [[1.5, 2.0, 3.0]])]


def test_cli_casts_each_input_by_position(sync_server, capsys, tmp_path):
    address, fake = sync_server
    (tmp_path / "ids.json").write_text("[[7, 8]]")
    args = attribute_args(address, "--inputs", "[[1, 2]]", "--inputs", str(tmp_path / "ids.json"),
                          "--inputs", "[[3, 4]]", "--inputs", "[[0.25, 1]]", "--inputs", "[[5, 6]]", "--json")
    args[args.index("toy")] = "toy_mixed"
    assert cli.main(args) == 0
    # float64, int32 (from a .json file), bfloat16 and unspecified (left as JSON made them), and
    # a fifth input the config does not list (left too).
    assert sent_inputs(fake) == [(DT.DATA_TYPE_FLOAT64, [[1.0, 2.0]]), (DT.DATA_TYPE_INT32, [[7, 8]]),
                                 (DT.DATA_TYPE_INT64, [[3, 4]]), (DT.DATA_TYPE_FLOAT32, [[0.25, 1.0]]),
                                 (DT.DATA_TYPE_INT64, [[5, 6]])]


def test_cli_keeps_npy_dtypes(sync_server, capsys, tmp_path):
    address, fake = sync_server
    np.save(tmp_path / "ints.npy", np.array([[1, 2, 3]], dtype=np.int64))
    np.save(tmp_path / "doubles.npy", np.array([[1.5, 2, 3]], dtype=np.float64))
    np.save(tmp_path / "base.npy", np.zeros((1, 3), dtype=np.float16))
    for name, dtype in (("ints.npy", DT.DATA_TYPE_INT64), ("doubles.npy", DT.DATA_TYPE_FLOAT64)):
        args = attribute_args(address, "--inputs", str(tmp_path / name), "--baselines", str(tmp_path / "base.npy"))
        args[args.index("toy")] = "toy_f32"
        assert cli.main(args) == 0
        assert fake.requests[-1].inputs[0].dtype == dtype
        assert fake.requests[-1].baselines[0].tensor.dtype == DT.DATA_TYPE_FLOAT16
    # Alongside JSON data the .npy input still keeps its dtype.
    args = attribute_args(address, "--inputs", str(tmp_path / "ints.npy"), "--inputs", "[[1, 2, 3]]")
    args[args.index("toy")] = "toy_f32"
    assert cli.main(args) == 0
    assert [t.dtype for t in fake.requests[-1].inputs] == [DT.DATA_TYPE_INT64, DT.DATA_TYPE_INT64]
    capsys.readouterr()


def test_cli_without_get_model_sends_json_as_is(sync_server, capsys):
    address, fake = sync_server
    args = attribute_args(address, "--inputs", "[[1, 2, 3]]", "--json")
    args[args.index("toy")] = "unlisted"  # GetModel answers NOT_FOUND, Attribute answers
    assert cli.main(args) == 0
    assert fake.get_model_requests[-1].model == "unlisted"
    assert sent_inputs(fake) == [(DT.DATA_TYPE_INT64, [[1, 2, 3]])]
    assert json.loads(capsys.readouterr().out)["attributions"] == [[2, 4, 6]]
    args[args.index("unlisted")] = "toy"  # a config without inputs: nothing to cast to
    assert cli.main(args) == 0
    assert sent_inputs(fake) == [(DT.DATA_TYPE_INT64, [[1, 2, 3]])]
