"""Files that ship inside the carcli package: the trained weights and the sample photos.

They are package data (``carcli/weights``, ``carcli/samples``), found with
:mod:`importlib.resources`, so a wheel installed anywhere finds them the same way a git
checkout does. Importing this module does not import torch.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def bundled_path(name: str) -> Path:
    """Filesystem path of the bundled folder ``name`` (``"weights"`` or ``"samples"``).

    carcli is always installed as plain files (a wheel or a checkout), so the resource is a
    real folder; the ``Path`` conversion makes that explicit for the callers, which glob it.
    """
    return Path(str(resources.files("carcli").joinpath(name)))


def weights_path() -> Path:
    """The folder of the weights shipped with carcli (``$CARCLI_WEIGHTS`` is checked elsewhere)."""
    return bundled_path("weights")


def samples_path() -> Path:
    """The folder of the sample photos ``car roundtrip`` uses when given no INPUT."""
    return bundled_path("samples")
