"""carcli: learned image downscaling and upscaling with the Content Adaptive Resampler.

>>> import carcli
>>> small = carcli.downscale(image, scale=4)          # PIL image, numpy array or tensor
>>> restored = carcli.upscale(small, scale=4)
>>> restored = carcli.roundtrip(image, scale=4)       # both steps in memory
>>> carcli.save(small, "small.png")                   # PNG that remembers the original size
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("carcli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__", "downscale", "load_model", "roundtrip", "save", "upscale"]

# The API is imported on first use (PEP 562), so that `car --help` and the other
# pure command-line paths do not pay for importing torch.
_LAZY = {
    "load_model": "carcli.checkpoints",
    "downscale": "carcli.api",
    "roundtrip": "carcli.api",
    "upscale": "carcli.api",
    "save": "carcli.imageio",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'carcli' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
