"""The Open Inference Protocol (KServe v2 / Triton gRPC) on attrserve's port, called with the real Triton client.

tritonclient's generated messages and attrserve's (service/attrserve_service/kserve) both define `inference.*` in
protobuf's default descriptor pool, which refuses a symbol twice: one Python process cannot import both. The
server runs in this process (ServerThread), so each tritonclient call runs in a short child process (`triton`);
requests tritonclient cannot send (typed `contents`, malformed messages) go out with attrserve's own messages."""

from __future__ import annotations

import pickle
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, LayerIntegratedGradients
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attrserve_client import AttributionClient
from attrserve_engine import InputSpec, ModelSpec
from attrserve_service.config import ServerConfig
from attrserve_service.kserve import grpc_predict_v2_pb2 as oip
from oracle import MultiInput, ToyModel
from servers import ServeProcess, ServerThread, oracle_engine, scrape

X = np.array([[1.0, -2.0, 0.5], [0.3, 0.7, -1.1], [2.0, 0.1, -0.4]], dtype=np.float32)

_CLIENT = r"""
import pickle, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

address, calls = pickle.load(sys.stdin.buffer)
results = []
client = tc.InferenceServerClient(address)
for call in calls:
    kind, args = call[0], call[1:]
    try:
        if kind == "live":
            results.append(client.is_server_live())
        elif kind == "ready":
            results.append(client.is_server_ready())
        elif kind == "model_ready":
            results.append(client.is_model_ready(*args))
        elif kind == "server_metadata":
            results.append(client.get_server_metadata(as_json=True))
        elif kind == "model_metadata":
            results.append(client.get_model_metadata(args[0], as_json=True))
        elif kind == "infer":
            model, inputs, params, outputs = args
            infer_inputs = []
            for name, array, datatype in inputs:
                item = tc.InferInput(name, list(array.shape), datatype)
                item.set_data_from_numpy(array)
                infer_inputs.append(item)
            requested = [tc.InferRequestedOutput(name) for name in outputs] if outputs else None
            result = client.infer(model, infer_inputs, parameters=params or None, outputs=requested, request_id="req-1")
            response = result.get_response(as_json=True)
            results.append({
                "outputs": {o["name"]: result.as_numpy(o["name"]) for o in response["outputs"]},
                "response": response,
            })
    except InferenceServerException as e:
        results.append(("error", e.status(), e.message()))
client.close()
sys.stdout.buffer.write(pickle.dumps(results))
"""


