"""The README, run as a user would: the server started as a subprocess the way `make serve` starts it, then the README's CLI and Python examples."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from attrserve_client import AttributionClient
from servers import ServeProcess

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BIN = Path(sys.executable).parent
EXPECTED = [[-0.5922, -1.5497, -1.0067], [0.0, -0.2219, -5.1991]]


def block_after(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", README, re.S)
    assert match, f"README has no block marked {marker}"
    return match.group(1)


# `make serve` runs `.venv/bin/attrserve serve $(ARGS)`: the same entry point, on ports the server picks (read from
# its "listening on" line). The README's plugin example needs the example plugin loaded; nothing else changes with it.
SERVE = (str(BIN / "attrserve"),)
PLUGIN_ARGS = ["--plugins", str(ROOT / "examples" / "plugins" / "blur_integrated_gradients.py")]


def test_readme_starts_with_the_two_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make serve")
    assert first_block.splitlines()[1].startswith("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/attrserve serve $(ARGS)" in makefile  # what make serve runs, and what the server fixture runs below
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def readme_server():
    with ServeProcess(PLUGIN_ARGS, command=SERVE, metrics=True) as server:
        with AttributionClient(server.address) as client:
            assert all(m.ready for m in client.list_models(timeout=10))  # it prints its ports once every model is warm
        yield server


def test_readme_cli_example(readme_server) -> None:
    port = readme_server.port
    command = block_after("readme-cli").replace("\\\n", " ").split("attrserve", 1)[1]
    args = ["attribute", "--target-address", f"127.0.0.1:{port}"] + [a.strip("'") for a in re.findall(r"'[^']*'|\S+", command)][1:]
    out = subprocess.run([str(BIN / "attrserve"), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if re.match(r"\s+[01]\s+-?\d", line)]
    assert [[float(v) for v in row[1:]] for row in rows[:2]] == EXPECTED
    deltas = [abs(float(row[1])) for row in rows[2:4]]
    assert len(deltas) == 2 and max(deltas) < 1e-4


def test_readme_python_example(readme_server) -> None:
    port = readme_server.port
    code = block_after("readme-python").replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    assert len(code.strip().splitlines()) == 5
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    numbers = [float(v) for v in re.findall(r"-?\d+\.\d*", out.stdout)]
    assert numbers == [v for row in EXPECTED for v in row]
    assert out.stdout.strip().endswith("True")


EXAMPLES = re.findall(r"<!-- readme-(?:example|plugin) -->\s*```python\n(.*?)```\s*```\n(.*?)```", README, re.S)


@pytest.mark.parametrize("code,printed", EXAMPLES, ids=[f"example{i}" for i in range(len(EXAMPLES))])
def test_readme_example_prints_what_the_readme_says(readme_server, code: str, printed: str) -> None:
    port = readme_server.port
    out = subprocess.run([sys.executable, "-c", code.replace("127.0.0.1:50051", f"127.0.0.1:{port}")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == printed.strip()


def test_readme_picture_is_what_the_example_draws(readme_server, tmp_path) -> None:
    """The Pictures example, run as written (in a scratch folder), draws the picture the README shows."""
    import matplotlib.image

    port = readme_server.port
    code = block_after("readme-picture").replace("127.0.0.1:50051", f"127.0.0.1:{port}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    drawn, shown = matplotlib.image.imread(tmp_path / "image_ig.png"), matplotlib.image.imread(ROOT / "docs" / "images" / "image_ig.png")
    assert drawn.shape == shown.shape and float(abs(drawn - shown).max()) <= 2 / 255


def test_demo_models_report_their_measured_pass_size(readme_server) -> None:
    port = readme_server.port
    with AttributionClient(f"127.0.0.1:{port}") as client:
        image = client.get_model("image")
    sizes = {p.rows: p.rows_per_second for p in image.batch_probe}
    assert sizes and all(rate > 0 for rate in sizes.values())
    assert image.config.max_batch_rows in sizes  # the size the probe picked is the one served


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 6


def test_sigterm_drains_and_exits_cleanly() -> None:
    """SIGTERM to `attrserve serve` (its own server: the module's stays up for the other tests, in any order)."""
    with ServeProcess([*PLUGIN_ARGS, "--no-batch-probe"], command=SERVE, metrics=True) as server:
        with AttributionClient(server.address) as client:
            assert client.list_models(timeout=10)
        assert server.signal(signal.SIGTERM, timeout=30) == 0, server.output()
        assert "draining" in server.output()
