"""The resampling op against a slow per-pixel loop written from the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from carcli.ops import resample, resample_reference, resample_torch


def _reflect(i: int, n: int) -> int:
    # numpy-style "reflect" (no edge repeat), applied repeatedly.
    while i < 0 or i >= n:
        i = -i if i < 0 else 2 * (n - 1) - i
    return i


def _bilinear_clamped(img: np.ndarray, y: float, x: float) -> float:
    hp, wp = img.shape
    y = min(max(y, 0.0), hp - 1.0)
    x = min(max(x, 0.0), wp - 1.0)
    y0, x0 = math.floor(y), math.floor(x)
    y1, x1 = min(y0 + 1, hp - 1), min(x0 + 1, wp - 1)
    b, a = y - y0, x - x0
    return (1 - b) * ((1 - a) * img[y0, x0] + a * img[y0, x1]) + b * (
        (1 - a) * img[y1, x0] + a * img[y1, x1]
    )


def slow_resample(hr, kernels, dx, dy, s):
    """Plain loops in float64: the method's section 2, line by line."""
    hr, kernels, dx, dy = (t.double().numpy() for t in (hr, kernels, dx, dy))
    b_n, c_n, hh, ww = hr.shape
    taps, h, w = kernels.shape[1:]
    k = int(round(math.sqrt(taps)))
    p = k // 2
    out = np.zeros((b_n, c_n, h, w))
    for b in range(b_n):
        pad = np.empty((c_n, hh + 2 * p, ww + 2 * p))
        for yy in range(hh + 2 * p):
            for xx in range(ww + 2 * p):
                pad[:, yy, xx] = hr[b, :, _reflect(yy - p, hh), _reflect(xx - p, ww)]
        for i in range(h):
            for j in range(w):
                for u in range(k):
                    for v in range(k):
                        t = u * k + v
                        px = (j + 0.5) * (ww / w) + v + s * dx[b, t, i, j] - 0.5
                        py = (i + 0.5) * (hh / h) + u + s * dy[b, t, i, j] - 0.5
                        for c in range(c_n):
                            out[b, c, i, j] += kernels[b, t, i, j] * _bilinear_clamped(
                                pad[c], py, px
                            )
    return torch.from_numpy(out)


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    """The test's random stream, from conftest's printed, replayable seed."""
    return torch.Generator().manual_seed(seed)


def _random_inputs(gen, b, c, h, w, s, k, offset_scale=1.0, dtype=torch.float64):
    hr = torch.rand(b, c, h * s, w * s, generator=gen, dtype=dtype)
    kern = torch.rand(b, k * k, h, w, generator=gen, dtype=dtype)
    kern = kern / kern.sum(1, keepdim=True)
    dx = (torch.rand(b, k * k, h, w, generator=gen, dtype=dtype) * 2 - 1) * offset_scale
    dy = (torch.rand(b, k * k, h, w, generator=gen, dtype=dtype) * 2 - 1) * offset_scale
    return hr, kern, dx, dy