def triton(address: str, *calls: tuple) -> list:
    """Run `calls` with tritonclient.grpc in a child process (see the module docstring); each call's result, or
    ("error", status, message) for an InferenceServerException."""
    proc = subprocess.run([sys.executable, "-c", _CLIENT], input=pickle.dumps((address, calls)), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return pickle.loads(proc.stdout)


def infer(model: str, inputs: list, params: dict | None = None, outputs: list | None = None) -> tuple:
    return ("infer", model, inputs, params, outputs)


@pytest.fixture(scope="module")
def oip_server():
    engine = oracle_engine()
    torch.manual_seed(0)
    spec = [InputSpec("a", torch.float32, (4,)), InputSpec("b", torch.float32, (3,))]
    engine.load(ModelSpec(name="named", module=MultiInput(), inputs=spec))
    server = ServerThread(engine, ServerConfig(port=0, metrics_port=0, max_request_bytes=1 << 20, reflection=True))
    yield server
    server.stop()


def model_infer(address: str, request: oip.ModelInferRequest) -> oip.ModelInferResponse:
    """ModelInfer with attrserve's own messages (what tritonclient cannot send: typed contents, bad messages)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=oip.ModelInferRequest.SerializeToString,
            response_deserializer=oip.ModelInferResponse.FromString,
        )
        return call(request, timeout=60)


def raw_output(response: oip.ModelInferResponse, name: str) -> np.ndarray:
    (i,) = [i for i, o in enumerate(response.outputs) if o.name == name]
    out = response.outputs[i]
    assert out.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[i], dtype="<f4").reshape(list(out.shape))


def test_health_and_metadata_through_the_triton_client(oip_server) -> None:
    live, ready, toy_ready, missing_ready, server_meta, toy_meta, named_meta = triton(
        oip_server.address,
        ("live",),
        ("ready",),
        ("model_ready", "toy"),
        ("model_ready", "no-such-model"),
        ("server_metadata",),
        ("model_metadata", "toy"),
        ("model_metadata", "named"),
    )
    assert (live, ready, toy_ready, missing_ready) == (True, True, True, False)
    assert server_meta["name"] == "attrserve"
    assert server_meta["version"]
    assert toy_meta["name"] == "toy"
    assert toy_meta["versions"] == ["1"]
    assert toy_meta["platform"] == "pytorch"
    assert toy_meta.get("inputs", []) == []  # the oracle models' configs name no inputs: matched by position
    assert named_meta["inputs"] == [
        {"name": "a", "datatype": "FP32", "shape": ["-1", "4"]},  # the JSON form of int64 is a string
        {"name": "b", "datatype": "FP32", "shape": ["-1", "3"]},
    ]
    assert [o["name"] for o in named_meta["outputs"]] == ["output", "attributions__a", "attributions__b"]
    assert named_meta["outputs"][0]["shape"] == ["-1"]


def test_predictions_equal_the_models_forward(oip_server) -> None:
    a = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    b = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    toy, named = triton(
        oip_server.address,
        infer("toy", [("x", X, "FP32")]),
        infer("named", [("b", b, "FP32"), ("a", a, "FP32")]),  # by name, in any order
    )
    with torch.no_grad():
        torch.manual_seed(0)
        want_named = MultiInput()(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        want_toy = ToyModel()(torch.from_numpy(X)).numpy()
    assert list(toy["outputs"]) == ["output"]
    np.testing.assert_allclose(toy["outputs"]["output"], want_toy, rtol=0, atol=1e-6)
    np.testing.assert_allclose(named["outputs"]["output"], want_named, rtol=0, atol=1e-6)
    assert toy["response"]["model_name"] == "toy"
    assert toy["response"]["model_version"] == "1"
    assert toy["response"]["id"] == "req-1"


def test_integrated_gradients_equal_captum_and_attribute(oip_server) -> None:
    params = {"algorithm": "integrated_gradients", "target": 1, "n_steps": 24, "return_convergence_delta": True}
    (result,) = triton(oip_server.address, infer("toy", [("x", X, "FP32")], params))
    model = ToyModel()
    want, want_delta = IntegratedGradients(model).attribute(
        torch.from_numpy(X), target=1, n_steps=24, return_convergence_delta=True
    )
    got = result["outputs"]
    assert set(got) == {"attributions__x", "convergence_delta"}
    np.testing.assert_allclose(got["attributions__x"], want.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["convergence_delta"], want_delta.detach().numpy(), rtol=1e-4, atol=1e-5)
    with AttributionClient(oip_server.address) as client:
        answer = client.attribute("toy", "integrated_gradients", X, target=1, params={"n_steps": 24}, return_convergence_delta=True)
    np.testing.assert_array_equal(got["attributions__x"], answer.attributions)
    np.testing.assert_array_equal(got["convergence_delta"], answer.convergence_delta)


def test_attributions_with_baselines_per_example_targets_and_the_output_by_name(oip_server) -> None:
    a = np.random.default_rng(2).normal(size=(2, 4)).astype(np.float32)
    b = np.random.default_rng(3).normal(size=(2, 3)).astype(np.float32)
    base = np.full((1, 4), 0.5, dtype=np.float32)
    params = {"algorithm": "integrated_gradients", "target": "[1, 0]", "n_steps": 16}
    inputs = [("a", a, "FP32"), ("b", b, "FP32"), ("a__baselines", base, "FP32")]
    (result,) = triton(oip_server.address, infer("named", inputs, params, ["attributions__a", "output"]))
    torch.manual_seed(0)
    model = MultiInput()
    want = IntegratedGradients(model).attribute(
        (torch.from_numpy(a), torch.from_numpy(b)), baselines=(torch.from_numpy(base), 0.0), target=[1, 0], n_steps=16
    )
    assert list(result["outputs"]) == ["output", "attributions__a"]  # only what was asked for
    np.testing.assert_allclose(result["outputs"]["attributions__a"], want[0].detach().numpy(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(result["outputs"]["output"], model(torch.from_numpy(a), torch.from_numpy(b)).numpy(), atol=1e-6)


def test_typed_contents_and_raw_bytes_of_other_datatypes_give_the_same_answer(oip_server) -> None:
    """`named` pins float32 inputs: FP64 and FP16 data are cast to it (as Attribute does); typed contents and raw
    bytes are the same tensor."""
    a = np.random.default_rng(4).normal(size=(2, 4))
    b = np.random.default_rng(5).normal(size=(2, 3))
    typed = oip.ModelInferRequest(model_name="named")
    typed.inputs.add(name="a", datatype="FP64", shape=[2, 4]).contents.fp64_contents.extend(a.ravel().tolist())
    typed.inputs.add(name="b", datatype="FP32", shape=[2, 3]).contents.fp32_contents.extend(b.ravel().tolist())
    raw16 = oip.ModelInferRequest(model_name="named", raw_input_contents=[b.astype("<f4").tobytes(), a.astype("<f2").tobytes()])
    raw16.inputs.add(name="b", datatype="FP32", shape=[2, 3])
    raw16.inputs.add(name="a", datatype="FP16", shape=[2, 4])
    torch.manual_seed(0)
    with torch.no_grad():
        want = MultiInput()(torch.from_numpy(a).float(), torch.from_numpy(b).float()).numpy()
    np.testing.assert_allclose(raw_output(model_infer(oip_server.address, typed), "output"), want, atol=1e-6)
    np.testing.assert_allclose(raw_output(model_infer(oip_server.address, raw16), "output"), want, atol=5e-3)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda r: r.inputs.add(name="x", datatype="FP99", shape=[3, 3]), "inputs[0].datatype"),
        (lambda r: r.inputs.add(name="x", datatype="FP32", shape=[3, 3]).contents.fp32_contents.extend([1.0] * 4), "inputs[0]"),
        (lambda r: r.inputs.add(name="x", datatype="FP16", shape=[1, 3]).contents.fp32_contents.extend([1.0] * 3), "inputs[0]"),
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1, 3]), r.raw_input_contents.extend([b"", b""])), "raw_input_contents"),
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1.0] * 3),
                    r.parameters["target"].MergeFrom(oip.InferParameter(string_param="{bad"))), "parameters.target"),
        (lambda r: (r.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend([1.0] * 3),
                    r.outputs.add(name="logits")), "outputs[0].name"),
    ],
)
def test_a_bad_request_is_invalid_argument_naming_the_field(oip_server, build, field) -> None:
    request = oip.ModelInferRequest(model_name="toy")
    build(request)
    with pytest.raises(grpc.RpcError) as raised:
        model_infer(oip_server.address, request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details()


HUGE = "1" + "0" * 25  # a JSON integer past int64


def toy_request(params: dict, outputs: tuple[str, ...] = ()) -> oip.ModelInferRequest:
    """ModelInfer of `toy` on X: `params` as bool_param, int64_param (ints), uint64_param ((value,) tuples) or string_param."""
    request = oip.ModelInferRequest(model_name="toy", raw_input_contents=[X.tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
    for key, value in params.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, tuple):
            request.parameters[key].uint64_param = value[0]
        elif isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].string_param = value
    for name in outputs:
        request.outputs.add(name=name)
    return request


def assert_still_serves_and_is_healthy(address: str) -> None:
    """After the refusals: Captum's numbers, and health SERVING."""
    response = model_infer(address, toy_request({"algorithm": "integrated_gradients", "target": 1, "n_steps": 24}))
    want = IntegratedGradients(ToyModel()).attribute(torch.from_numpy(X), target=1, n_steps=24)
    np.testing.assert_allclose(raw_output(response, "attributions__x"), want.detach().numpy(), rtol=1e-5, atol=1e-5)
    with grpc.insecure_channel(address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert status.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"algorithm": "saliency", "target": HUGE}, f"parameters.target has the index {HUGE}, outside the int64 range"),
        ({"algorithm": "saliency", "target": f"[{HUGE}, 0, 1]"}, "parameters.target has the index"),
        ({"algorithm": "saliency", "target": f"[[0], [{HUGE}], [1]]"}, "parameters.target has the index"),
        ({"algorithm": "saliency", "target": f'{{"tuple": [{HUGE}]}}'}, "parameters.target has the index"),
        ({"algorithm": "saliency", "target": (2**64 - 1,)}, "parameters.target has the index 18446744073709551615"),
        ({"algorithm": "saliency", "target": (2**63,)}, "parameters.target has the index 9223372036854775808"),
        ({"algorithm": "gradient_shap", "target": 0, "stdevs": f"[{'9' * 400}]"}, "gradient_shap.stdevs holds a number too large"),
        ({"algorithm": "neuron_gradient", "layer": "lin1", "neuron_selector": f"[{HUGE}]"}, "neuron_gradient.neuron_selector index"),
        ({"algorithm": "neuron_gradient", "layer": "lin1", "neuron_selector": (2**64 - 1,)}, "neuron_gradient.neuron_selector index"),
    ],
    ids=[
        "target", "target list", "target tuples", "target tuple", "target uint64", "target 2**63", "stdevs",
        "neuron_selector", "neuron_selector uint64",
    ],
)
def test_integers_past_int64_are_invalid_argument_naming_the_field(oip_server, params, message) -> None:
    """A JSON number or a uint64_param past int64 (numpy's and torch's OverflowError were INTERNAL)."""
    with pytest.raises(grpc.RpcError) as raised:
        model_infer(oip_server.address, toy_request(params))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert message in raised.value.details()
    assert len(raised.value.details()) < 2048
    assert_still_serves_and_is_healthy(oip_server.address)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"algorithm": "gradient_shap", "target": 0, "stdevs": "[[1]]"}, "gradient_shap.stdevs must be a number or a list of numbers"),
        ({"algorithm": "layer_gradient_shap", "layer": "lin1", "target": 0, "stdevs": "[[1], [2]]"},
         "layer_gradient_shap.stdevs must be a number or a list of numbers"),
        ({"algorithm": "integrated_gradients", "target": 0, "n_steps": "[" * 499 + "]" * 499}, "parameters.'n_steps' is nested more than 8 levels"),
        ({"algorithm": "neuron_gradient", "layer": "lin1", "neuron_selector": "[" * 9 + "0" + "]" * 9},
         "parameters.'neuron_selector' is nested more than 8 levels"),
        ({"algorithm": "saliency", "target": 0, "junk": "[" * 499 + "]" * 499}, "parameters.'junk' is nested more than 8 levels"),
        ({"algorithm": "saliency", "target": 0, "abs": '{"a": ' * 100 + "1" + "}" * 100}, "parameters.'abs' is nested more than 8 levels"),
    ],
    ids=["stdevs lists", "layer stdevs lists", "deep list", "9 levels", "deep list, unknown name", "deep object"],
)
def test_a_json_parameter_of_the_wrong_form_is_invalid_argument_naming_it(oip_server, params, message) -> None:
    """A JSON string parameter nested past attrserve's Struct bound (8 levels) made a RecursionError pickling the job
    for the engine, and a list of lists for stdevs a TypeError in its check: both were INTERNAL."""
    with pytest.raises(grpc.RpcError) as raised:
        model_infer(oip_server.address, toy_request(params))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert message in raised.value.details()
    assert_still_serves_and_is_healthy(oip_server.address)


