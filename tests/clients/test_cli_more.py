"""The `attrserve` command as a whole: its help, `serve` without the server, no torch, `models` with inputs and layers,
`describe`, and `attribute --also/--evaluate`, against an in-process fake AttributionService."""

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
from attrserve_client import cli, from_tensor_proto, to_tensor_proto
from servers import fake_server

CLIENT_ROOT = pathlib.Path(__file__).resolve().parents[2] / "clients" / "python"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CLIENT_ROOT), os.environ.get("PYTHONPATH", "")])}
DT = tensor_pb2.DataType
LRP_REASON = "LRP has no rule for module 'norm' (LayerNorm)"
def _model() -> pb.ModelInfo:
    return pb.ModelInfo(
        config={"name": "img", "version": "2", "description": "a small conv net", "max_batch_rows": 64,
                "inputs": [{"name": "pixels", "dtype": DT.DATA_TYPE_FLOAT32, "dims": [3, -1, 8]},
                           {"name": "ids", "dtype": DT.DATA_TYPE_INT64, "dims": [4]}],
                "output": {"key": "logits"}},
        layers=["conv1", "relu1", "fc"], ready=True, state=pb.MODEL_STATE_READY,
        algorithms=[pb.ALGORITHM_INTEGRATED_GRADIENTS, pb.ALGORITHM_SALIENCY], custom_algorithms=["blur_ig"],
        refused=[pb.RefusedAlgorithm(name="lrp", reason=LRP_REASON)],
        batch_probe=[pb.BatchProbe(rows=16, rows_per_second=1200.0), pb.BatchProbe(rows=64, rows_per_second=3000.5)],
    )


class Fake(pb_grpc.AttributionServiceServicer):
    """Attributions are the inputs times 2; each `also` entry's the inputs times 3; evaluate's scores are 0.5 a row."""

    def __init__(self):
        self.requests = []

    def Attribute(self, request, context):
        self.requests.append(request)
        x = from_tensor_proto(request.inputs[0])
        response = pb.AttributeResponse(request_id=request.request_id, model_version="2", seed=5,
                                        attributions=[to_tensor_proto(x * 2)], timing=pb.Timing(total_ms=1.0))
        for spec in request.also:
            response.also.append(pb.AlgorithmResult(algorithm=cli.algorithm_name(spec.algorithm),
                                                    attributions=[to_tensor_proto(x * 3)]))
        if request.evaluate.HasField("infidelity"):
            response.infidelity.CopyFrom(to_tensor_proto(np.full(x.shape[0], 0.5, np.float32)))
        return response

    def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[_model()])

    def GetModel(self, request, context):
        if request.model != "img":
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model!r}")
        return pb.GetModelResponse(model=_model())


@pytest.fixture
def server():
    fake = Fake()
    with fake_server(fake, workers=4) as address:
        yield address, fake


def run_cli(*args, code=""):
    """`attrserve ARGS` as a new process (the console script runs attrserve_client.cli:main)."""
    script = code + "import sys; from attrserve_client.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV, timeout=60)


# --- the command as a whole ----------------------------------------------------------------------

