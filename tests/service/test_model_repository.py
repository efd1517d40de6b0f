"""The model repository loader end to end: folders on disk → ModelSpec → Engine → numbers (Captum as the oracle).

Every test builds its own tiny repository under tmp_path: a folder per model with
`model.py` (+ optional `weights.pt`) or a TorchScript `model.pt`, and an optional
`config.pbtxt`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
import torch
from captum.attr import DeepLift, GuidedBackprop, IntegratedGradients, Saliency
from torch import nn

from attrserve.v1 import model_config_pb2 as mc
from attrserve.v1 import tensor_pb2
from attrserve_client import AttributionClient
from attrserve_client import cli as client_cli
from attrserve_engine import AttributionJob, Engine, EngineLimits, InvalidArgument
from attrserve_engine.algorithms import ALGORITHMS
from attrserve_engine.limits import DEFAULT_MAX_BATCH_ROWS, DEFAULT_MAX_QUEUE_DELAY_US
from attrserve_service.config import effective_config, spec_config
from attrserve_service.repository import RepositoryError, load_repository, scan
from servers import ServeProcess

ATOL = 1e-5
X = torch.tensor([[0.3, -0.2, 0.9, 1.4], [1.0, 0.5, -0.4, 0.2]])
TARGET = torch.tensor([[0], [1]])  # one output index per example
CAPTUM_TARGET = [0, 1]

# A small MLP, deterministic in code so the test can rebuild the very same module.
MLP = """
import torch
from torch import nn


def build_model():
    torch.manual_seed(5)  # both examples of X reach live ReLUs
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
"""

# forward returns (logits, hidden): the tuple case of `output { index }`.
TUPLE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        hidden = torch.tanh(self.fc1(x))
        return self.fc2(hidden), hidden


def build_model():
    return Net()
"""

# forward returns {"logits", "aux"}: the dict case of `output { key }`.
DICT = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        hidden = torch.sigmoid(self.fc1(x))
        return {"logits": self.fc2(hidden), "aux": (x * x).sum(dim=1, keepdim=True)}


def build_model():
    return Net()
