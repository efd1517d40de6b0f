"""The model repository: its folders read into ModelSpecs (`scan`), and the ModelManager that loads, reloads and
unloads them while the server runs — at start-up, through the admin RPC, or by polling the folder.

Layouts, side by side in one repository:

    <repository>/<model>/model.py | model.pt | model.pt2  [config.pbtxt]      one version: config's `version`, default "1"
    <repository>/<model>/<N>/model.py | model.pt | model.pt2  [config.pbtxt]  versions N (positive integers); a config.pbtxt
    <repository>/<model>/config.pbtxt                                          beside them serves every version without its own

model.py: eager (`build_model()`, optional weights.pt); model.pt: TorchScript; model.pt2: a torch.export program
(`torch.export.save`), exported with a dynamic dim 0, e.g. `dynamic_shapes=({0: torch.export.Dim("batch")},)`; its
platform is told by the file name (config.pbtxt's `platform` has no value for it).

A folder that cannot be read (a config.pbtxt that is malformed, not UTF-8, unreadable or a folder; input dims other
than -1 or a positive size; a version that contradicts its folder; a folder that cannot be listed;
a model version that two folders hold, through their configs' names) becomes an Entry with an `error`: that version is
reported UNAVAILABLE with the error (a load that serves it keeps serving) while every other model serves. No folder can
stop a scan: start-up and every poll go on with the others.

The repository is read and its models loaded where the engine runs (the engine-core process); the front end imports
this module for Status, the control modes and RepositoryError, without torch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import text_format

from attrserve.v1 import model_config_pb2 as mc
from attrserve_engine.errors import FailedPrecondition, LoadStuck, NotFound, inside, shown
from attrserve_engine.events import version_order
from attrserve_service.convert import WIRE_DTYPES
from attrserve_service.demo_models import DEMO_MODEL_REPOSITORY

if TYPE_CHECKING:
    from attrserve_engine import Engine, ModelRecord, ModelSpec

log = logging.getLogger(__name__)

_PLATFORMS = {
    mc.PLATFORM_UNSPECIFIED: "",
    mc.PLATFORM_PYTORCH_EAGER: "pytorch_eager",
    mc.PLATFORM_TORCHSCRIPT: "torchscript",
    mc.PLATFORM_TORCH_EXPORT: "torch_export",
}
_MODEL_FILES = ("model.py", "model.pt", "model.pt2")
CONFIG = "config.pbtxt"

# How models are managed while the server runs (Triton's --model-control-mode):
CONTROL_NONE = "none"  # every model in the repository is loaded at start-up; nothing changes afterwards
CONTROL_EXPLICIT = "explicit"  # as none, and the ModelRepositoryService loads, reloads and unloads on request
CONTROL_POLL = "poll"  # the repository is re-read periodically: new or changed versions (re)load, removed ones unload
CONTROL_MODES = (CONTROL_NONE, CONTROL_EXPLICIT, CONTROL_POLL)


class RepositoryError(Exception):
    """The repository cannot be served at all (not a folder; at start-up, nothing in it could be loaded)."""


@dataclass(frozen=True)
class Entry:
    """One model version as the repository folder holds it now."""

    name: str
    version: str
    folder: Path
    fingerprint: str  # changes when a file its load reads changes (polling reloads on that)
    spec: ModelSpec | None  # None when the folder cannot be read; then `error` says why
    error: str = ""


def read_model_config(path: Path) -> mc.ModelConfig:
    """The config in `path` (the defaults when there is none). Raises RepositoryError naming the file for any
    failure to read or parse it: not UTF-8 text, a folder, unreadable, malformed."""
    config = mc.ModelConfig()
    try:
        if not path.exists():
            return config
        text = path.read_bytes().decode("utf-8")
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise RepositoryError(f"{path}: {e}") from None
    except UnicodeDecodeError as e:
        raise RepositoryError(f"{path}: not UTF-8 text: byte {e.object[e.start]:#04x} at offset {e.start} ({e.reason})") from None
    except IsADirectoryError:
        raise RepositoryError(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise RepositoryError(f"{path}: cannot be read: {e.strerror or e}") from None
    return config


def spec_from_config(folder: Path, config: mc.ModelConfig, config_path: Path | None = None) -> ModelSpec:
    import torch  # a ModelSpec names its inputs' torch dtypes: only the engine process reads the repository

    from attrserve_engine.models import InputSpec, ModelSpec

    where = config_path or folder / CONFIG
    inputs = []
    for i, s in enumerate(config.inputs):
        if s.dtype != 0 and s.dtype not in WIRE_DTYPES:
            raise RepositoryError(f"{where}: inputs[{i}].dtype {s.dtype} is not supported")
        # No dims means "not pinned" (any shape), not a scalar per example.
        dims = tuple(s.dims) if s.dims else None
        dtype = getattr(torch, WIRE_DTYPES[s.dtype].name) if s.dtype else None
        inputs.append(InputSpec(name=s.name or f"input{i}", dtype=dtype, dims=dims))
        if problem := inputs[-1].dims_problem(i):
            raise RepositoryError(f"{where}: model {config.name or folder.name!r} {problem}")
    if config.platform not in _PLATFORMS:
        raise RepositoryError(f"{where}: platform {config.platform} is not one this server knows")
    which = config.output.WhichOneof("selector")
    return ModelSpec(
        name=config.name or folder.name,
        version=config.version or "1",
        path=folder,
        platform=_PLATFORMS[config.platform],
        inputs=inputs,
        max_batch_rows=config.max_batch_rows,
        max_queue_delay_us=config.max_queue_delay_microseconds,
        device=config.device,
        output_index=config.output.index if which == "index" else None,
        output_key=config.output.key if which == "key" else None,
        description=config.description,
        precision=config.precision,
        max_queued_rows=config.max_queued_rows,
        max_queued_bytes=config.max_queued_bytes,
        strict_input_dtypes=config.strict_input_dtypes,
        intra_op_threads=config.intra_op_threads,
        instances=config.instances,
        memory_format=config.memory_format,
    )


def _has_model(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _MODEL_FILES)


def _fingerprint(paths: Iterable[Path]) -> str:
    """Names, sizes and modification times of every file under `paths` (compiled caches left out)."""
    digest = hashlib.sha1()
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        for path in files:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _entry(model_folder: Path, folder: Path, version: str | None) -> Entry:
    """The version in `folder` (`version`: its folder's name in the versioned layout, None in the flat one). Never
    raises: a folder that cannot be read or parsed, whatever the failure, is an Entry with its `error`."""
    shared = model_folder / CONFIG
    own = folder / CONFIG
    name, shown = model_folder.name, version or "1"
    config_path = own
    try:
        config_path = own if own.exists() or version is None else shared
        fingerprint = _fingerprint([folder] + ([shared] if version is not None and shared.exists() else []))
    except OSError as e:  # a file that cannot be looked at
        return _unreadable(name, shown, folder, e)
    try:
        config = read_model_config(config_path)
        name = config.name or model_folder.name
        if version is not None:
            if config.version and config.version != version:
                raise RepositoryError(f"{config_path}: version {config.version!r} contradicts its folder {folder}")
            config.version = version
        config.name = name  # (a version folder's config names the model folder's model)
        spec = spec_from_config(folder, config, config_path)
        spec.fingerprint, spec.repository = fingerprint, model_folder.parent
        return Entry(name, spec.version, folder, fingerprint, spec)
    except RepositoryError as e:
        return Entry(name, shown, folder, fingerprint, None, str(e))
    except Exception as e:  # whatever else reading the folder raised: this model's error, never the repository's
        return Entry(name, shown, folder, fingerprint, None, f"{config_path}: {type(e).__name__}: {e}")


def _unreadable(name: str, version: str, folder: Path, error: Exception) -> Entry:
    """A folder that cannot be read, as its model's error. The error is its fingerprint: a poll retries it once the
    error changes."""
    fingerprint = hashlib.sha1(f"unreadable\0{error}".encode()).hexdigest()
    return Entry(name, version, folder, fingerprint, None, f"model folder {folder} cannot be read: {error}")


def scan(root: Path | None) -> list[Entry]:
    """Every model version in the repository, sorted; raises RepositoryError only when `root` is not a folder (or
    cannot be listed). A model folder that cannot be read is an Entry with its `error`: it never stops the scan."""
    root = Path(root) if root is not None else DEMO_MODEL_REPOSITORY
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} is not a folder")
    try:
        model_folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError as e:
        raise RepositoryError(f"model repository {root} cannot be read: {e}") from None
    entries: list[Entry] = []
    for model_folder in model_folders:
        try:
            entries.extend(_model_entries(model_folder))
        except Exception as e:  # the folder cannot be listed (permissions, removed while read): the model's error
            if model_folder.name == "lost+found":
                continue  # a file system's own folder on a mounted volume (root's alone): never a model
            entries.append(_unreadable(model_folder.name, "1", model_folder, e))
    by_key: dict[tuple[str, str], list[Entry]] = {}
    for entry in entries:
        by_key.setdefault((entry.name, entry.version), []).append(entry)
    unique = []
    for (name, version), same in by_key.items():
        if len(same) > 1:  # none serves: a folder added later must not take the place of the one that serves
            folders = ", ".join(str(e.folder) for e in same)
            fingerprint = hashlib.sha1("\0".join(e.fingerprint for e in same).encode()).hexdigest()
            error = f"model {name!r} version {version!r} is in {len(same)} folders ({folders}); keep one (a config's name: names it)"
            same = [Entry(name, version, same[0].folder, fingerprint, None, error)]
        unique.extend(same)
    return unique


def _model_entries(model_folder: Path) -> list[Entry]:
    """The versions of one model folder (none when it holds no model file)."""
    numbered = (p for p in model_folder.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit() and int(p.name) > 0)
    versions = sorted(numbered, key=lambda p: int(p.name))
    versions = [p for p in versions if _has_model(p)]
    if not _has_model(model_folder):
        return [_entry(model_folder, folder, folder.name) for folder in versions]
    entry = _entry(model_folder, model_folder, None)
    if versions:
        numbers = ", ".join(p.name for p in versions)
        error = f"model folder {model_folder} has both a model file and version folders ({numbers}); keep one layout"
        entry = Entry(entry.name, entry.version, model_folder, entry.fingerprint, None, error)
    return [entry]


def load_repository(root: Path | None) -> list[ModelSpec]:
    """One ModelSpec per model version; raises RepositoryError for the first folder that cannot be read, or
    when there is none (tests and tools that want every folder right)."""
    entries = scan(root)
    for entry in entries:
        if entry.spec is None:
            raise RepositoryError(entry.error)
    if not entries:
        raise RepositoryError(f"model repository {root} has no model folders (each needs model.py, model.pt or model.pt2)")
    return [entry.spec for entry in entries if entry.spec is not None]


@dataclass(frozen=True)
class Status:
    """A model version and its state, as the admin RPC and GetModel report them (state: a ModelState value,
    or "unloaded" for a version that is in the repository but not loaded)."""

    name: str
    version: str
    state: str
    reason: str = ""


UNLOADED = "unloaded"


class ModelManager:
    """Loads the repository's models into the engine and keeps them in step with it.

    One load or unload of a model at a time (per model name); model code runs on executor threads, never on
    the event loop. A load that fails leaves its version UNAVAILABLE with the error (or, for a reload, the
    previous load serving) while every other model serves."""

    def __init__(self, engine: Engine, root: Path | None, control: str = CONTROL_NONE) -> None:
        """`root` None: the engine's models were loaded by its owner; there is no repository to follow."""
        if control not in CONTROL_MODES:
            raise RepositoryError(f"model control {control!r} is not one of {', '.join(CONTROL_MODES)}")
        self.engine = engine
        self.root = Path(root) if root is not None else None
        self.control = control
        self._loaded: dict[tuple[str, str], str] = {}  # fingerprint of the folder each version was last loaded from
        self._locks: dict[str, asyncio.Lock] = {}

    async def load_all(self, only: Collection[tuple[str, str]] | None = None, skip: Mapping[tuple[str, str], str] | None = None) -> None:
        """Start-up: load every version in the repository (`only`: just these (name, version) pairs — an engine
        process restarted under explicit control loads what was loaded before). Versions in `skip` are not loaded: they
        are UNAVAILABLE with its reason (LoadStuck), and a poll loads them once their files change (loads that held the
        engine process before this one, EngineProcess._heartbeat). Without runtime control a repository where nothing
        can be loaded is an error (RepositoryError, with every reason); with it the server starts anyway."""
        entries = [e for e in self._scan() if only is None or (e.name, e.version) in only]
        for entry in entries:
            why = (skip or {}).get((entry.name, entry.version))
            if why is None:
                await self._load_entry(entry)
                continue
            self._loaded[(entry.name, entry.version)] = entry.fingerprint
            log.error("model %s v%s is not loaded: %s", entry.name, entry.version, why)
            self.engine.load_failed(entry.name, entry.version, LoadStuck(why), entry.spec)
        if self.control != CONTROL_NONE or self.engine.models():
            return
        if not entries:
            raise RepositoryError(f"model repository {self.root} has no model folders (each needs model.py, model.pt or model.pt2)")
        reasons = "; ".join(f"{r.name} v{r.version} ({r.spec.path if r.spec else '?'}): {r.reason}" for r in self.engine.model_records())
        raise RepositoryError(f"no model in {self.root} could be served: {reasons}")

    def check_control(self) -> None:
        if self.control != CONTROL_EXPLICIT:
            raise FailedPrecondition(
                f"models are not loaded or unloaded on request on this server (model control: {self.control}); "
                "start it with --model-control explicit"
            )

    async def load(self, name: str, version: str = "") -> list[Status]:
        """(Re)load a model's versions from its folder as it is now; versions gone from the folder are unloaded
        (when no version is named). Raises FailedPrecondition naming every version that failed."""
        self.check_control()
        scanned = await asyncio.to_thread(self._scan)
        entries = [e for e in scanned if e.name == name]
        if not entries:
            raise NotFound(f"model {shown(name)} is not in the model repository")
        if version:
            entries = [e for e in entries if e.version == version]
            if not entries:
                raise NotFound(f"model {name!r} has no version {shown(version)} in the model repository")
        async with self._lock(name):
            for entry in entries:
                await self._load_entry(entry)
            if not version:
                present = {e.version for e in entries}
                for record in self.engine.model_records():
                    if record.name == name and record.version not in present:
                        await self._unload(name, record.version)
        statuses = self.statuses(name, scanned)
        failed = [s for s in statuses if s.version in {e.version for e in entries} and s.reason]
        if failed:
            raise FailedPrecondition("; ".join(f"model {s.name!r} version {s.version!r} could not be loaded: {s.reason}" for s in failed))
        return statuses

    async def unload(self, name: str, version: str = "") -> list[Status]:
        """Unload a model's versions (all, or the one named) after their accepted requests finish."""
        self.check_control()
        self.engine.model_record(name, version)  # NotFound naming what exists
        async with self._lock(name):
            versions = [r.version for r in self.engine.model_records() if r.name == name and (not version or r.version == version)]
            for v in versions:
                await self._unload(name, v)
        return await self.index(name)

    async def poll(self) -> None:
        """One look at the repository: load new versions, reload changed ones, unload removed ones."""
        try:
            entries = await asyncio.to_thread(self._scan)  # file system calls stay off the event loop
        except RepositoryError as e:
            log.error("model repository: %s; the loaded models keep serving", e)
            return
        current = {(e.name, e.version): e for e in entries}
        for key, entry in current.items():
            if self._loaded.get(key) != entry.fingerprint:
                async with self._lock(entry.name):
                    log.info("model repository: %s %s v%s", "reloading" if key in self._loaded else "loading", *key)
                    await self._load_entry(entry)
        for name, version in [key for key in self._loaded if key not in current]:
            async with self._lock(name):
                log.info("model repository: %s v%s is gone from the repository; unloading", name, version)
                await self._unload(name, version)

    async def poll_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll()
            except Exception:  # a poll must never end the polling
                log.exception("model repository poll failed")

    async def index(self, name: str | None = None) -> list[Status]:
        """`statuses` with the repository as it is now (read off the event loop)."""
        try:
            entries = await asyncio.to_thread(self._scan)
        except RepositoryError:
            entries = []
        return self.statuses(name, entries)

    def statuses(self, name: str | None = None, entries: Sequence[Entry] = ()) -> list[Status]:
        """Every version known to the engine, and every other one of `entries` (a scan of the repository) as UNLOADED."""
        records = [r for r in self.engine.model_records() if name is None or r.name == name]
        statuses = [self._status(r) for r in records]
        known = {(r.name, r.version) for r in records}
        statuses += [
            Status(e.name, e.version, UNLOADED) for e in entries if (name is None or e.name == name) and (e.name, e.version) not in known
        ]
        return sorted(statuses, key=lambda s: (s.name, version_order(s.version)))

    def _scan(self) -> list[Entry]:
        return [] if self.root is None else scan(self.root)

    def _status(self, record: ModelRecord) -> Status:
        state, reason = self.engine.model_state(record)
        return Status(record.name, record.version, state.value, reason)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _load_entry(self, entry: Entry) -> None:
        self._loaded[(entry.name, entry.version)] = entry.fingerprint
        if entry.spec is None:
            log.error("model %s v%s cannot be loaded: %s", entry.name, entry.version, entry.error)
            # the version's reason, which clients read (GetModel, LoadModel, a request it cannot serve): its files named
            # inside the repository ("m/config.pbtxt"), not where that is on the server (the log says)
            self.engine.load_failed(entry.name, entry.version, RepositoryError(inside(entry.error, self.root)))
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.load, entry.spec)
        except FailedPrecondition as e:  # refused: an earlier load of it, given up as stuck, still runs
            self._loaded.pop((entry.name, entry.version), None)  # so a later poll loads these files once it returns
            log.error("model folder %s was not loaded: %s", entry.folder, e)
        except Exception as e:  # recorded by the engine: the version is UNAVAILABLE with the reason
            log.error("model folder %s could not be loaded: %s: %s", entry.folder, type(e).__name__, e)

    async def _unload(self, name: str, version: str) -> None:
        self._loaded.pop((name, version), None)
        await asyncio.get_running_loop().run_in_executor(None, self.engine.unload, name, version)
