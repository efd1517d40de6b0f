"""Algorithm registry: every module of this package that defines ALGORITHM, by Captum class name in snake_case.

Adding an algorithm is adding one file here with `ALGORITHM = MyAlgorithm`.
"""

from __future__ import annotations

import importlib
import pkgutil

from attrserve_engine.algorithms.base import Algorithm, Limits


def _discover() -> dict[str, Algorithm]:
    found: dict[str, Algorithm] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        algorithm_class = getattr(module, "ALGORITHM", None)
        if algorithm_class is not None:
            algorithm = algorithm_class()
            found[algorithm.name] = algorithm
    return found


ALGORITHMS: dict[str, Algorithm] = _discover()

__all__ = ["ALGORITHMS", "Algorithm", "Limits"]