"""


def write_model(folder: Path, source: str | None = MLP, config: str | None = None) -> Path:
    folder.mkdir(parents=True)
    if source is not None:
        (folder / "model.py").write_text(source)
    if config is not None:
        (folder / "config.pbtxt").write_text(textwrap.dedent(config))
    return folder


def build(source: str) -> nn.Module:
    """The module a model.py builds, outside the server (the oracle's copy)."""
    namespace: dict = {}
    exec(compile(source, "<model.py>", "exec"), namespace)
    return namespace["build_model"]().eval()


@pytest.fixture
def engines():
    """Engines made by a test, shut down after it."""
    made: list[Engine] = []

    def make(**limits) -> Engine:
        made.append(Engine(EngineLimits(**limits)))
        return made[-1]

    yield make
    for engine in made:
        engine.shutdown(drain=False, timeout=5)


def load_all(engine: Engine, root: Path) -> dict:
    return {m.name: m for m in (engine.load(spec) for spec in load_repository(root))}


def attribute(engine: Engine, model: str, algorithm: str, x: torch.Tensor = X, target: torch.Tensor | None = TARGET, **kw):
    return engine.attribute(AttributionJob(model=model, algorithm=algorithm, inputs=(x,), target=target, **kw), timeout=60)


def assert_close(got: torch.Tensor, want: torch.Tensor, informative: bool = True) -> None:
    """Same shape and dtype (float32: these models are float32), within ATOL; and (unless informative=False, for a
    convergence delta, whose right answer is about zero) the wanted values are not all within ATOL of zero."""
    got, want = got.detach().cpu(), want.detach().cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    if informative:
        assert float(want.abs().max()) > ATOL, "the expected values are all about zero: zeros would pass"
    assert torch.allclose(got, want, atol=ATOL, rtol=0), f"max abs diff {(got - want).abs().max():.3g}"


def captum_ig(forward, x: torch.Tensor = X, target=CAPTUM_TARGET) -> torch.Tensor:
    return IntegratedGradients(forward).attribute(x.clone(), target=target)


# --- 1. model.py alone ---------------------------------------------------------------------------

def test_bare_model_py_gets_defaults_and_serves_integrated_gradients(tmp_path, engines):
    write_model(tmp_path / "mlp")
    (spec,) = load_repository(tmp_path)
    assert (spec.name, spec.version, spec.platform, spec.inputs) == ("mlp", "1", "", [])
    assert (spec.max_batch_rows, spec.max_queue_delay_us, spec.device) == (0, 0, "")  # 0/"": engine defaults
    assert (spec.output_index, spec.output_key) == (None, None)

    engine = engines()  # default limits: device "auto"
    model = engine.load(spec)
    assert model.ready and not model.is_torchscript
    assert (model.name, model.version) == ("mlp", "1")
    assert model.max_batch_rows == DEFAULT_MAX_BATCH_ROWS == 256
    assert model.max_queue_delay_s == pytest.approx(DEFAULT_MAX_QUEUE_DELAY_US / 1e6) == pytest.approx(500e-6)
    assert str(model.device) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.layers == ["0", "1", "2"]
    assert not model.module.training  # served in eval mode
    assert "deep_lift" in engine.supported_algorithms(model)  # eager with a ReLU: hookable

    result = attribute(engine, "mlp", "integrated_gradients", return_convergence_delta=True)
    oracle = build(MLP)
    want, want_delta = IntegratedGradients(oracle).attribute(X.clone(), target=CAPTUM_TARGET, return_convergence_delta=True)
    assert_close(result.attributions[0], want)
    assert_close(result.convergence_delta, want_delta, informative=False)
    assert result.model_version == "1"
    assert bool((want.abs().sum(dim=1) > 0.2).all())  # a non-trivial comparison for each example


def test_bare_model_py_on_cpu_engine_default(tmp_path, engines):
    write_model(tmp_path / "mlp")
    model = load_all(engines(default_device="cpu"), tmp_path)["mlp"]
    assert str(model.device) == "cpu"
    assert next(model.module.parameters()).device.type == "cpu"


# --- 2. weights.pt -------------------------------------------------------------------------------

def test_weights_pt_is_loaded(tmp_path, engines):
    folder = write_model(tmp_path / "weighted")
    saved = build(MLP)
    with torch.no_grad():  # values the seeded build_model would never produce
        for i, p in enumerate(saved.parameters()):
            p.copy_(torch.linspace(-1.0, 1.0, p.numel()).view_as(p) * (i + 1))
    torch.save(saved.state_dict(), folder / "weights.pt")

    engine = engines(default_device="cpu")
    model = load_all(engine, tmp_path)["weighted"]
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.module.state_dict()[name], tensor), name
    with torch.no_grad():
        want = saved(X)
        assert torch.equal(model.module(X), want)
        assert not torch.allclose(build(MLP)(X), want)  # the weights did change the model

    result = attribute(engine, "weighted", "saliency", return_outputs=True)
    assert_close(result.attributions[0], Saliency(saved).attribute(X.clone(), target=CAPTUM_TARGET))
    assert_close(result.outputs, want)  # return_outputs: the saved model's logits


# --- 3. TorchScript model.pt ---------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:DeprecationWarning")
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_model_pt(tmp_path, engines, how):
    eager = build(MLP)
    scripted = torch.jit.script(eager) if how == "script" else torch.jit.trace(eager, X)
    folder = tmp_path / "ts"
    folder.mkdir()
    scripted.save(str(folder / "model.pt"))
    (spec,) = load_repository(tmp_path)
    assert spec.name == "ts" and spec.platform == ""  # detected from model.pt at load

    engine = engines(default_device="cpu")
    model = engine.load(spec)
    assert model.is_torchscript and model.ready
    supported = engine.supported_algorithms(model)
    assert "deep_lift" not in supported and "deep_lift" in ALGORITHMS
    assert {"saliency", "integrated_gradients"} <= set(supported)
    with pytest.raises(InvalidArgument, match="deep_lift hooks the model's forward .* TorchScript, which takes no hooks"):
        attribute(engine, "ts", "deep_lift")

    oracle = torch.jit.load(str(folder / "model.pt")).eval()
    with pytest.raises(RuntimeError, match="not supported on ScriptModules"):  # Captum cannot either
        DeepLift(oracle).attribute(X.clone(), target=CAPTUM_TARGET)
    # Guided Backprop sees no ReLU module in TorchScript: Captum's answer is the plain gradient, and so is ours.
    assert_close(
        attribute(engine, "ts", "guided_backprop").attributions[0], GuidedBackprop(oracle).attribute(X.clone(), target=CAPTUM_TARGET)
    )
    assert_close(attribute(engine, "ts", "saliency").attributions[0], Saliency(oracle).attribute(X.clone(), target=CAPTUM_TARGET))
    assert_close(attribute(engine, "ts", "integrated_gradients").attributions[0], captum_ig(oracle))
    assert_close(attribute(engine, "ts", "integrated_gradients").attributions[0], captum_ig(eager))  # same math as eager
    assert effective_config(model).platform == mc.PLATFORM_TORCHSCRIPT


