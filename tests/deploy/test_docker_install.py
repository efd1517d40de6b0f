"""deploy/docker/install.sh's `app` phase, the image build's one step that installs the project, run for real into a
fresh virtualenv: from a copy of exactly what the Dockerfile copies into its build stage, with this machine's pip
settings instead of the CPU image's PyTorch index (torch==2.13.0 is a local wheel here). Then the server it
installed: `attrserve serve --help`, a start on free ports, one gRPC health Check, the image's healthcheck.py,
/metrics serving the gauge the HorizontalPodAutoscaler scales on, SIGTERM, exit 0.

Slow (about a minute): it installs torch and every dependency into the new virtualenv.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from deploykit import INSTALL_SH, ROOT, dockerfile, run, stages
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attrserve_service.cli import SETTINGS

LISTENING = re.compile(r"attrserve listening on (\S+):(\d+) \(metrics on (\S+):(\d+)\)")
# Where the demo models are in the image's venv (components/demo-models and deploy/docker/README.md use it).
DEMO_MODELS = Path("lib/python3.11/site-packages/attrserve_service/demo_models")


def _build_context(dest: Path) -> tuple[Path, list[str]]:
    """Lay out `dest` as the build stage's WORKDIR after its COPY lines; returns it and the `app` RUN's arguments."""
    _, build = next((f, body) for f, body in stages(dockerfile()) if f.value.endswith("AS build"))
    workdir = next(Path(i.value) for i in build if i.keyword == "WORKDIR")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for ins in build:
        if ins.keyword == "COPY":
            *sources, target = ins.value.split()
            for source in sources:
                src = ROOT / source
                out = dest / Path(target).relative_to(workdir) if target.startswith("/") else dest / target
                if src.is_dir():
                    shutil.copytree(src, out, ignore=ignore, dirs_exist_ok=True)
                else:
                    final = out / src.name if target.endswith("/") else out
                    final.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, final)
    (app,) = [i.value.split() for i in build if i.keyword == "RUN"]
    assert app[:3] == ["bash", str(workdir / "deploy/docker/install.sh"), "app"], app
    return dest, app[3:]


def _python311() -> str:
    """The interpreter to make the venv from, as VENV_PYTHON is in the image: a CPython 3.11 (this one's base
    interpreter when the tests run on 3.11, else python3.11 from PATH)."""
    if sys.version_info[:2] == (3, 11):
        return getattr(sys, "_base_executable", "") or sys.executable
    found = shutil.which("python3.11")
    if found is None:
        pytest.skip("the image's Python, 3.11, is not installed here (python3.11 is not on PATH)")
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    src, (workdir_arg, venv_arg) = _build_context(tmp / "src")
    assert (workdir_arg, venv_arg) == ("/src", "/opt/attrserve")
    venv = tmp / "opt-attrserve"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "TORCH_INDEX_URL")}
    env["VENV_PYTHON"] = _python311()
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(ROOT / ".venv")))
    started = time.monotonic()
    result = run(["bash", str(src / "deploy/docker/install.sh"), "app", str(src), str(venv)], timeout=600, env=env, cwd=tmp)
    print(f"install.sh app: {time.monotonic() - started:.0f} s\n{result.stdout[-2000:]}")
    assert (src / "deploy/docker/install.sh").read_bytes() == INSTALL_SH.read_bytes()
    return venv


def test_install_sh_builds_a_working_venv(installed: Path) -> None:
    python = installed / "bin" / "python"
    # attrserve came from the copied sources into the venv's site-packages: not the repository, not editable.
    code = (
        "import attrserve_service, attrserve_client, torch; print(attrserve_service.__file__, attrserve_client.__file__, torch.__version__)"
    )
    where = run([str(python), "-c", code], timeout=120).stdout.split()
    assert all(path.startswith(str(installed)) for path in where[:2]), where
    assert where[2].split("+")[0] == "2.13.0", where
    assert (installed / "healthcheck.py").is_file()
    assert (installed / DEMO_MODELS / "toy").is_dir()
    help_text = run([str(installed / "bin" / "attrserve"), "serve", "--help"], timeout=120).stdout
    for s in SETTINGS:
        assert s.flag in help_text and s.env in help_text


class _Server:
    """`attrserve serve` from the venv, its output drained by a thread; `lines` is everything printed so far."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.match: re.Match[str] | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.match is None and (found := LISTENING.search(line)):
                self.match = found
                self.ready.set()
        self.ready.set()

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def test_the_installed_server_starts_serves_health_and_drains(installed: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ATTRSERVE_")}
    # As the image runs it, models from a repository folder (the demo models the image's venv holds, as
    # components/demo-models serves them); on loopback here.
    env.update(
        PYTHONUNBUFFERED="1",
        PYTHONDONTWRITEBYTECODE="1",
        ATTRSERVE_HOST="127.0.0.1",
        ATTRSERVE_MODEL_REPOSITORY=str(installed / DEMO_MODELS),
    )
    server = _Server([str(installed / "bin" / "attrserve"), "serve", "--port", "0", "--metrics-port", "0", "--no-batch-probe"], env)
    try:
        assert server.ready.wait(120) and server.match, f"no `attrserve listening` line within 120 s:\n{server.output()}"
        host, port, metrics_host, metrics_port = server.match.groups()
        address = f"{host}:{port}"
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The image's HEALTHCHECK command, with the venv's python.
        check = run([str(installed / "bin" / "python"), str(installed / "healthcheck.py"), address], timeout=60, check=False)
        assert check.returncode == 0 and "SERVING" in check.stdout, check.stdout + check.stderr
        page = urllib.request.urlopen(f"http://{metrics_host}:{metrics_port}/metrics", timeout=10).read().decode()
        assert re.search(r'^attrserve_queue_rows\{model="toy"\} 0(\.0)?$', page, re.MULTILINE), "the HPA's gauge is missing"
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server did not exit within 30 s of SIGTERM:\n{server.output()}")
        assert code == 0, server.output()
    finally:
        server.kill()
    # A stopped server fails the health check (exit 1), as a HEALTHCHECK must.
    check = run([str(installed / "bin" / "python"), str(installed / "healthcheck.py"), "--timeout", "2", address], timeout=60, check=False)
    assert check.returncode == 1, check.stdout + check.stderr
