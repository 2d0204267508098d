"""sidekey: keeps long-lived API keys out of AI agents on Kubernetes.

The distribution maps top-level folders to subpackages (see pyproject.toml):
``sidekey.core`` holds the contract between the parts, and ``sidekey.proxy``,
``sidekey.webhook`` and ``sidekey.operator`` are the three components, which
import the core and never each other.
"""

from importlib import metadata

try:
    __version__ = metadata.version("sidekey")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