# --- 4. config.pbtxt -----------------------------------------------------------------------------

CONFIGURED = """
    name: "custom"
    version: "7"
    platform: PLATFORM_PYTORCH_EAGER
    max_batch_rows: 8
    max_queue_delay_microseconds: 1234
    device: "cpu"
    description: "a configured MLP"
    inputs { name: "features" dtype: DATA_TYPE_FLOAT32 dims: 4 }
"""


def test_config_fields_are_honoured(tmp_path, engines):
    write_model(tmp_path / "folder_name", config=CONFIGURED)
    (spec,) = load_repository(tmp_path)
    assert (spec.name, spec.version, spec.platform) == ("custom", "7", "pytorch_eager")
    assert (spec.max_batch_rows, spec.max_queue_delay_us, spec.device) == (8, 1234, "cpu")
    assert spec.description == "a configured MLP"
    assert [(s.name, s.dtype, s.dims) for s in spec.inputs] == [("features", torch.float32, (4,))]

    engine = engines()
    model = engine.load(spec)
    assert engine.get_model("custom", "7") is model and engine.get_model("custom") is model
    assert model.max_batch_rows == 8 and model.max_queue_delay_s == pytest.approx(1234e-6)
    assert str(model.device) == "cpu"  # the config's device beats the engine default ("auto")
    assert model.output_shape == (2,)  # learned at warm-up, since the config pins every dim

    # A request is checked against the inputs: shape and dtype, naming the input.
    with pytest.raises(InvalidArgument, match=r"inputs\[0\] \('features'\): expected shape \(n, 4\), got \(2, 5\)"):
        attribute(engine, "custom", "saliency", x=torch.ones(2, 5))
    with pytest.raises(InvalidArgument, match=r"'features'.*expected dtype float32, got int64"):
        attribute(engine, "custom", "saliency", x=X.long())
    # A float64 input (numpy's default) is cast to the pinned float32, said in the result, and gets Captum's
    # numbers on the float32 input.
    cast = attribute(engine, "custom", "integrated_gradients", x=X.double() + 1e-9)
    assert [(c.input, c.sent, c.used) for c in cast.input_casts] == [(0, "float64", "float32")]
    assert_close(cast.attributions[0], captum_ig(build(MLP), x=(X.double() + 1e-9).float()))
    assert attribute(engine, "custom", "integrated_gradients").input_casts == ()
    with pytest.raises(InvalidArgument, match="takes 1 inputs"):
        engine.attribute(AttributionJob(model="custom", algorithm="saliency", inputs=(X, X)), timeout=60)

    result = attribute(engine, "custom", "integrated_gradients")
    assert result.model_version == "7"
    assert_close(result.attributions[0], captum_ig(build(MLP)))


def test_strict_input_dtypes_refuses_instead_of_casting(tmp_path, engines):
    write_model(tmp_path / "strict", config=CONFIGURED.replace('name: "custom"', 'name: "strict"\n    strict_input_dtypes: true'))
    (spec,) = load_repository(tmp_path)
    assert spec.strict_input_dtypes
    engine = engines()
    engine.load(spec)
    with pytest.raises(InvalidArgument, match=r"inputs\[0\] \('features'\): expected dtype float32, got float64 .*strict_input_dtypes"):
        attribute(engine, "strict", "saliency", x=X.double())
    assert_close(attribute(engine, "strict", "integrated_gradients").attributions[0], captum_ig(build(MLP)))


