"""mps-guard: flags image-classifier predictions whose minimal sufficient pixel set looks wrong."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mps-guard")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
