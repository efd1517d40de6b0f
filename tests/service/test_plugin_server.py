"""A plugin algorithm served by name (custom_algorithm + Struct params), listed by GetModel, loaded by `serve --plugins`."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from attrserve_client import AttributionClient
from attrserve_engine import AttributionJob, Engine, ModelSpec
from attrserve_service.config import ServerConfig
from conftest import ServerThread
from oracle import MODELS, example_inputs

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "plugins" / "blur_integrated_gradients.py"


@pytest.fixture(scope="module")
def plugin_server():
    engine = Engine()
    engine.load_plugins(str(PLUGIN))
    engine.load(ModelSpec(name="conv", module=MODELS["conv"]()))
    s = ServerThread(engine, ServerConfig(port=0, metrics_port=None))
    yield s
    s.stop()


def test_plugin_by_name_through_the_client(plugin_server) -> None:
    (x,), _ = example_inputs("conv", 2, seed=5)
    with AttributionClient(plugin_server.address) as client:
        got = client.attribute("conv", "blur_integrated_gradients", x.numpy(), target=[1, 2], params={"n_steps": 9, "max_sigma": 2.5})
        info = client.get_model("conv")
        with pytest.raises(grpc.RpcError) as bad:
            client.attribute("conv", "blur_integrated_gradients", x.numpy(), target=1, params={"n_steps": 2.5})
        with pytest.raises(grpc.RpcError) as unknown:
            client.attribute("conv", "no_such_plugin", x.numpy(), target=1)
    want = plugin_server.running.engine.attribute(
        AttributionJob(model="conv", algorithm="blur_integrated_gradients", inputs=(x,), target=torch.tensor([[1], [2]]), params={"n_steps": 9, "max_sigma": 2.5})
    )
    np.testing.assert_allclose(got.attributions, want.attributions[0].numpy(), atol=1e-6)
    assert list(info.custom_algorithms) == ["blur_integrated_gradients"]
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n_steps must be an integer" in bad.value.details()
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown algorithm 'no_such_plugin'" in unknown.value.details()


def test_serve_cli_loads_plugins_and_reports_bad_ones(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import time

    bad = subprocess.run(
        [sys.executable, "-m", "attrserve_service.cli", "serve", "--plugins", str(tmp_path / "missing.py"), "--port", "0", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "plugin" in bad.stderr and "missing.py" in bad.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "attrserve_service.cli", "serve", "--plugins", str(PLUGIN), "--port", str(port), "--metrics-port", "-1", "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with AttributionClient(f"127.0.0.1:{port}") as client:
                    info = client.get_model("image", timeout=2)
                    x = np.random.default_rng(0).random((1, 3, 16, 16), dtype=np.float32)
                    result = client.attribute("image", "blur_integrated_gradients", x, target=1, params={"n_steps": 8}, timeout=30)
                break
            except grpc.RpcError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
        assert "blur_integrated_gradients" in info.custom_algorithms
        assert result.attributions.shape == (1, 3, 16, 16) and np.isfinite(result.attributions).all()
    finally:
        proc.terminate()
        proc.wait(30)
