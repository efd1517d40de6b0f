"""Makes the client package importable from the checkout when it is not installed."""

import pathlib
import sys

CLIENT_ROOT = pathlib.Path(__file__).resolve().parents[2] / "clients" / "python"
if str(CLIENT_ROOT) not in sys.path:
    sys.path.insert(0, str(CLIENT_ROOT))
