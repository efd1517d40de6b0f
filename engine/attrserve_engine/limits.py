"""The engine's server-wide caps and defaults (EngineLimits), and what the machine lets the process use: the cores
(cpu_limit) and the memory its container's control groups allow. Imports nothing heavy: `attrserve serve` reads its
settings from here and starts the engine process before the front end imports torch (docs/ARCHITECTURE.md, "Start-up")."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from attrserve_engine.algorithms import Limits

DEFAULT_MAX_BATCH_ROWS = 256
# The range of an index or integer parameter a client sends: what an int64 tensor holds. A Python int past it (a JSON
# number, a uint64, a protobuf Struct's whole double) is refused by name where it is parsed (targets.check_int64,
# algorithms.base's parameters, oip's targets): numpy and torch would raise OverflowError, an INTERNAL error.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DEFAULT_MAX_QUEUE_DELAY_US = 500


@dataclass(frozen=True)
class EngineLimits:
    """Server-wide caps; each breach is a clear INVALID_ARGUMENT or RESOURCE_EXHAUSTED."""

    max_n_steps: int = 1000
    max_nt_samples: int = 1000
    max_rows_per_request: int = 100_000
    max_queued_requests: int = 10_000
    default_max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS
    default_max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US
    default_device: str = "auto"
    # Measure each model's best pass size at load (models with pinned input shapes and no configured max_batch_rows).
    probe_batch_rows: bool = True
    probe_seconds: float = 1.5
    # A worker that died is restarted after this long (doubling while it keeps dying, up to 30 s).
    worker_restart_delay_s: float = 0.1
    # An unloaded or replaced load finishes the requests it accepted for at most this long before it is released.
    drain_seconds: float = 30.0
    # Admission, per model: rows accepted and not yet computed (0: max_queue_seconds of work at the model's
    # measured rate) and their estimated bytes (0: queued_bytes_bound of its device); a model's config.pbtxt may set
    # its own.
    default_max_queued_rows: int = 0
    max_queue_seconds: float = 2.0
    default_max_queued_bytes: int = 0
    # A fused pass is cut to at most this long at the model's measured rate (never below one block's rows).
    max_pass_seconds: float = 0.25
    # A pass still running after this long (and after Scheduler.give_up_stuck_pass's multiple of what its rows take)
    # is given up as stuck in the model's code: its device's requests fail and health says NOT_SERVING
    # (the engine process exits and is started again). 0: never.
    stuck_pass_seconds: float = 60.0
    # A load (the model's build, its weights, the pass-size probe, the warm-ups) still running after this long is
    # given up as stuck in the model's code: the version is UNAVAILABLE with why (it serves if the load ever returns),
    # and loading goes on with the next model (Engine.load). 0: never. Well under the start-up probe's 10 minutes
    # (deploy/k8s), so a pod serves its other models.
    stuck_load_seconds: float = 300.0
    # Most plans build a request's rows of model work at once (IntegratedGradients' n_steps copies of each example), so
    # a request whose rows would hold more input bytes than this at once is refused before it can exhaust memory
    # (perturbation methods build theirs a pass at a time and hold only their examples); 0: a quarter of the memory of
    # the model's device (for the CPU: the engine's cgroup limit, or the machine's memory).
    max_request_work_bytes: int = 0

    @property
    def algorithm_limits(self) -> Limits:
        from attrserve_engine.algorithms import Limits  # torch: only the engine asks for these

        return Limits(max_n_steps=self.max_n_steps, max_nt_samples=self.max_nt_samples)


# -- what the process's control groups allow it (a container's limits) -----------------------------------------------


def cpu_limit(proc: str = "/proc/self") -> float:
    """The cores this process may keep busy: its CPU affinity, capped by its control groups' CPU quota (Kubernetes'
    limits.cpu, docker's --cpus). A container's affinity is every core of its node unless the node pins it (the
    kubelet's static CPU manager), so counting the affinity alone gave the engine of a pod limited to 4 cores on a
    64-core node 63 torch threads, which the quota then throttled."""
    cores = float(len(os.sched_getaffinity(0)))
    quota = cgroup_cpu_quota(proc)
    return cores if quota is None else min(cores, quota)


def cgroup_cpu_quota(proc: str = "/proc/self") -> float | None:
    """The CPU quota, in cores, of the process's control group and of those above it that its mounts show (Kubernetes'
    limits.cpu, docker's --cpus): cgroup v2's cpu.max, v1's cpu.cfs_quota_us over cpu.cfs_period_us; the lowest of
    them. None without a quota, or where none of the files can be read. `proc`: /proc/<pid> (tests give a fake one)."""
    return min(_cgroup_values("cpu", _cpu_quota, proc), default=None)


def memory_limit(proc: str = "/proc/self") -> int:
    """Bytes of memory this process may use: the machine's, or its control groups' limit where that is less."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(total, cgroup_memory_limit(proc) or total)


def cgroup_memory_limit(proc: str = "/proc/self") -> int | None:
    """The memory limit, in bytes, of the process's control group and of those above it that its mounts show (v2's
    memory.max, v1's memory.limit_in_bytes); the lowest of them. None without one (v1 writes "no limit" as a number
    near 2^63, which the machine's memory is below anyway)."""
    return min(_cgroup_values("memory", _memory_limit, proc), default=None)


def _cgroup_values(controller: str, read: Callable[[str, int], float | None], proc: str) -> Iterator:
    """`read(directory, version)` of each cgroup on the process's path in `controller`'s hierarchy, from its own up to
    the root its mount shows: a limit set on any of them applies (v2: the hierarchy; v1: the controller's mount)."""
    try:
        with open(f"{proc}/cgroup") as f:
            memberships = [line.rstrip("\n").split(":", 2) for line in f]
        with open(f"{proc}/mountinfo") as f:
            mounts = [m for m in map(_cgroup_mount, f) if m is not None]
    except OSError:
        return
    for membership in memberships:
        if len(membership) != 3:
            continue
        _, controllers, path = membership
        version = 2 if controllers == "" else 1
        if version == 1 and controller not in controllers.split(","):
            continue
        for root, point, mounted, options in mounts:
            if mounted != version or (version == 1 and controller not in options):
                continue
            if root != "/" and path != root and not path.startswith(root + "/"):
                continue  # the mount shows another part of the hierarchy
            here = os.path.normpath(os.path.join(point, os.path.relpath(path, root)))
            while here.startswith(point):
                value = read(here, version)
                if value is not None:
                    yield value
                if here == point:
                    break
                here = os.path.dirname(here)


def _cgroup_mount(line: str) -> tuple[str, str, int, set[str]] | None:
    """A mountinfo line's (root, mount point, cgroup version, super options) when it mounts a cgroup hierarchy."""
    fields, _, tail = line.partition(" - ")
    own, rest = fields.split(), tail.split()
    if len(own) < 5 or len(rest) < 3 or rest[0] not in ("cgroup", "cgroup2"):
        return None
    return own[3], own[4], 2 if rest[0] == "cgroup2" else 1, set(rest[2].split(","))


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name)) as f:
            return f.read().strip()
    except OSError:
        return None


def _cpu_quota(directory: str, version: int) -> float | None:
    """The quota (cores) one cgroup sets: v2 "max 100000" (none) or "150000 100000" (1.5); v1 -1 (none) or µs per
    period. None without one, or where the files cannot be read."""
    if version == 2:
        quota, _, period = (_read(directory, "cpu.max") or "").partition(" ")
    else:
        quota, period = _read(directory, "cpu.cfs_quota_us") or "", _read(directory, "cpu.cfs_period_us") or ""
    try:
        cores = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):  # "max", or no file
        return None
    return cores if cores > 0 else None


def _memory_limit(directory: str, version: int) -> int | None:
    """The memory limit (bytes) one cgroup sets: v2 "max" (none) or a number; v1 a number."""
    try:
        limit = int(_read(directory, "memory.max" if version == 2 else "memory.limit_in_bytes") or "")
    except ValueError:
        return None
    return limit if limit > 0 else None
