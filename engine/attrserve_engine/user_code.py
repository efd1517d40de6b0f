"""Loading a user's Python file (a model folder's model.py, a plugin) as a module of its own."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from types import CodeType, ModuleType


class _FreshSourceLoader(importlib.machinery.SourceFileLoader):
    """Compiles the source on every import, never from a cached .pyc: the cache is checked by the file's mtime in
    whole seconds and its size, so a model.py rewritten within a second at the same length (a reload right after
    an edit) would otherwise run the previous code."""

    def get_code(self, fullname: str) -> CodeType:
        return compile(self.get_data(self.path), self.path, "exec", dont_inherit=True)


def is_user_module(name: str) -> bool:
    """Whether the module called `name` is a user's file that import_file ran (only the process that ran it has it)."""
    return isinstance(getattr(sys.modules.get(name), "__loader__", None), _FreshSourceLoader)


def import_file(path: Path, prefix: str) -> ModuleType:
    """Run `path` as a module named `<prefix>_<stem>_<digest of its path>`, so two files never collide; each call
    runs the file as it is now."""
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"{prefix}_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(name, path, loader=_FreshSourceLoader(name, str(path)))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module
