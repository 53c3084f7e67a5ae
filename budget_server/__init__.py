"""budgetd's central service: the authoritative budget ledger behind a grpc.aio API."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("budgetd")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
