"""The adaptive resampling op and its backends."""

# Importing native registers the "cuda" backend; it compiles nothing until a
# CUDA tensor first reaches resample().
from carcli.ops.native import active_backend
from carcli.ops.reference import resample_reference
from carcli.ops.resample import backend_for, register_backend, resample, unregister_backend
from carcli.ops.torch_fast import resample_torch

__all__ = [
    "active_backend",
    "backend_for",
    "register_backend",
    "resample",
    "resample_reference",
    "resample_torch",
    "unregister_backend",
]
