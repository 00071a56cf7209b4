"""carcli: learned image downscaling and upscaling with the Content Adaptive Resampler.

>>> import carcli
>>> small = carcli.downscale(image, scale=4)          # PIL image, numpy array or tensor
>>> restored = carcli.upscale(small, scale=4)
>>> restored = carcli.roundtrip(image, scale=4)       # both steps in memory
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("carcli")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from carcli.checkpoints import load_model  # noqa: E402
from carcli.pipeline import downscale, roundtrip, upscale  # noqa: E402

__all__ = ["__version__", "downscale", "load_model", "roundtrip", "upscale"]
