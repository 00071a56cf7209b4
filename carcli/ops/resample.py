"""Public front of the adaptive resampling op.

``resample`` validates its arguments and hands them to a backend. The
pure-PyTorch backend (:mod:`carcli.ops.torch_fast`, checked against the readable
:mod:`carcli.ops.reference`) always exists; faster native backends (the CUDA
kernel) register themselves with :func:`register_backend` and are chosen for the
devices they claim, falling back to the pure-PyTorch one elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from carcli.ops.reference import kernel_size_of
from carcli.ops.torch_fast import resample_fixed, resample_torch

ResampleFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass
class Backend:
    name: str
    fn: ResampleFn
    supports: Callable[[torch.Tensor], bool]


_BACKENDS: list[Backend] = []
_TORCH = Backend("torch", resample_torch, lambda t: True)


def register_backend(name: str, fn: ResampleFn, supports: Callable[[torch.Tensor], bool]) -> None:
    """Put a backend ahead of the others (and of the reference) for the inputs it supports."""
    _BACKENDS[:] = [b for b in _BACKENDS if b.name != name]
    _BACKENDS.insert(0, Backend(name, fn, supports))


def unregister_backend(name: str) -> None:
    _BACKENDS[:] = [b for b in _BACKENDS if b.name != name]


def backend_for(hr: torch.Tensor) -> Backend:
    """The backend that :func:`resample` would use for this image."""
    for backend in _BACKENDS:
        if backend.supports(hr):
            return backend
    return _TORCH


def _check_args(
    hr: torch.Tensor,
    kernels: torch.Tensor,
    offsets_h: torch.Tensor | None,
    offsets_v: torch.Tensor | None,
    scale: int,
) -> None:
    if hr.dim() != 4 or kernels.dim() != 4:
        raise ValueError("hr and kernels must be 4-D (B x C x H x W, B x k*k x h x w)")
    if (offsets_h is None) != (offsets_v is None):
        raise ValueError("give both offsets or neither")
    if (
        offsets_h is not None
        and offsets_v is not None
        and (offsets_h.shape != kernels.shape or offsets_v.shape != kernels.shape)
    ):
        raise ValueError(
            f"kernels {tuple(kernels.shape)}, offsets_h {tuple(offsets_h.shape)} and "
            f"offsets_v {tuple(offsets_v.shape)} must have the same shape"
        )
    if hr.shape[0] != kernels.shape[0]:
        raise ValueError(f"batch sizes differ: hr {hr.shape[0]}, kernels {kernels.shape[0]}")
    kernel_size_of(kernels.shape[1])
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    _, _, hh, ww = hr.shape
    h, w = kernels.shape[2:]
    if (hh, ww) != (h * scale, w * scale):
        raise ValueError(
            f"hr is {hh}x{ww} but kernels are {h}x{w}: at scale {scale} hr must be "
            f"{h * scale}x{w * scale} (pad the image to a multiple of the scale first)"
        )
    devices = {t.device for t in (hr, kernels, offsets_h, offsets_v) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")


def resample(
    hr: torch.Tensor,
    kernels: torch.Tensor,
    offsets_h: torch.Tensor | None,
    offsets_v: torch.Tensor | None,
    scale: int,
) -> torch.Tensor:
    """Downscale ``hr`` (B x C x H x W) with per-pixel kernels and tap offsets.

    ``kernels``, ``offsets_h`` (horizontal, dX) and ``offsets_v`` (vertical, dY)
    are B x k*k x H/s x W/s; offsets are in LR pixels. The same kernels apply
    to every channel. Returns B x C x H/s x W/s. Differentiable w.r.t. all
    tensor inputs. Offsets None (both): all zero, the op's cheaper fixed-tap path.
    """
    _check_args(hr, kernels, offsets_h, offsets_v, scale)
    if offsets_h is None or offsets_v is None:  # a resampler without offsets: fixed taps
        return resample_fixed(hr, kernels, scale)
    return backend_for(hr).fn(hr, kernels, offsets_h, offsets_v, scale)