@pytest.mark.parametrize("autograd", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize(
    "scale,h,w,offset_scale",
    [(2, 5, 4, 1.0), (2, 3, 7, 3.0), (4, 3, 4, 1.0), (4, 2, 3, 4.0)],
)
def test_matches_per_pixel_loop(scale, h, w, offset_scale, autograd, gen):
    """Both paths of the op `car` runs (in place without autograd, out of place with it)."""
    k = 3 * scale + 1
    hr, kern, dx, dy = _random_inputs(gen, 2, 3, h, w, scale, k, offset_scale)
    expected = slow_resample(hr, kern, dx, dy, scale)
    got = resample(hr, kern.requires_grad_(autograd), dx, dy, scale)
    assert got.requires_grad == autograd
    torch.testing.assert_close(got.detach(), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(resample_reference(hr, kern, dx, dy, scale).detach(), expected)


def test_offsets_reaching_past_the_padded_border_clamp(gen):
    hr, kern, dx, dy = _random_inputs(gen, 1, 3, 3, 3, 2, 7)
    # Push every tap far outside: samples clamp to the padded border.
    dx = dx.sign() * 10.0
    dy = -dy.abs() * 10.0
    torch.testing.assert_close(
        resample(hr, kern, dx, dy, 2), slow_resample(hr, kern, dx, dy, 2), rtol=1e-10, atol=1e-10
    )


def test_float32_matches_float64(gen):
    hr, kern, dx, dy = _random_inputs(gen, 2, 3, 9, 11, 4, 13)
    ref = resample(hr, kern, dx, dy, 4)
    got = resample(*(t.float() for t in (hr, kern, dx, dy)), 4)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autograd", [False, True], ids=["inference", "autograd"])
def test_chunked_equals_single_band(autograd, gen):
    hr, kern, dx, dy = _random_inputs(gen, 1, 3, 17, 6, 2, 7, dtype=torch.float32)
    hr.requires_grad_(autograd)
    whole = resample_reference(hr, kern, dx, dy, 2)
    banded = resample_reference(hr, kern, dx, dy, 2, chunk_bytes=1)  # one row per band
    torch.testing.assert_close(banded, whole, rtol=1e-6, atol=1e-6)
    for chunk in (1, 2000, 10**9):  # one row, a few rows, one band
        fast = resample_torch(hr, kern, dx, dy, 2, chunk_bytes=chunk)
        torch.testing.assert_close(fast, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [2, 4])
def test_centre_tap_samples_block_centre(scale, gen):
    """One-hot centre kernel, zero offsets: the bilinear sample at each block centre."""
    k = 3 * scale + 1
    h, w = 5, 6
    hr = torch.rand(1, 3, h * scale, w * scale, generator=gen, dtype=torch.float64)
    kern = torch.zeros(1, k * k, h, w, dtype=torch.float64)
    kern[:, (k // 2) * k + k // 2] = 1
    zeros = torch.zeros_like(kern)
    got = resample(hr, kern, zeros, zeros, scale)
    # The centre of an s x s block is the mean of its four middle pixels (s even).
    m = scale // 2
    blocks = hr.unfold(2, scale, scale).unfold(3, scale, scale)
    expected = blocks[..., m - 1 : m + 1, m - 1 : m + 1].mean(dim=(-1, -2))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _off_the_kinks(offsets: torch.Tensor, scale: int) -> torch.Tensor:
    """Offsets whose samples lie at least 1e-3 pixel from a pixel line.

    Bilinear sampling is not differentiable on the lines (nor is the border clamp),
    and the finite differences of a sample within eps of one disagree with autograd:
    seed 189 put one there at 2x (1 in about 400 draws, whichever op). Every sample
    coordinate is a whole or half number plus ``scale * offset``.
    """
    frac = torch.remainder(2 * scale * offsets, 1.0)  # of the doubled coordinate
    near = torch.minimum(frac, 1 - frac) < 2e-3
    return torch.where(near, offsets + 2e-3 / scale, offsets)


@pytest.mark.slow
@pytest.mark.parametrize("scale", [2, 4])
def test_gradcheck(scale, gen):
    k = 3 * scale + 1
    h, w = (2, 3) if scale == 2 else (1, 2)  # k*k taps per LR pixel: keep the Jacobian small
    hr, kern, dx, dy = _random_inputs(gen, 1, 2, h, w, scale, k, offset_scale=0.7)
    dx, dy = _off_the_kinks(dx, scale), _off_the_kinks(dy, scale)
    inputs = [t.clone().requires_grad_() for t in (hr, kern, dx, dy)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: resample(a, b, c, d, scale), inputs, eps=1e-6, atol=1e-5
    )


def test_rejects_mismatched_shapes():
    hr = torch.rand(1, 3, 8, 8)
    kern = torch.rand(1, 49, 4, 4)
    with pytest.raises(ValueError, match="same shape"):
        resample(hr, kern, kern, kern[:, :, :3], 2)
    with pytest.raises(ValueError, match="must be 8x8"):
        resample(torch.rand(1, 3, 9, 8), kern, kern, kern, 2)
    with pytest.raises(ValueError, match="k odd"):
        resample(hr, kern[:, :48], kern[:, :48], kern[:, :48], 2)


@pytest.mark.parametrize("size", [(2, 9), (3, 3), (2, 2), (5, 2)])
def test_images_smaller_than_the_padding(size, gen):
    """Padding wider than the image continues the mirror periodically, as the loop does."""
    h, w = size
    hr = torch.rand(1, 3, h * 2, w * 2, generator=gen, dtype=torch.float64)
    kern = torch.rand(1, 81, h, w, generator=gen, dtype=torch.float64)  # k = 9: pad 4 > side
    dx = torch.rand(1, 81, h, w, generator=gen, dtype=torch.float64) * 2 - 1
    dy = torch.rand(1, 81, h, w, generator=gen, dtype=torch.float64) * 2 - 1
    torch.testing.assert_close(
        resample(hr, kern, dx, dy, 2), slow_resample(hr, kern, dx, dy, 2), rtol=1e-10, atol=1e-10
    )


# ---------------------------------------------------------------- without offsets (fixed taps)


@pytest.mark.parametrize("autograd", [False, True], ids=["inference", "autograd"])
@pytest.mark.parametrize("scale,h,w", [(2, 5, 4), (2, 1, 3), (4, 3, 4), (4, 2, 1), (3, 2, 3)])
def test_no_offsets_match_the_per_pixel_loop_with_zero_offsets(scale, h, w, autograd, gen):
    """Offsets None: the fixed-tap path, the same numbers as the formula with offsets 0."""
    k = 3 * scale + 1 if scale % 2 == 0 else 3 * scale
    hr, kern, dx, _ = _random_inputs(gen, 2, 3, h, w, scale, k)
    zero = torch.zeros_like(dx)
    expected = slow_resample(hr, kern, zero, zero, scale)
    got = resample(hr, kern.requires_grad_(autograd), None, None, scale)
    assert got.requires_grad == autograd
    torch.testing.assert_close(got.detach(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("scale", [2, 4])
def test_no_offsets_take_any_memory_layout(scale, gen):
    """Channels-last images and kernels (the CPU engine's layout) give the same numbers."""
    k = 3 * scale + 1
    hr, kern, dx, _ = _random_inputs(gen, 2, 3, 7, 5, scale, k)
    expected = resample(hr, kern, None, None, scale)
    for a, b in ((hr, kern), (hr.contiguous(memory_format=torch.channels_last), kern)):
        for kernels in (b, b.contiguous(memory_format=torch.channels_last)):
            got = resample(a, kernels, None, None, scale)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(2, 9), (3, 3), (1, 1)])
def test_no_offsets_on_images_smaller_than_the_padding(size, gen):
    h, w = size
    hr = torch.rand(1, 3, h * 4, w * 4, generator=gen, dtype=torch.float64)
    kern = torch.rand(1, 169, h, w, generator=gen, dtype=torch.float64)  # pad 6 > side
    zero = torch.zeros_like(kern)
    torch.testing.assert_close(
        resample(hr, kern, None, None, 4),
        slow_resample(hr, kern, zero, zero, 4),
        rtol=1e-10,
        atol=1e-10,
    )


@pytest.mark.parametrize("scale", [2, 4])
def test_no_offsets_gradcheck(scale, gen):
    k = 3 * scale + 1
    hr, kern, _, _ = _random_inputs(gen, 1, 2, 2, 2, scale, k)
    inputs = [t.clone().requires_grad_() for t in (hr, kern)]
    assert torch.autograd.gradcheck(
        lambda a, b: resample(a, b, None, None, scale), inputs, eps=1e-6, atol=1e-6
    )


def test_offsets_come_both_or_neither():
    hr, kern = torch.rand(1, 3, 8, 8), torch.rand(1, 49, 4, 4)
    with pytest.raises(ValueError, match="both offsets or neither"):
        resample(hr, kern, kern, None, 2)
    with pytest.raises(ValueError, match="must be 8x8"):
        resample(torch.rand(1, 3, 9, 8), kern, None, None, 2)
