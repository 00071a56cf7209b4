"""MATLAB-compatible bicubic ``imresize`` in torch.

The bicubic baselines of the super-resolution literature (and the LR images
that SR networks are trained on) come from MATLAB's ``imresize``: Keys cubic
with a = -0.5, a kernel widened by 1/scale when shrinking (antialiasing), and
edge pixels mirrored ("symmetric") at the borders. OpenCV, Pillow and
``torch.nn.functional.interpolate`` all differ from it at the borders or in
the kernel, which moves PSNR by tenths of a dB, so this module reproduces
MATLAB's ``contributions`` routine exactly.

Resizing is linear and separable: each axis is a weight matrix, applied in blocks
of output rows (then columns), each block multiplied only by the few input rows
MATLAB's ``contributions`` names for it (``resize_weights`` gives the whole
matrix, for inspection). That is linear in the image size on any device,
differentiable, and the blocks are cached per size, scale, device and dtype.

For 8-bit images (``uint8=True``) MATLAB does not resize in one float pass: it
resizes one axis, rounds to uint8, then the other axis and rounds again (the
axis with the smaller scale first; rows first when the scales are equal).
``uint8=True`` does the same, in float64, and matches MATLAB-made LR files bit
for bit (the benchmark Set5 LR images at 2x and 4x: every pixel). 16-bit and
float images keep the single float pass (no intermediate rounding).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from carcli.models.quantize import quantize, quantize_bits

__all__ = [
    "bicubic_downscale",
    "bicubic_roundtrip",
    "bicubic_upscale",
    "cubic",
    "imresize",
    "resize_weights",
]

_KERNEL_WIDTH = 4.0  # support of the cubic kernel, in input pixels at scale 1


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * (
        (ax > 1) & (ax <= 2)
    )


@functools.lru_cache(maxsize=64)
def _contributions(
    in_len: int, out_len: int, scale: float, antialias: bool
) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB's ``contributions``: per output pixel, its input indices and weights.

    Both (out_len x taps): 0-based indices, mirrored into the image (an index can
    repeat near the borders), and float64 weights summing to 1 along each row.
    """
    if scale < 1 and antialias:
        # Stretch the kernel by 1/scale so it low-passes below the new Nyquist rate.
        def kernel(x: np.ndarray) -> np.ndarray:
            return scale * cubic(scale * x)

        width = _KERNEL_WIDTH / scale
    else:
        kernel, width = cubic, _KERNEL_WIDTH
    # Output pixel centres (1-based, as in MATLAB) mapped into input coordinates.
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]  # 1-based, may fall outside
    w = kernel(u[:, None] - indices)
    w = w / w.sum(axis=1, keepdims=True)
    # Symmetric padding: index 0 -> 1, -1 -> 2, n + 1 -> n, ... (edge repeated).
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    cols = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_len)]
    used = np.any(w != 0, axis=0)  # taps no output pixel uses (as MATLAB drops them)
    cols, w = np.ascontiguousarray(cols[:, used]), np.ascontiguousarray(w[:, used])
    cols.setflags(write=False)
    w.setflags(write=False)
    return cols, w


def _fold(cols: np.ndarray, w: np.ndarray, width: int) -> np.ndarray:
    """Contributions (rows x taps) as a dense (rows x width) matrix; an index that repeats
    near a border adds its weights."""
    rows = np.broadcast_to(np.arange(len(cols))[:, None], cols.shape)
    matrix = np.zeros((len(cols), width))
    np.add.at(matrix, (rows, cols), w)
    return matrix