def test_intra_op_threads_is_read_shown_and_bounded(tmp_path, engines):
    write_model(tmp_path / "threads", config=CONFIGURED.replace('name: "custom"', 'name: "threads"\n    intra_op_threads: 2'))
    write_model(tmp_path / "greedy", config=CONFIGURED.replace('name: "custom"', 'name: "greedy"\n    intra_op_threads: 100000'))
    specs = {s.name: s for s in load_repository(tmp_path)}
    assert specs["threads"].intra_op_threads == 2
    engine = engines()
    model = engine.load(specs["threads"])
    assert effective_config(model).intra_op_threads == 2  # GetModel shows the count the passes run with
    assert_close(attribute(engine, "threads", "integrated_gradients").attributions[0], captum_ig(build(MLP)))
    with pytest.raises(InvalidArgument, match=r"model 'greedy': intra_op_threads 100000 is more than 4 per core"):
        engine.load(specs["greedy"])
    assert_close(attribute(engine, "threads", "saliency").attributions[0], Saliency(build(MLP)).attribute(X.clone(), target=CAPTUM_TARGET, abs=True))


def test_memory_format_is_read_checked_and_shown(tmp_path, engines):
    """The config's memory_format reaches the load, which checks it on the pinned inputs, and GetModel shows the layout the
    passes run in. An MLP has no 4-D tensor, so channels_last (or channels_last_forward) changes nothing in its passes: the
    config is honoured."""
    write_model(tmp_path / "last", config=CONFIGURED.replace('name: "custom"', 'name: "last"\n    memory_format: "channels_last"'))
    write_model(tmp_path / "fwd", config=CONFIGURED.replace('name: "custom"', 'name: "fwd"\n    memory_format: "channels_last_forward"'))
    write_model(tmp_path / "odd", config=CONFIGURED.replace('name: "custom"', 'name: "odd"\n    memory_format: "sideways"'))
    specs = {s.name: s for s in load_repository(tmp_path)}
    assert specs["last"].memory_format == "channels_last"
    engine = engines()
    model = engine.load(specs["last"])
    assert model.channels_last and effective_config(model).memory_format == "channels_last"
    assert spec_config(specs["last"]).memory_format == "channels_last"  # GetModel of a version that is not loaded
    forward = engine.load(specs["fwd"])
    assert forward.forward_channels_last and not forward.channels_last and effective_config(forward).memory_format == "channels_last_forward"
    assert_close(attribute(engine, "fwd", "integrated_gradients").attributions[0], captum_ig(build(MLP)))
    assert_close(attribute(engine, "last", "integrated_gradients").attributions[0], captum_ig(build(MLP)))
    with pytest.raises(InvalidArgument, match=r"model 'odd': memory_format 'sideways' is not one of"):
        engine.load(specs["odd"])
    assert_close(attribute(engine, "last", "integrated_gradients").attributions[0], captum_ig(build(MLP)))


def test_instances_are_read_shown_bounded_and_equal_captum(tmp_path, engines):
    write_model(tmp_path / "twice", config=CONFIGURED.replace('name: "custom"', 'name: "twice"\n    instances: 2'))
    write_model(tmp_path / "crowd", config=CONFIGURED.replace('name: "custom"', 'name: "crowd"\n    instances: 100000'))
    specs = {s.name: s for s in load_repository(tmp_path)}
    assert specs["twice"].instances == 2
    engine = engines()
    model = engine.load(specs["twice"])
    assert effective_config(model).instances == 2 and len(model.replicas) == 2  # GetModel shows the copies that serve
    assert model.replicas[1] is not model.module and all(torch.equal(a, b) for a, b in zip(model.module.state_dict().values(), model.replicas[1].state_dict().values()))
    with pytest.raises(InvalidArgument, match=r"model 'crowd': instances 100000 is more than 4 per core"):
        engine.load(specs["crowd"])
    futures = [engine.submit(AttributionJob(model="twice", algorithm="integrated_gradients", inputs=(X,), target=TARGET)) for _ in range(6)]
    for f in futures:
        assert_close(f.result(timeout=60).attributions[0], captum_ig(build(MLP)))