@pytest.mark.parametrize(
    ("params", "outputs", "message"),
    [
        ({"algorithm": "integrated_gradients", "target": 1}, ("attributions__X",), "outputs[0].name 'attributions__X' is not an output"),
        ({"algorithm": "integrated_gradients", "target": 1}, ("output", "attributions__07"), "outputs[1].name 'attributions__07' is not"),
        ({"algorithm": "integrated_gradients", "target": 1}, ("attributions__1",), "'attributions__1' is not an output of this answer"),
        ({"algorithm": "integrated_gradients", "target": 1}, ("convergence_delta",), "set parameters.return_convergence_delta"),
        ({}, ("attributions__x",), "outputs[0].name 'attributions__x' is not an output"),  # predictions have `output` alone
    ],
    ids=["typo", "leading zero", "index past the answer", "delta not asked for", "predictions"],
)
def test_a_requested_output_no_answer_has_is_invalid_argument(oip_server, params, outputs, message) -> None:
    """Before, any name starting with attributions__ passed, and the answer was OK without it (no outputs at all)."""
    with pytest.raises(grpc.RpcError) as raised:
        model_infer(oip_server.address, toy_request(params, outputs))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert message in raised.value.details()
    assert_still_serves_and_is_healthy(oip_server.address)


def test_every_name_an_answer_has_can_be_requested(oip_server) -> None:
    """What `_response` writes: an input method's attributions__<input>, convergence_delta, output; a layer method's
    attributions__<i> (`named` has two inputs and its head one output: attributions__0)."""
    request = toy_request(
        {"algorithm": "integrated_gradients", "target": 1, "n_steps": 24, "return_convergence_delta": True},
        ("convergence_delta", "attributions__x", "output"),
    )
    response = model_infer(oip_server.address, request)
    assert [o.name for o in response.outputs] == ["output", "attributions__x", "convergence_delta"]
    a = np.random.default_rng(6).normal(size=(2, 4)).astype(np.float32)
    b = np.random.default_rng(7).normal(size=(2, 3)).astype(np.float32)
    layered = oip.ModelInferRequest(model_name="named", raw_input_contents=[a.tobytes(), b.tobytes()])
    layered.inputs.add(name="a", datatype="FP32", shape=[2, 4])
    layered.inputs.add(name="b", datatype="FP32", shape=[2, 3])
    layered.parameters["algorithm"].string_param = "layer_integrated_gradients"
    layered.parameters["layer"].string_param = "head"
    layered.parameters["target"].int64_param = 1
    layered.parameters["n_steps"].int64_param = 16
    layered.outputs.add(name="attributions__0")
    response = model_infer(oip_server.address, layered)
    assert [o.name for o in response.outputs] == ["attributions__0"]
    torch.manual_seed(0)
    model = MultiInput()
    want = LayerIntegratedGradients(model, model.head).attribute((torch.from_numpy(a), torch.from_numpy(b)), target=1, n_steps=16)
    np.testing.assert_allclose(raw_output(response, "attributions__0"), want.detach().numpy(), rtol=1e-5, atol=1e-5)
    layered.outputs.add(name="attributions__1")  # the head gives one tensor: no attributions__1 (known once it ran)
    with pytest.raises(grpc.RpcError) as raised:
        model_infer(oip_server.address, layered)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outputs[1].name 'attributions__1' is not an output of this answer; it has ['attributions__0']" in raised.value.details()


