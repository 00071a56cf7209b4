"""The adaptive resampling op and its backends."""

from carcli.ops.reference import resample_reference
from carcli.ops.resample import backend_for, register_backend, resample, unregister_backend

__all__ = [
    "backend_for",
    "register_backend",
    "resample",
    "resample_reference",
    "unregister_backend",
]
