"""deploy/docker: the Dockerfile passes hadolint and checkov (every skip with its reason), pins every image it pulls,
runs every install step through install.sh, and configures the server with variables it knows; install.sh passes
shellcheck and pins torch as pyproject does; the README's table of ATTRSERVE_* variables is the one SETTINGS gives.

No docker daemon is needed (none runs here or in CI): test_docker_install.py runs install.sh's `app` phase, the
build's only step that needs the project, into a fresh virtualenv.
"""

from __future__ import annotations

import re
import sys

import pytest
from deploykit import (
    DEPLOY,
    DOCKER,
    DOCKERFILE,
    DOCKERIGNORE,
    INSTALL_SH,
    ROOT,
    checkov_report,
    dockerfile,
    env_of,
    require,
    run,
    stages,
    suppress_comment,
)

from attrserve_service.cli import SETTINGS, server_config

# Images pulled from a registry, and the only forms of tag they may have: exact versions, no moving tags.
PINNED = {
    "python": re.compile(r"^3\.11\.\d+-slim-bookworm$"),
    "nvidia/cuda": re.compile(r"^\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d\d\.04$"),
    "ghcr.io/astral-sh/uv": re.compile(r"^\d+\.\d+\.\d+$"),
}
VARIANTS = ("cpu", "cuda")


def test_hadolint() -> None:
    hadolint = require("hadolint")
    # The strictest threshold: style and info findings fail too. No --ignore: an exception is an inline
    # `# hadolint ignore=` comment, checked below to carry its reason.
    result = run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)], timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_says_why() -> None:
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*#\s*hadolint\s+ignore=", line):
            before = lines[i - 1].strip() if i else ""
            assert before.startswith("#") and "hadolint ignore" not in before and len(before) > 20, (
                f"Dockerfile:{i + 1}: `{line.strip()}` needs a comment line above it saying why"
            )