def test_output_selection_tuple_index(tmp_path, engines):
    write_model(tmp_path / "tup0", TUPLE, 'output { index: 0 }\n')
    write_model(tmp_path / "tup1", TUPLE, 'output { index: 1 }\n')
    write_model(tmp_path / "tup_default", TUPLE)  # no selector: element 0
    specs = {s.name: s for s in load_repository(tmp_path)}
    assert (specs["tup0"].output_index, specs["tup1"].output_index, specs["tup_default"].output_index) == (0, 1, None)
    engine = engines(default_device="cpu")
    load_all(engine, tmp_path)
    oracle = build(TUPLE)

    want_logits = captum_ig(lambda x: oracle(x)[0])
    want_hidden = captum_ig(lambda x: oracle(x)[1], target=[2, 1])
    assert_close(attribute(engine, "tup0", "integrated_gradients").attributions[0], want_logits)
    assert_close(attribute(engine, "tup_default", "integrated_gradients").attributions[0], want_logits)
    got_hidden = attribute(engine, "tup1", "integrated_gradients", target=torch.tensor([[2], [1]])).attributions[0]
    assert_close(got_hidden, want_hidden)
    assert not torch.allclose(want_logits, want_hidden, atol=1e-3)  # the selector made a difference
    # Index 2 exists in the hidden output (3 units) but not in the logits (2): the selected output is checked.
    with pytest.raises(InvalidArgument, match="out of range"):
        attribute(engine, "tup0", "saliency", target=torch.tensor([[2], [2]]))


def test_output_selection_dict_key(tmp_path, engines):
    write_model(tmp_path / "logits", DICT, 'output { key: "logits" }\n')
    write_model(tmp_path / "aux", DICT, 'output { key: "aux" }\n')
    specs = {s.name: s for s in load_repository(tmp_path)}
    assert (specs["logits"].output_key, specs["aux"].output_key) == ("logits", "aux")
    engine = engines(default_device="cpu")
    load_all(engine, tmp_path)
    oracle = build(DICT)

    assert_close(attribute(engine, "logits", "integrated_gradients").attributions[0], captum_ig(lambda x: oracle(x)["logits"]))
    assert_close(attribute(engine, "logits", "saliency").attributions[0],
                 Saliency(lambda x: oracle(x)["logits"]).attribute(X.clone(), target=CAPTUM_TARGET))
    # aux = sum(x^2) per example, one scalar each: IG from zero is exactly x^2.
    aux = attribute(engine, "aux", "integrated_gradients", target=None).attributions[0]
    assert_close(aux, captum_ig(lambda x: oracle(x)["aux"], target=0))
    assert_close(aux, X * X)


def test_dict_output_without_key_fails_clearly(tmp_path, engines):
    # No pinned input dims: no warm-up, so the model loads (and reports ready) and each request fails.
    write_model(tmp_path / "lazy", DICT)
    # Pinned input dims: the warm-up forward at load fails instead.
    write_model(tmp_path / "pinned", DICT, 'inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 4 }\n')
    specs = {s.name: s for s in load_repository(tmp_path)}
    engine = engines(default_device="cpu")

    lazy = engine.load(specs["lazy"])
    assert lazy.ready  # NB: ready, although no request can ever succeed
    for algorithm in ("saliency", "integrated_gradients"):
        with pytest.raises(InvalidArgument, match=r"returns a dict with keys \['aux', 'logits'\]; set output.key"):
            attribute(engine, "lazy", algorithm)

    with pytest.raises(InvalidArgument, match=r"model 'pinned' returns a dict with keys \['aux', 'logits'\]; set output.key"):
        engine.load(specs["pinned"])
    assert [m.name for m in engine.models()] == ["lazy"]  # the failed load registered nothing


# --- 5. effective_config -------------------------------------------------------------------------

