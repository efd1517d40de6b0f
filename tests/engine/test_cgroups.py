"""What a process's control groups allow it, read from /proc/<pid>/cgroup, /proc/<pid>/mountinfo and the cgroup files
(attrserve_engine.limits): a container's CPU quota (the engine's threads, the front's busy polling) and memory limit
(the CPU's memory, the per-request work cap's default). Fake /proc and cgroup trees stand in for the hosts' layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from attrserve_engine import InvalidArgument, ModelSpec
from attrserve_engine import engine as engine_module
from attrserve_engine import limits as limits_module
from attrserve_engine import models
from attrserve_engine.limits import cgroup_cpu_quota, cgroup_memory_limit


def fake_proc(tmp_path: Path, cgroups: list[str], mounts: list[tuple[str, str, str, str]], files: dict[str, str]) -> str:
    """A /proc/<pid> with its cgroup and mountinfo files (`mounts`: root, mount point under tmp_path, fstype, super
    options), and the cgroup files (`files`: path under tmp_path → content) that limits' cgroup readers read."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("".join(line + "\n" for line in cgroups))
    lines = [f"{30 + i} 20 0:{40 + i} {root} {tmp_path}/{point} rw,relatime - {fstype} {fstype} {options}\n" for i, (root, point, fstype, options) in enumerate(mounts)]
    (proc / "mountinfo").write_text("25 1 8:1 / / rw - ext4 /dev/sda1 rw\n" + "".join(lines))
    for path, content in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(content)
    return str(proc)


V2 = [("/", "cg", "cgroup2", "rw,nsdelegate")]
V1 = [("/", "cg/cpu,cpuacct", "cgroup", "rw,cpu,cpuacct"), ("/", "cg/memory", "cgroup", "rw,memory")]


@pytest.mark.parametrize(
    ("cgroups", "mounts", "files", "quota"),
    [
        # cgroup v2 in a container (its namespace's root): Kubernetes' limits.cpu 4, 1.5; none
        (["0::/"], V2, {"cg/cpu.max": "400000 100000\n"}, 4.0),
        (["0::/"], V2, {"cg/cpu.max": "150000 100000\n"}, 1.5),
        (["0::/"], V2, {"cg/cpu.max": "max 100000\n"}, None),
        # v2 seen from the host: the pod's quota sits above the container's cgroup, and the lowest on the path counts
        (["0::/kubepods/pod1/ctr"], V2, {"cg/kubepods/pod1/cpu.max": "200000 100000", "cg/kubepods/pod1/ctr/cpu.max": "max 100000"}, 2.0),
        (["0::/a/b"], V2, {"cg/a/cpu.max": "300000 100000", "cg/a/b/cpu.max": "250000 100000"}, 2.5),
        # cgroup v1 (docker --cpus 2 on a v1 host): cpu and cpuacct mounted together; -1 is no quota
        (["5:memory:/", "4:cpu,cpuacct:/"], V1, {"cg/cpu,cpuacct/cpu.cfs_quota_us": "200000", "cg/cpu,cpuacct/cpu.cfs_period_us": "100000"}, 2.0),
        (["4:cpu,cpuacct:/"], V1, {"cg/cpu,cpuacct/cpu.cfs_quota_us": "-1", "cg/cpu,cpuacct/cpu.cfs_period_us": "100000"}, None),
        # v1 without a cgroup namespace: the mount shows the container's own part of the hierarchy
        (["4:cpu,cpuacct:/docker/abc"], [("/docker/abc", "cg/cpu", "cgroup", "rw,cpu,cpuacct")], {"cg/cpu/cpu.cfs_quota_us": "50000", "cg/cpu/cpu.cfs_period_us": "100000"}, 0.5),
        # a quota in a memory cgroup is no CPU quota; unreadable or broken files are no quota
        (["5:memory:/"], V1, {"cg/memory/cpu.cfs_quota_us": "100000", "cg/memory/cpu.cfs_period_us": "100000"}, None),
        (["0::/"], V2, {"cg/cpu.max": "lots\n"}, None),
        (["0::/"], V2, {}, None),
        (["0::/"], [], {"cg/cpu.max": "100000 100000"}, None),
    ],
)
def test_the_cpu_quota_is_read_from_the_processs_cgroups(tmp_path: Path, cgroups, mounts, files, quota) -> None:
    assert cgroup_cpu_quota(fake_proc(tmp_path, cgroups, mounts, files)) == quota


