"""attrserve_service: the gRPC edge of attrserve (server, servicer, conversions, metrics, CLI)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("attrserve")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