def test_effective_config_fills_in_defaults(tmp_path, engines):
    write_model(tmp_path / "bare")
    write_model(tmp_path / "configured", config=CONFIGURED)
    write_model(tmp_path / "tup", TUPLE, "output { index: 1 }\n")
    write_model(tmp_path / "dict", DICT, 'output { key: "logits" }\ndevice: "cpu"\n')
    engine = engines(default_device="cpu", default_max_batch_rows=64, default_max_queue_delay_us=2500)
    models = load_all(engine, tmp_path)
    threads = engine.default_threads  # the engine's intra-op threads: what a model that sets none runs with
    assert threads == torch.get_num_threads()

    bare = effective_config(models["bare"])
    assert bare == mc.ModelConfig(
        name="bare", version="1", platform=mc.PLATFORM_PYTORCH_EAGER, max_batch_rows=64,
        max_queue_delay_microseconds=2500, device="cpu", precision="float32", max_queued_bytes=1 << 30,
        intra_op_threads=threads, instances=1, memory_format="contiguous")
    assert bare.output.WhichOneof("selector") is None

    configured = effective_config(models["custom"])
    assert configured == mc.ModelConfig(
        name="custom", version="7", platform=mc.PLATFORM_PYTORCH_EAGER, max_batch_rows=8,
        max_queue_delay_microseconds=1234, device="cpu", description="a configured MLP", precision="float32", max_queued_bytes=1 << 30,
        inputs=[mc.InputSpec(name="features", dtype=tensor_pb2.DATA_TYPE_FLOAT32, dims=[4])], intra_op_threads=threads, instances=1, memory_format="contiguous")

    tup = effective_config(models["tup"])
    assert tup.output.WhichOneof("selector") == "index" and tup.output.index == 1
    dict_config = effective_config(models["dict"])
    assert dict_config.output.WhichOneof("selector") == "key" and dict_config.output.key == "logits"
    assert dict_config.max_batch_rows == 64


# --- 6. errors -----------------------------------------------------------------------------------

def test_malformed_config_names_the_file(tmp_path):
    write_model(tmp_path / "good")
    write_model(tmp_path / "bad", config="name: \"bad\"\nmax_batch_rows: lots\n")
    with pytest.raises(RepositoryError) as err:
        load_repository(tmp_path)
    assert str(tmp_path / "bad" / "config.pbtxt") in str(err.value)
    assert "max_batch_rows" in str(err.value)

    write_model(tmp_path / "unknown_field", config="nme: \"typo\"\n")
    (tmp_path / "bad" / "config.pbtxt").unlink()
    with pytest.raises(RepositoryError, match=str(tmp_path / "unknown_field" / "config.pbtxt")):
        load_repository(tmp_path)


def test_a_config_that_cannot_be_read_is_that_models_error_never_the_scans(tmp_path):
    """A config.pbtxt that is not UTF-8 (a Latin-1 é, as a Windows editor saves it) raised UnicodeDecodeError out of
    the scan, and one that is a folder IsADirectoryError: the whole server did not start, and under poll control every
    later poll failed. Now each is its own folder's error (UNAVAILABLE with it) and the other folders are read."""
    write_model(tmp_path / "good")
    write_model(tmp_path / "latin1")
    (tmp_path / "latin1" / "config.pbtxt").write_bytes(b'description: "caf\xe9"\n')
    write_model(tmp_path / "folder_config")
    (tmp_path / "folder_config" / "config.pbtxt").mkdir()
    write_model(tmp_path / "versioned" / "1", config=None)  # the shared config beside the versions is the folder
    (tmp_path / "versioned" / "config.pbtxt").mkdir()
    entries = {(e.name, e.version): e for e in scan(tmp_path)}
    assert sorted(entries) == [("folder_config", "1"), ("good", "1"), ("latin1", "1"), ("versioned", "1")]
    assert entries[("good", "1")].spec is not None and entries[("good", "1")].error == ""
    latin1 = entries[("latin1", "1")]
    why = "not UTF-8 text: byte 0xe9 at offset 17 (invalid continuation byte)"
    assert latin1.spec is None and latin1.error == f"{tmp_path / 'latin1' / 'config.pbtxt'}: {why}"
    assert entries[("folder_config", "1")].error == f"{tmp_path / 'folder_config' / 'config.pbtxt'}: is a folder, not a file"
    assert entries[("versioned", "1")].error == f"{tmp_path / 'versioned' / 'config.pbtxt'}: is a folder, not a file"
    with pytest.raises(RepositoryError, match="folder_config"):  # the strict reader names the first one
        load_repository(tmp_path)