@pytest.mark.parametrize(
    ("cgroups", "mounts", "files", "limit"),
    [
        (["0::/"], V2, {"cg/memory.max": "8589934592\n"}, 8 << 30),
        (["0::/"], V2, {"cg/memory.max": "max\n"}, None),
        # the pod's limit above the container's, which has none: the pod's
        (["0::/kubepods/pod1/ctr"], V2, {"cg/kubepods/pod1/memory.max": "2147483648", "cg/kubepods/pod1/ctr/memory.max": "max"}, 2 << 30),
        (["5:memory:/", "4:cpu,cpuacct:/"], V1, {"cg/memory/memory.limit_in_bytes": "4294967296"}, 4 << 30),
        (["5:memory:/"], V1, {"cg/memory/memory.limit_in_bytes": "9223372036854771712"}, 9223372036854771712),  # v1's "none"
        # a CPU controller's file is no memory limit
        (["4:cpu,cpuacct:/"], V1, {"cg/cpu,cpuacct/memory.limit_in_bytes": "4294967296"}, None),
    ],
)
def test_the_memory_limit_is_read_from_the_processs_cgroups(tmp_path: Path, cgroups, mounts, files, limit) -> None:
    assert cgroup_memory_limit(fake_proc(tmp_path, cgroups, mounts, files)) == limit


def test_no_cgroup_files_is_no_limit(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(str(tmp_path / "no such process")) is None
    assert cgroup_memory_limit(str(tmp_path / "no such process")) is None


def test_the_cpus_memory_is_the_machines_or_the_cgroups_limit_whichever_is_less(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's memory (the per-request work cap's default, a quarter of it) follows the cgroup's memory limit, as the
    memory the front end reads (limits.memory_limit: its --max-front-bytes default) does."""
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit, memory in ((1 << 30, 1 << 30), (None, machine), (machine * 4, machine)):
        monkeypatch.setattr(limits_module, "cgroup_memory_limit", lambda proc="/proc/self", limit=limit: limit)
        engine_module.device_memory.cache_clear()
        assert engine_module.device_memory(torch.device("cpu")) == limits_module.memory_limit() == memory
    engine_module.device_memory.cache_clear()


def test_a_negative_thread_count_is_refused_at_load() -> None:
    """A ModelSpec built in code (embedding) can carry one; torch.set_num_threads would fail on every pass."""
    with pytest.raises(InvalidArgument, match=r"model 'm': intra_op_threads -1: use 0"):
        models.LoadedModel(ModelSpec(name="m", module=torch.nn.Linear(2, 2), intra_op_threads=-1, device="cpu"), 256, 500)


@pytest.mark.parametrize(("threads", "cores", "warned"), [(3, 1.0, True), (3, 2.5, False), (2, 1.5, False), (2, 1.0, True)])
def test_a_model_asking_for_more_threads_than_the_cores_it_may_use_loads_with_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, threads: int, cores: float, warned: bool
) -> None:
    """A config's intra_op_threads above the cores the process may use (its affinity, its CPU quota: rounded up) still
    loads, with the count it asked for, and the log says its threads will wait for cores or for the quota."""
    monkeypatch.setattr(models, "cpu_limit", lambda proc="/proc/self": cores)
    with caplog.at_level("WARNING", logger="attrserve_engine.models"):
        model = models.LoadedModel(ModelSpec(name="m", module=torch.nn.Linear(2, 2), intra_op_threads=threads, device="cpu"), 256, 500)
    assert model.intra_op_threads == threads
    assert (f"model m: intra_op_threads {threads} is more than the" in caplog.text) == warned


def test_an_engine_made_in_a_container_caps_its_models_default_threads_at_the_cores_it_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch's own default counts the node's cores. An Engine made in the caller's process (embedding, tests,
    --no-engine-process) gives its models at most the cores the process may use, its CPU quota rounded up; a model's
    config still sets its own."""
    monkeypatch.setattr(engine_module, "cpu_limit", lambda proc="/proc/self": 0.5)
    engine = engine_module.Engine(engine_module.EngineLimits(probe_batch_rows=False, default_device="cpu"))
    try:
        assert engine.default_threads == 1
        engine.load(ModelSpec(name="m", module=torch.nn.Linear(2, 2)))
        engine.load(ModelSpec(name="own", module=torch.nn.Linear(2, 2), intra_op_threads=2))
        assert (engine.get_model("m").intra_op_threads, engine.get_model("own").intra_op_threads) == (1, 2)
    finally:
        engine.shutdown(drain=False, timeout=5)
    given = engine_module.Engine(engine_module.EngineLimits(probe_batch_rows=False, default_device="cpu"), threads=8)
    try:
        assert given.default_threads == 8  # a count given (the server's --engine-threads) is not capped again
    finally:
        given.shutdown(drain=False, timeout=5)
    monkeypatch.setattr(engine_module, "cpu_limit", lambda proc="/proc/self": 64.0)
    engine = engine_module.Engine(engine_module.EngineLimits(probe_batch_rows=False, default_device="cpu"))
    try:
        assert engine.default_threads == torch.get_num_threads()  # no quota below torch's count: torch's count
    finally:
        engine.shutdown(drain=False, timeout=5)