def test_shellcheck() -> None:
    shellcheck = require("shellcheck")
    scripts = sorted(DEPLOY.rglob("*.sh"))
    assert INSTALL_SH in scripts
    result = run([shellcheck, "--severity=style", *map(str, scripts)], timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _image_ref(ins_value: str) -> str:
    return ins_value.split()[0]


def _resolve(ref: str, variant: str) -> str:
    return ref.replace("${VARIANT}", variant).replace("$VARIANT", variant)


def test_every_pulled_image_is_pinned_and_every_variant_resolves() -> None:
    instructions = dockerfile()
    names = {ins.value.split()[-1] for ins in instructions if ins.keyword == "FROM" and " AS " in ins.value.upper()}
    pulled = []
    for ins in instructions:
        if ins.keyword == "FROM":
            ref = _image_ref(ins.value)
            if "$" in ref:  # a stage chosen by the build argument: it must exist for every variant
                for variant in VARIANTS:
                    assert _resolve(ref, variant) in names, f"Dockerfile:{ins.line}: {ref} has no stage for VARIANT={variant}"
            elif ref not in names:
                pulled.append((ins.line, ref))
        for flag in ins.flags:
            found = re.search(r"from=([^,\s]+)", flag)
            if found and found.group(1) not in names:
                pulled.append((ins.line, found.group(1)))
    assert {ref.rsplit(":", 1)[0] for _, ref in pulled} == set(PINNED), pulled
    for line, ref in pulled:
        assert "@" not in ref or ":" in ref.split("@")[0], ref
        image, _, tag = ref.partition("@")[0].rpartition(":")
        assert PINNED[image].match(tag), f"Dockerfile:{line}: {ref} is not pinned to an exact version"
    # The global build argument that chooses the variant, defaulting to the CPU image.
    args = [ins for ins in instructions[: next(i for i, x in enumerate(instructions) if x.keyword == "FROM")] if ins.keyword == "ARG"]
    assert [a.value for a in args] == ["VARIANT=cpu"]


def test_the_cpu_and_cuda_images_run_the_same_python() -> None:
    instructions = dockerfile()
    cpu = next(_image_ref(i.value) for i in instructions if i.keyword == "FROM" and _image_ref(i.value).startswith("python:"))
    python_version = cpu.split(":")[1].split("-")[0]
    runs = [i.value for i in instructions if i.keyword == "RUN" and " python " in f" {i.value} "]
    assert runs == [f"bash /tmp/install.sh python {python_version} /opt/python"], runs


def test_every_step_that_installs_is_a_phase_of_install_sh() -> None:
    phases = []
    for ins in dockerfile():
        if ins.keyword == "RUN":
            for step in ins.value.split(" && "):
                found = re.fullmatch(r"bash (\S+/install\.sh) (app|python|user|malloc)\b.*", step)
                assert found, f"Dockerfile:{ins.line}: RUN {step!r} is not a phase of deploy/docker/install.sh"
                phases.append(found.group(2))
                mounted = any("target=/tmp/install.sh" in f and "source=deploy/docker/install.sh" in f for f in ins.flags)
                assert found.group(1) == "/src/deploy/docker/install.sh" or mounted, ins
    assert sorted(phases) == ["app", "malloc", "python", "user"]


def test_the_image_stage() -> None:
    image_from, image = stages(dockerfile())[-1]
    assert image_from.value.endswith("AS image")
    keywords = {i.keyword: i for i in image}
    env = env_of(image)
    # Listens on every interface, models from the /models volume, non-root, `attrserve serve` as the entrypoint.
    assert env["ATTRSERVE_HOST"] == "0.0.0.0" and env["ATTRSERVE_MODEL_REPOSITORY"] == "/models"
    assert keywords["VOLUME"].value == '["/models"]'
    assert keywords["ENTRYPOINT"].value == '["attrserve", "serve"]'
    user = keywords["USER"].value.split(":")
    assert all(part.isdigit() and int(part) >= 10000 for part in user), "USER: a numeric uid:gid >= 10000 (runAsNonRoot)"
    assert set(keywords["EXPOSE"].value.split()) == {env["ATTRSERVE_PORT"], env["ATTRSERVE_METRICS_PORT"]}
    assert "/opt/attrserve/healthcheck.py" in keywords["HEALTHCHECK"].value
    assert env["PATH"].startswith("/opt/attrserve/bin:")
    # Every ATTRSERVE_* variable the image sets is one the server reads, with a value it accepts.
    known = {s.env for s in SETTINGS} | {"ATTRSERVE_LOG_LEVEL", "ATTRSERVE_LOG_FORMAT"}
    settings = {k: v for k, v in env.items() if k.startswith("ATTRSERVE_")}
    assert set(settings) <= known, set(settings) - known
    config, _ = server_config([], environ=settings)
    assert (config.host, config.port, config.metrics_port, str(config.model_repository)) == ("0.0.0.0", 50051, 9090, "/models")


def _pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex (Go's filepath.Match plus `**`: any number of folders)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path, or a folder above it, decides; `!` re-includes."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _pattern(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not negate
    return ignored


def test_the_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")]
    sources = []
    for ins in dockerfile():
        if ins.keyword == "COPY" and not any(f.startswith("--from") for f in ins.flags):
            sources += ins.value.split()[:-1]
        for flag in ins.flags:
            found = re.search(r"type=bind,source=([^,]+)", flag)
            if found and "from=" not in flag:
                sources.append(found.group(1))
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(source.rstrip("/"), patterns), f"{source} is copied but Dockerfile.dockerignore leaves it out"
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        "bench/run.py",
        "service/attrserve_service/__pycache__/cli.cpython-311.pyc",
    ):
        assert _ignored(dropped, patterns), f"{dropped} would be sent to the builder"


def test_install_sh_pins_torch_as_pyproject_does() -> None:
    # pyproject's dependencies list it as "torch==X" (tomllib is 3.11+; the project runs on 3.10 too).
    pins = re.findall(r'^\s*"torch\s*==\s*([^";\s]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert len(pins) == 1, pins
    found = re.search(r"^TORCH_VERSION=(\S+)$", INSTALL_SH.read_text(), re.MULTILINE)
    assert found and found.group(1) == pins[0]


def test_the_readme_table_of_variables_is_generated_from_settings() -> None:
    result = run([sys.executable, str(DOCKER / "settings_table.py"), "--check"], timeout=60, check=False, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    readme = (DOCKER / "README.md").read_text()
    for s in SETTINGS:
        assert f"`{s.env}`" in readme and f"`{s.flag}`" in readme


@pytest.mark.parametrize("framework", ["dockerfile"])
def test_checkov_dockerfile(framework: str) -> None:
    (report,) = [r for r in checkov_report() if r["check_type"] == framework]
    failed = report["results"]["failed_checks"]
    assert not failed, [(c["check_id"], c["check_name"], c["file_path"], c["file_line_range"]) for c in failed]
    skipped = report["results"]["skipped_checks"]
    # The one skip, CKV_DOCKER_7: checkov cannot resolve `FROM base-${VARIANT}` to the pinned stages above.
    assert sorted(c["check_id"] for c in skipped) == ["CKV_DOCKER_7"]
    for check in skipped:
        assert len(suppress_comment(check)) > 40, f"{check['check_id']} is skipped without a reason"
    assert report["summary"]["passed"] > 50 and report["summary"]["parsing_errors"] == 0