def test_input_dims_other_than_minus_one_or_a_size_are_refused_at_load(tmp_path, engines):
    """dims 0 or -2 loaded READY, showed -2 as "*" (any size), and refused every request ("expected shape (n, -2)")."""
    write_model(tmp_path / "neg", config='inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: -2 }\n')
    write_model(tmp_path / "zero", config='inputs { name: "a" dims: 4 } inputs { name: "b" dims: 4 dims: 0 }\n')
    write_model(tmp_path / "ok", config='inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: -1 }\n')
    entries = {e.name: e for e in scan(tmp_path)}
    assert entries["neg"].spec is None and entries["neg"].error == (
        f"{tmp_path / 'neg' / 'config.pbtxt'}: model 'neg' inputs[0] ('x') dims[0] is -2: each dim is a positive size, or -1 for any size")
    assert entries["zero"].spec is None and "model 'zero' inputs[1] ('b') dims[1] is 0: " in entries["zero"].error
    assert entries["ok"].spec is not None and entries["ok"].spec.inputs[0].dims == (-1,)
    with pytest.raises(RepositoryError, match=r"model 'neg' inputs\[0\] \('x'\) dims\[0\] is -2"):
        load_repository(tmp_path)
    engine = engines(default_device="cpu")  # a spec built in code is checked too
    spec = entries["ok"].spec
    spec.inputs[0].dims = (4, -3)
    with pytest.raises(InvalidArgument, match=r"model 'ok': inputs\[0\] \('x'\) dims\[1\] is -3: each dim is a positive size"):
        engine.load(spec)
    assert engine.models() == []
    spec.inputs[0].dims = (-1,)
    engine.load(spec)
    assert_close(attribute(engine, "ok", "integrated_gradients").attributions[0], captum_ig(build(MLP)))


def test_unsupported_input_dtype_in_config(tmp_path):
    write_model(tmp_path / "m", config="inputs { name: \"x\" dtype: 99 dims: 4 }\n")
    with pytest.raises(RepositoryError, match=r"config.pbtxt: inputs\[0\].dtype 99 is not supported"):
        load_repository(tmp_path)


def test_empty_or_missing_repository(tmp_path):
    with pytest.raises(RepositoryError, match="has no model folders"):
        load_repository(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("not a model")
    (tmp_path / "model.py").write_text(MLP)  # a file at the root is not a model folder
    with pytest.raises(RepositoryError, match="has no model folders"):
        load_repository(tmp_path)
    with pytest.raises(RepositoryError, match="is not a folder"):
        load_repository(tmp_path / "absent")
    with pytest.raises(RepositoryError, match="is not a folder"):
        load_repository(tmp_path / "model.py")


def test_folders_without_a_model_are_skipped(tmp_path):
    write_model(tmp_path / "b_model")
    write_model(tmp_path / "a_config_only", source=None, config='name: "ghost"\n')
    (tmp_path / "c_empty").mkdir()
    (tmp_path / "d_weights_only").mkdir()
    torch.save(build(MLP).state_dict(), tmp_path / "d_weights_only" / "weights.pt")
    specs = load_repository(tmp_path)
    assert [(s.name, s.path) for s in specs] == [("b_model", tmp_path / "b_model")]


# --- 7. `attrserve serve --model-repository` -----------------------------------------------------

def test_serve_cli_on_a_repository(tmp_path, capsys):
    repo = tmp_path / "repo"
    write_model(repo / "mlp")
    write_model(repo / "configured", config=CONFIGURED)
    with ServeProcess(["--model-repository", str(repo), "--device", "cpu"]) as server:
        address = server.address
        with AttributionClient(address) as client:
            models = client.list_models(timeout=10)
            info = client.get_model("custom", "7", timeout=10)
            x = X.numpy()
            result = client.attribute("mlp", "integrated_gradients", x, target=CAPTUM_TARGET, timeout=60)
            with pytest.raises(grpc.RpcError) as err:
                client.attribute("custom", "saliency", x[:, :3], timeout=60)
        # `attrserve attribute` with integer JSON for the float32 model: cast after GetModel.
        capsys.readouterr()
        rc = client_cli.main(["attribute", "--target-address", address, "--model", "custom",
                              "--algorithm", "saliency", "--inputs", "[[1, 2, 3, 4]]", "--target", "1", "--json"])
        cli_out = capsys.readouterr()
        assert rc == 0, cli_out.err
        assert sorted((m.config.name, m.config.version, m.ready) for m in models) == [("custom", "7", True), ("mlp", "1", True)]
        by_name = {m.config.name: m for m in models}
        assert by_name["mlp"].config.max_batch_rows == DEFAULT_MAX_BATCH_ROWS and by_name["mlp"].config.device == "cpu"
        assert list(by_name["mlp"].layers) == ["0", "1", "2"]
        assert info.config.max_batch_rows == 8 and info.config.max_queue_delay_microseconds == 1234
        assert info.config.inputs[0].name == "features"
        assert_close(torch.from_numpy(result.attributions.copy()), captum_ig(build(MLP)))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'features'" in err.value.details()
        want = Saliency(build(MLP)).attribute(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), target=1)
        assert_close(torch.tensor(json.loads(cli_out.out)["attributions"]), want)

        assert server.signal(signal.SIGTERM, timeout=15) == 0, server.output()
        assert f"attrserve listening on {address}" in server.output()