@functools.lru_cache(maxsize=64)
def _weights_np(in_len: int, out_len: int, scale: float, antialias: bool) -> np.ndarray:
    """The contributions folded into a dense (out_len x in_len) float64 matrix."""
    matrix = _fold(*_contributions(in_len, out_len, scale, antialias), in_len)
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=128)
def _weights(
    in_len: int,
    out_len: int,
    scale: float,
    antialias: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    return torch.tensor(_weights_np(in_len, out_len, scale, antialias), device=device, dtype=dtype)


# Output rows (or columns) per block of the banded product: each block multiplies only
# the input rows its outputs read (64 s + 3 s + 2 when shrinking by s, 64 / s + 4 when
# enlarging), so the work grows with the image, not with its square.
BLOCK = 64


@functools.lru_cache(maxsize=128)
def _bands(
    in_len: int,
    out_len: int,
    scale: float,
    antialias: bool,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[tuple[int, int, torch.Tensor], ...]:
    """The weight matrix in blocks of :data:`BLOCK` output pixels: ``(first, stop, block)``
    with ``block`` (outputs x stop - first), the dense matrix restricted to the input
    pixels those outputs read."""
    cols, w = _contributions(in_len, out_len, scale, antialias)
    bands = []
    for start in range(0, out_len, BLOCK):
        c, v = cols[start : start + BLOCK], w[start : start + BLOCK]
        first, stop = int(c.min()), int(c.max()) + 1
        block = _fold(c - first, v, stop - first)
        bands.append((first, stop, torch.tensor(block, device=device, dtype=dtype)))
    return tuple(bands)


def _resize_axis(
    x: torch.Tensor, axis: int, out_len: int, scale: float, antialias: bool
) -> torch.Tensor:
    """Resize axis -2 (rows) or -1 (columns) of ``x`` by a banded matrix product.

    The dense (out x in) matrix multiplied every output by every input pixel: the
    bicubic baseline of a 24 MP photo took 6-13 s on 2 cores, of a 2 MP one 0.2-0.5 s.
    """
    bands = _bands(x.shape[axis], out_len, scale, antialias, x.device, x.dtype)
    if axis == -2:
        parts = [torch.matmul(block, x[..., a:b, :]) for a, b, block in bands]
    else:
        parts = [torch.matmul(x[..., a:b], block.T) for a, b, block in bands]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)


def resize_weights(
    in_len: int,
    out_len: int,
    scale: float | None = None,
    antialias: bool = True,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The (out_len x in_len) matrix that resizes one axis; ``scale`` defaults to out/in.

    The returned tensor is shared by the cache: do not modify it in place.
    """
    if in_len < 1 or out_len < 1:
        raise ValueError(f"lengths must be positive, got in={in_len}, out={out_len}")
    if scale is None:
        scale = out_len / in_len
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return _weights(in_len, out_len, float(scale), antialias, torch.device(device), dtype)


def imresize(
    x: torch.Tensor,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    antialias: bool = True,
    uint8: bool = False,
) -> torch.Tensor:
    """Bicubic resize of ``...xCxHxW`` float tensors, as MATLAB's ``imresize(x, scale)``.

    With ``scale`` alone the output is ceil(H*scale) x ceil(W*scale) and the
    coordinate mapping uses ``scale`` itself (as MATLAB does, even though the
    sizes were rounded up). With ``size`` alone each axis uses out/in. With both,
    ``size`` fixes the output and ``scale`` the mapping (MATLAB's result for
    ``scale`` cropped or extended to ``size``). No clamping: bicubic overshoots
    slightly outside the input range, as in MATLAB before its uint8 rounding.

    ``uint8=True``: ``x`` holds 8-bit samples (k/255; other values are rounded to
    that grid first) and is resized as MATLAB resizes a uint8 image, rounding and
    saturating to 8 bits after each axis. The result is on the 8-bit grid, in
    ``x``'s dtype; it is not differentiable.
    """
    if not x.is_floating_point():
        raise TypeError(f"imresize needs a floating-point tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"expected ...xHxW, got shape {tuple(x.shape)}")
    if scale is None and size is None:
        raise ValueError("give scale or size")
    in_h, in_w = x.shape[-2:]
    if size is None:
        assert scale is not None
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        size = (math.ceil(in_h * scale), math.ceil(in_w * scale))
    out_h, out_w = int(size[0]), int(size[1])
    scale_h = out_h / in_h if scale is None else scale
    scale_w = out_w / in_w if scale is None else scale
    if uint8:
        return _imresize_uint8(x, (out_h, out_w), (scale_h, scale_w), antialias)
    # The result does not depend on the order; shrinking first is cheaper.
    if out_h / in_h <= out_w / in_w:
        x = _resize_axis(x, -2, out_h, scale_h, antialias)
        return _resize_axis(x, -1, out_w, scale_w, antialias)
    x = _resize_axis(x, -1, out_w, scale_w, antialias)
    return _resize_axis(x, -2, out_h, scale_h, antialias)


def _round_uint8(x: torch.Tensor) -> torch.Tensor:
    """MATLAB's double-to-uint8 conversion, in place: nearest, halves away from zero, saturated.

    Only ever given a fresh temporary (each pass over a 24 MP image costs ~0.1 s)."""
    return x.add_(0.5).floor_().clamp_(0.0, 255.0)


def _imresize_uint8(
    x: torch.Tensor, size: tuple[int, int], scales: tuple[float, float], antialias: bool
) -> torch.Tensor:
    """MATLAB's uint8 ``imresize``: one axis at a time, rounding to uint8 after each.

    Float64 keeps the sums far closer to exact than the distance MATLAB's own double
    sums leave to a rounding tie, so ties round the same way.
    """
    out_h, out_w = size
    with torch.no_grad():
        levels = _round_uint8(x.detach().to(torch.float64).mul(255.0))
        rows = (-2, out_h, scales[0], antialias)
        cols = (-1, out_w, scales[1], antialias)
        # MATLAB sorts the axes by scale (a stable sort): rows first unless columns shrink more.
        for axis in (rows, cols) if scales[0] <= scales[1] else (cols, rows):
            levels = _round_uint8(_resize_axis(levels, *axis))
        return levels.to(x.dtype).div_(255.0)


def bicubic_downscale(hr: torch.Tensor, scale: int, uint8: bool = False) -> torch.Tensor:
    """MATLAB ``imresize(hr, 1/scale)``: ceil(H/scale) x ceil(W/scale), antialiased.

    ``uint8=True`` for an 8-bit ``hr``: MATLAB's uint8 result, bit for bit.
    """
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    h, w = hr.shape[-2:]
    # Integer ceil: H * (1/scale) in floating point can land just above an integer.
    return imresize(hr, scale=1 / scale, size=(-(-h // scale), -(-w // scale)), uint8=uint8)


def bicubic_upscale(
    lr: torch.Tensor, scale: int, size: tuple[int, int] | None = None, uint8: bool = False
) -> torch.Tensor:
    """MATLAB ``imresize(lr, scale)`` (scale*h x scale*w), then the top-left ``size`` crop.

    ``size`` lets an HR image whose sides are not multiples of ``scale`` be
    compared with its reconstruction. ``uint8=True`` for an 8-bit ``lr``: MATLAB's
    uint8 result.
    """
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    h, w = lr.shape[-2:]
    out = imresize(lr, scale=float(scale), size=(h * scale, w * scale), uint8=uint8)
    if size is not None:
        if size[0] > h * scale or size[1] > w * scale:
            raise ValueError(f"size {tuple(size)} exceeds the upscaled {(h * scale, w * scale)}")
        out = out[..., : size[0], : size[1]]
    return out


def bicubic_roundtrip(hr: torch.Tensor, scale: int, bits: int = 8) -> torch.Tensor:
    """The classical baseline: MATLAB bicubic down (8-bit LR) and up, at ``bits`` per sample.

    An 8-bit ``hr`` goes both ways exactly as MATLAB's ``imresize`` treats uint8 images
    (the LR images and bicubic rows of the SR literature); 16-bit and float images are
    resized in one float pass each way, with the LR rounded to 8 bits in between.
    """
    if bits == 8:
        lr = bicubic_downscale(hr.float(), scale, uint8=True)
        return bicubic_upscale(lr, scale, size=tuple(hr.shape[-2:]), uint8=True)
    lr = quantize(bicubic_downscale(hr.float(), scale))
    return quantize_bits(bicubic_upscale(lr, scale, size=tuple(hr.shape[-2:])), bits)
