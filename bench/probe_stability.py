"""How stable is the pass-size choice? Load each demo model N times (the probe runs at every load) and print the
max_batch_rows it chose each time.

    .venv/bin/python bench/probe_stability.py            # 6 loads each of image and tabular
    .venv/bin/python bench/probe_stability.py --loads 10 --models image
"""

from __future__ import annotations

import argparse
import collections
import copy

from attrserve_engine import Engine, EngineLimits
from attrserve_service.repository import load_repository


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loads", type=int, default=6)
    p.add_argument("--models", default="image,tabular", help="comma-separated demo models")
    args = p.parse_args()
    specs = {s.name: s for s in load_repository(None)}
    print("| model | choices (rows) | counts |\n|---|---|---|")
    for name in args.models.split(","):
        picks = []
        for _ in range(args.loads):
            engine = Engine(EngineLimits(default_device="cpu"))
            try:
                picks.append(engine.load(copy.deepcopy(specs[name])).max_batch_rows)
            finally:
                engine.shutdown(drain=False, timeout=5)
        counts = ", ".join(f"{rows}: {n}" for rows, n in collections.Counter(picks).most_common())
        print(f"| {name} | {' '.join(map(str, picks))} | {counts} |")


if __name__ == "__main__":
    main()
