"""Shared pytest set-up: the oracle helpers are importable as `oracle`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
