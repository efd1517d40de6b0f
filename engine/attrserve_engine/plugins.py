"""Plugins: algorithms from outside the engine — a .py file, a folder of them, or an importable module — served like the built-ins."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from pathlib import Path
from types import ModuleType

from attrserve_engine.algorithms.base import Algorithm
from attrserve_engine.errors import InvalidArgument
from attrserve_engine.user_code import import_file

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _import(source: str) -> list[ModuleType]:
    path = Path(source)
    if path.is_dir():
        return [m for p in sorted(path.glob("*.py")) if not p.name.startswith("_") for m in _import(str(p))]
    if path.suffix == ".py":
        if not path.exists():
            raise InvalidArgument(f"plugin file {path} does not exist")
        return [import_file(path, "attrserve_plugin")]
    try:
        return [importlib.import_module(source)]
    except ImportError as e:
        raise InvalidArgument(f"plugin {source!r} is neither a .py file, a folder nor an importable module: {e}") from None


def load_plugins(source: str) -> list[Algorithm]:
    """The algorithms `source` defines (each module's ALGORITHM), checked like a built-in would be."""
    found = []
    for module in _import(source):
        cls = getattr(module, "ALGORITHM", None)
        if cls is None:
            continue
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise InvalidArgument(f"{module.__name__}.ALGORITHM must be an Algorithm subclass, got {cls!r}")
        algorithm = cls()
        name = getattr(algorithm, "name", "")
        if not _NAME.match(name or ""):
            raise InvalidArgument(f"{module.__name__}: algorithm name {name!r} must be snake_case")
        if not dataclasses.is_dataclass(algorithm.params_type):
            raise InvalidArgument(f"{name}: params_type must be a dataclass of Captum-style parameters")
        found.append(algorithm)
    if not found:
        raise InvalidArgument(f"plugin {source!r} defines no ALGORITHM")
    return found