def test_output_selector_that_does_not_fit_the_output_fails_at_load(tmp_path, engines):
    pinned = 'inputs { name: "x" dtype: DATA_TYPE_FLOAT32 dims: 4 }\n'
    write_model(tmp_path / "key_on_tuple", TUPLE, pinned + 'output { key: "logits" }\n')
    write_model(tmp_path / "missing_key", DICT, pinned + 'output { key: "nope" }\n')
    write_model(tmp_path / "index_past_end", TUPLE, pinned + 'output { index: 2 }\n')
    specs = {s.name: s for s in load_repository(tmp_path)}
    engine = engines(default_device="cpu")
    with pytest.raises(InvalidArgument, match="returns tuple, not a dict; output.key 'logits' does not apply"):
        engine.load(specs["key_on_tuple"])
    with pytest.raises(InvalidArgument, match=r"keys \['aux', 'logits'\]; output.key 'nope' is not one"):
        engine.load(specs["missing_key"])
    with pytest.raises(InvalidArgument, match="returns 2 outputs; output.index 2 is out of range"):
        engine.load(specs["index_past_end"])


def test_input_spec_without_dims_means_any_shape(tmp_path, engines):
    write_model(tmp_path / "free", MLP, 'inputs { name: "x" dtype: DATA_TYPE_FLOAT32 }\n')
    (spec,) = load_repository(tmp_path)
    assert spec.inputs[0].dims is None
    engine = engines(default_device="cpu")
    engine.load(spec)
    assert_close(attribute(engine, "free", "integrated_gradients").attributions[0], captum_ig(build(MLP)))


def test_platform_that_does_not_match_the_folder(tmp_path, engines):
    write_model(tmp_path / "wants_script", MLP, "platform: PLATFORM_TORCHSCRIPT\n")
    engine = engines(default_device="cpu")
    with pytest.raises(Exception, match="configured as TorchScript but has no model.pt"):
        engine.load(load_repository(tmp_path)[0])


def test_serve_exits_when_no_model_can_load_and_names_the_folder(tmp_path):
    """Without runtime model control, a repository where nothing loads is a configuration error (exit 2).
    (One broken model among good ones does not stop the server: tests/service/test_model_management.py.)"""
    write_model(tmp_path / "broken", "def build_model():\n    raise RuntimeError('no weights here')\n")
    out = subprocess.run(
        [sys.executable, "-m", "attrserve_service.cli", "serve", "--model-repository", str(tmp_path), "--port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert f"no model in {tmp_path} could be served: broken v1 ({tmp_path / 'broken'}): RuntimeError: no weights here" in out.stderr