def test_help_lists_every_command_with_examples(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("serve", "attribute", "models", "describe", "repository", "load", "unload"):
        assert any(line.split()[:1] == [command] and len(line.split()) > 1 for line in out.splitlines()), command
    assert "examples:" in out and "attrserve describe toy --json" in out
    assert cli.main([]) == 2  # no command: the same help, on stderr
    assert "commands:" in capsys.readouterr().err


def test_unknown_command_exits_2(capsys):
    assert cli.main(["modles"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'modles'") and "describe" in err


def test_client_commands_import_no_torch():
    code = ("import sys; from attrserve_client import cli\n"
            "for argv in (['--help'], ['models', '--help'], ['describe', '--help'], ['attribute', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules, 'attrserve_engine' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["False", "False"]


def test_serve_without_the_server_package_says_what_to_install():
    done = run_cli("serve", "--port", "0", code="import sys; sys.modules['attrserve_service'] = None; ")
    assert done.returncode == 2
    assert "needs the attrserve server" in done.stderr and "pip install ./clients/python ." in done.stderr


def test_serve_dispatches_to_the_server_package():
    done = run_cli("serve", "--help")
    assert done.returncode == 0, done.stderr
    assert "--max-batch-rows" in done.stdout and "ATTRSERVE_MAX_BATCH_ROWS" in done.stdout


# --- models and describe ------------------------------------------------------------------------

def test_models_shows_inputs_and_layers(server, capsys):
    address, _ = server
    assert cli.main(["models", "--target-address", address]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "name  version  ready  state  inputs" + " " * 28 + "  layers  algorithms",
        "img   2        yes    ready  pixels:float32[3,*,8] ids:int64[4]  3       integrated_gradients, saliency, blur_ig",
    ]
    assert cli.main(["models", "--target-address", address, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["models"][0]
    assert row["inputs"] == [{"name": "pixels", "dtype": "float32", "dims": [3, -1, 8]},
                             {"name": "ids", "dtype": "int64", "dims": [4]}]
    assert row["layers"] == ["conv1", "relu1", "fc"] and row["refused"] == {"lrp": LRP_REASON}


def test_describe_shows_everything_get_model_says(server, capsys):
    address, _ = server
    assert cli.main(["describe", "img", "--target-address", address]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "model img version 2: ready"
    for line in ("  max_batch_rows: 64", "  description: a small conv net", "  pixels  float32  dims per example [3, -1, 8]",
                 "  ids  int64  dims per example [4]", "output selector: key 'logits'", "layers (3):", "  relu1",
                 "algorithms: integrated_gradients, saliency", "plugin algorithms: blur_ig", "refused (1):",
                 f"  lrp: {LRP_REASON}", "  64: 3000.5"):
        assert line in out, (line, out)


def test_describe_json_and_version(server, capsys):
    address, _ = server
    assert cli.main(["describe", "img", "--version", "2", "--target-address", address, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["inputs"][0]["dims"] == [3, -1, 8] and info["config"]["output"] == {"key": "logits"}
    assert info["refused"] == [{"name": "lrp", "reason": LRP_REASON}]
    assert info["batch_probe"][1] == {"rows": 64, "rows_per_second": 3000.5}
    assert (info["state"], info["algorithms"], info["layers"]) == ("ready", ["integrated_gradients", "saliency"],
                                                                  ["conv1", "relu1", "fc"])
    assert cli.main(["describe", "nope", "--target-address", address]) == 2
    assert capsys.readouterr().err == "error: NOT_FOUND: no model 'nope'\n"


# --- attribute --also and --evaluate -------------------------------------------------------------

def attribute(address, *extra):
    return cli.main(["attribute", "--target-address", address, "--model", "img", "--algorithm", "integrated_gradients",
                     "--inputs", "[[1.0, 2.0]]", *extra])


def test_attribute_also_and_evaluate(server, capsys, tmp_path):
    address, fake = server
    (tmp_path / "also.json").write_text('{"algorithm": "saliency", "params": {"abs": false}}')
    assert attribute(address, "--also", '{"algorithm": "input_x_gradient", "return_convergence_delta": true}',
                     "--also", str(tmp_path / "also.json"),
                     "--evaluate", '{"infidelity": {"n_perturb_samples": 4}}', "--json") == 0
    sent = fake.requests[-1]
    assert [(cli.algorithm_name(a.algorithm), a.return_convergence_delta) for a in sent.also] == [
        ("input_x_gradient", True), ("saliency", False)]
    assert dict(sent.also[1].params) == {"abs": False}
    assert sent.evaluate.infidelity.n_perturb_samples == 4 and not sent.evaluate.HasField("sensitivity_max")
    out = json.loads(capsys.readouterr().out)
    assert [a["algorithm"] for a in out["also"]] == ["input_x_gradient", "saliency"]
    assert out["also"][0]["attributions"] == [[3.0, 6.0]] and out["infidelity"] == [0.5]
    # The table shows them too.
    assert attribute(address, "--also", '{"algorithm": "saliency"}', "--evaluate", '{"infidelity": {}}') == 0
    text = capsys.readouterr().out
    assert "saliency: attributions (1, 2)" in text and "infidelity" in text


@pytest.mark.parametrize("flags,message", [
    (["--also", "saliency"], "--also: not JSON"),
    (["--also", "[1]"], "--also must be a JSON object"),
    (["--also", '{"params": {}}'], "algorithm required"),
    (["--also", '{"algorithm": "saliency", "layer": 3}'], "also[0].layer: expected a string"),
    (["--evaluate", '{"fidelity": {}}'], "unknown metric 'fidelity'"),
    (["--evaluate", '{"infidelity": {"n_perturb_samples": "ten"}}'], "evaluate.infidelity.n_perturb_samples"),
    (["--params", "{oops"], "--params: not JSON"),
    (["--baselines", "/no/such/file.npy"], "--baselines: cannot read /no/such/file.npy"),
])
def test_attribute_errors_name_the_flag_or_field(server, capsys, flags, message):
    address, fake = server
    assert attribute(address, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert fake.requests == []


@pytest.mark.parametrize("command", [["attribute", "--model", "img", "--algorithm", "saliency", "--inputs", "[[1.0, 2.0]]"],
                                     ["models"], ["describe", "img"], ["repository"]])
@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_a_timeout_that_is_no_positive_number_is_a_usage_error(server, capsys, command, timeout):
    """It was sent, and gRPC failed the call at once: "error: DEADLINE_EXCEEDED: Deadline Exceeded"."""
    address, fake = server
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--target-address", address, "--timeout", timeout])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --timeout: expected a positive number of seconds, got '{timeout}'" in err, err
    assert fake.requests == []