def test_a_layer_methods_answer_is_named_by_position_on_a_model_of_one_input(oip_server) -> None:
    """A layer method's attributions are attributions__<i>, as the README says, whatever their count: on `toy` (one
    input, and lin1 gives one tensor) they were named attributions__x, as an input's, and attributions__0 was refused."""
    response = model_infer(oip_server.address, toy_request({"algorithm": "layer_integrated_gradients", "layer": "lin1", "target": 1,
                                                            "n_steps": 16}, ("attributions__0",)))
    assert [o.name for o in response.outputs] == ["attributions__0"]
    model = ToyModel()
    want = LayerIntegratedGradients(model, model.lin1).attribute(torch.from_numpy(X), target=1, n_steps=16)
    np.testing.assert_allclose(raw_output(response, "attributions__0"), want.detach().numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(grpc.RpcError) as raised:
        model_infer(oip_server.address, toy_request({"algorithm": "layer_integrated_gradients", "layer": "lin1", "target": 1},
                                                    ("attributions__x",)))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "outputs[0].name 'attributions__x'" in raised.value.details()
    assert_still_serves_and_is_healthy(oip_server.address)


def test_model_infer_counts_every_attribution_request_as_attribute_does(oip_server) -> None:
    """attrserve_attributions_completed_total and the duration histogram count a refused attribution request whether
    the edge refused it (a short tensor, a bad target, an unknown model or output) or the engine; names a client made up
    as "unknown". Predictions are not attributions: not counted there."""
    port = oip_server.running.metrics_port

    def completed() -> dict:
        return {dict(labels)["grpc_code"] + " " + dict(labels)["model"] + "/" + dict(labels)["algorithm"]: v
                for (name, labels), v in scrape(port).items() if name == "attrserve_attributions_completed_total"}

    def durations() -> float:
        return sum(v for (name, _), v in scrape(port).items() if name == "attrserve_attribution_duration_seconds_count")

    short = toy_request({"algorithm": "integrated_gradients", "target": 0})
    short.raw_input_contents[0] = b"xx"
    unknown_model = toy_request({"algorithm": "integrated_gradients", "target": 0})
    unknown_model.model_name = "nosuch"
    no_algorithm_name = toy_request({"target": 0})
    no_algorithm_name.parameters["algorithm"].int64_param = 3
    refused = [
        (short, "INVALID_ARGUMENT toy/integrated_gradients"),
        (toy_request({"algorithm": "integrated_gradients", "target": "[0, oops]"}), "INVALID_ARGUMENT toy/integrated_gradients"),
        (toy_request({"algorithm": "integrated_gradients", "target": HUGE}), "INVALID_ARGUMENT toy/integrated_gradients"),
        (
            toy_request({"algorithm": "integrated_gradients", "target": 0}, ("attributions__X",)),
            "INVALID_ARGUMENT toy/integrated_gradients",
        ),
        (toy_request({"algorithm": "integrated_gradients", "target": 0, "n_steps": 0}), "INVALID_ARGUMENT toy/integrated_gradients"),
        (unknown_model, "NOT_FOUND unknown/integrated_gradients"),
        (toy_request({"algorithm": "no_such_method", "target": 0}), "INVALID_ARGUMENT toy/unknown"),
        (no_algorithm_name, "INVALID_ARGUMENT toy/unknown"),
    ]
    before, timed = completed(), durations()
    for request, _ in refused:
        with pytest.raises(grpc.RpcError):
            model_infer(oip_server.address, request)
    model_infer(oip_server.address, toy_request({}))  # a prediction: not counted
    bad_prediction = toy_request({})
    bad_prediction.raw_input_contents[0] = b"xx"
    with pytest.raises(grpc.RpcError):
        model_infer(oip_server.address, bad_prediction)  # nor a refused one
    model_infer(oip_server.address, toy_request({"algorithm": "saliency", "target": 0}))
    after = completed()
    want: dict[str, float] = {"OK toy/saliency": 1.0}
    for _, key in refused:
        want[key] = want.get(key, 0.0) + 1
    assert {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)} == want
    assert durations() - timed == len(refused) + 1
    assert_still_serves_and_is_healthy(oip_server.address)


def test_bad_requests_through_the_triton_client_then_the_server_still_answers(oip_server) -> None:
    bad_param, bad_algorithm, unknown_input, good = triton(
        oip_server.address,
        infer("toy", [("x", X, "FP32")], {"algorithm": "integrated_gradients", "target": 0, "n_steps": -3}),
        infer("toy", [("x", X, "FP32")], {"algorithm": "no_such_algorithm"}),
        infer("named", [("a", X[:, :3].copy(), "FP32"), ("c", X, "FP32")]),
        infer("toy", [("x", X, "FP32")]),
    )
    for error, field in ((bad_param, "n_steps"), (bad_algorithm, "no_such_algorithm"), (unknown_input, "'c'")):
        assert error[0] == "error"
        assert error[1] == "StatusCode.INVALID_ARGUMENT", error
        assert field in error[2]
    with torch.no_grad():
        np.testing.assert_allclose(good["outputs"]["output"], ToyModel()(torch.from_numpy(X)).numpy(), atol=1e-6)
    (malformed,) = [b"\xff\xff\xff"]
    with grpc.insecure_channel(oip_server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as raised:
            call(malformed, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inference.ModelInferRequest" in raised.value.details()


def test_attrserve_serve_with_its_engine_process_answers_triton_clients() -> None:
    """`attrserve serve` as it ships: the default engine-core process and the built-in demo models (toy is Captum's
    ToyModel, its input named x)."""
    with ServeProcess([]) as served:
        ready, meta, predicted, explained = triton(
            served.address,
            ("model_ready", "toy"),
            ("model_metadata", "toy"),
            infer("toy", [("x", X, "FP32")]),
            infer("toy", [("x", X, "FP32")], {"algorithm": "integrated_gradients", "target": 0, "n_steps": 20}),
        )
    assert ready is True
    assert meta["platform"] == "pytorch"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "3"]}]
    model = ToyModel()
    with torch.no_grad():
        np.testing.assert_allclose(predicted["outputs"]["output"], model(torch.from_numpy(X)).numpy(), atol=1e-6)
    want = IntegratedGradients(model).attribute(torch.from_numpy(X), target=0, n_steps=20)
    np.testing.assert_allclose(explained["outputs"]["attributions__x"], want.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_a_new_version_with_other_input_names_is_matched_by_its_names(oip_server) -> None:
    """ModelInfer remembers a model's input names between requests (no ModelInfo per request) and forgets them when a
    model changes state: once version 2 serves, its names are the ones that match."""
    engine = oip_server.running.engine
    a, b = np.ones((1, 4), np.float32), np.ones((1, 3), np.float32)

    def request(first: str, second: str) -> oip.ModelInferRequest:
        r = oip.ModelInferRequest(model_name="renamed", raw_input_contents=[a.tobytes(), b.tobytes()])
        r.inputs.add(name=first, datatype="FP32", shape=[1, 4])
        r.inputs.add(name=second, datatype="FP32", shape=[1, 3])
        return r

    spec = [InputSpec("a", torch.float32, (4,)), InputSpec("b", torch.float32, (3,))]
    engine.load(ModelSpec(name="renamed", module=MultiInput(), inputs=spec))
    first = raw_output(model_infer(oip_server.address, request("a", "b")), "output")
    engine.load(ModelSpec(name="renamed", version="2", module=MultiInput(), inputs=[InputSpec("p", torch.float32, (4,)), InputSpec("q", torch.float32, (3,))]))
    with pytest.raises(grpc.RpcError) as old_names:
        model_infer(oip_server.address, request("a", "b"))
    assert old_names.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'p'" in old_names.value.details()
    np.testing.assert_allclose(raw_output(model_infer(oip_server.address, request("p", "q")), "output"), first, atol=1e-6)


def test_model_metadata_lists_versions_in_number_order(oip_server) -> None:
    """ModelMetadata's versions are ordered as the server orders them, numbers by value: they were sorted as strings
    ("10" before "2")."""
    engine = oip_server.running.engine
    spec = [InputSpec("x", torch.float32, (3,))]
    for version in ("10", "2"):
        engine.load(ModelSpec(name="versioned", version=version, module=ToyModel(), inputs=spec))
    with grpc.insecure_channel(oip_server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelMetadata", request_serializer=oip.ModelMetadataRequest.SerializeToString,
                                   response_deserializer=oip.ModelMetadataResponse.FromString)
        metadata = call(oip.ModelMetadataRequest(name="versioned"), timeout=10)
    assert list(metadata.versions) == ["2", "10"]
    assert_still_serves_and_is_healthy(oip_server.address)


def test_the_metadata_of_an_integer_inputs_attributions_is_the_datatype_they_come_in() -> None:
    """Token ids are INT64, their attributions (a perturbation method's) floats: ModelMetadata declared them INT64, so
    a client that sizes or decodes outputs by the metadata read 8-byte integers from 4-byte floats."""
    from captum.attr import FeatureAblation

    from oracle import TokenClassifier

    engine = oracle_engine()
    engine.load(ModelSpec(name="tokens", module=TokenClassifier(), inputs=[InputSpec("ids", torch.int64, (6,))]))
    server = ServerThread(engine, ServerConfig(port=0, metrics_port=0))
    try:
        ids = np.array([[1, 5, 7, 0, 3, 2], [4, 4, 9, 1, 0, 0]], dtype=np.int64)
        meta, answer = triton(
            server.address,
            ("model_metadata", "tokens"),
            infer("tokens", [("ids", ids, "INT64")], {"algorithm": "feature_ablation", "target": 1}),
        )
        assert meta["inputs"] == [{"name": "ids", "datatype": "INT64", "shape": ["-1", "6"]}]
        declared = {o["name"]: o["datatype"] for o in meta["outputs"]}
        (sent,) = answer["response"]["outputs"]
        assert sent["name"] == "attributions__ids"
        assert declared["attributions__ids"] == sent["datatype"] == "FP32"  # the bug: INT64 declared
        want = FeatureAblation(TokenClassifier()).attribute(torch.from_numpy(ids), target=1)
        np.testing.assert_allclose(answer["outputs"]["attributions__ids"], want.numpy(), rtol=1e-5, atol=1e-6)
        assert_still_serves_and_is_healthy(server.address)
    finally:
        server.stop()


@pytest.mark.parametrize("params", [{}, {"algorithm": "saliency", "target": 0}], ids=["prediction", "attribution"])
def test_an_output_asked_for_as_classes_is_invalid_argument(oip_server, params) -> None:
    """Triton's clients ask for the top classes as text with InferRequestedOutput(name, class_count=k) (the output's
    `classification` parameter); attrserve answered the plain float tensor, which the client then read as its classes."""
    request = toy_request(params, ("output",) if not params else ("attributions__x",))
    request.outputs[0].parameters["classification"].int64_param = 2
    with pytest.raises(grpc.RpcError) as raised:
        model_infer(oip_server.address, request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert "outputs[0].parameters.classification is set" in raised.value.details()
    assert_still_serves_and_is_healthy(oip_server.address)
