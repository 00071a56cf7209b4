"""MATLAB-compatible bicubic resize against a slow loop, Pillow, known facts and Set5."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import carcli.resize as resize_mod
from carcli.metrics import psnr_y, ssim_y
from carcli.resize import bicubic_downscale, bicubic_upscale, imresize, resize_weights

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- a slow, independent transcription of MATLAB's imresize (bicubic) -------------


def _keys(t: float) -> float:
    t = abs(t)
    if t <= 1:
        return 1.5 * t**3 - 2.5 * t**2 + 1
    if t <= 2:
        return -0.5 * t**3 + 2.5 * t**2 - 4 * t + 2
    return 0.0


def _symmetric(i: int, n: int) -> int:
    """0-based index reflected with the edge pixel repeated (MATLAB 'symmetric')."""
    while i < 0 or i >= n:
        i = -i - 1 if i < 0 else 2 * n - 1 - i
    return i


def slow_resize_axis(
    x: np.ndarray, axis: int, out_len: int, scale: float, antialias: bool = True
) -> np.ndarray:
    """MATLAB's contributions() + resizeAlongDim(), one output sample at a time."""
    x = np.moveaxis(x, axis, -1)
    in_len = x.shape[-1]
    if scale < 1 and antialias:
        width = 4.0 / scale

        def kernel(t: float) -> float:
            return scale * _keys(scale * t)
    else:
        width, kernel = 4.0, _keys
    out = np.zeros(x.shape[:-1] + (out_len,))
    for j in range(1, out_len + 1):  # 1-based, as in MATLAB
        u = j / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - width / 2)
        taps = [left + k for k in range(math.ceil(width) + 2)]
        weights = [kernel(u - t) for t in taps]
        total = sum(weights)
        for t, w in zip(taps, weights, strict=True):
            out[..., j - 1] += (w / total) * x[..., _symmetric(t - 1, in_len)]
    return np.moveaxis(out, -1, axis)


def slow_imresize(
    x: np.ndarray, out_hw: tuple[int, int], scale_hw: tuple[float, float]
) -> np.ndarray:
    y = slow_resize_axis(x, -2, out_hw[0], scale_hw[0])
    return slow_resize_axis(y, -1, out_hw[1], scale_hw[1])


# --- against the slow loop --------------------------------------------------------


@pytest.mark.parametrize(
    ("h", "w", "scale"),
    [(32, 40, 2), (29, 35, 2), (33, 47, 4), (30, 27, 3), (31, 25, 3), (17, 22, 4)],
)
def test_downscale_matches_slow_loop(h: int, w: int, scale: int) -> None:
    x = _rand(2, 3, h, w, seed=h * w)
    out = bicubic_downscale(x, scale)
    assert out.shape[-2:] == (math.ceil(h / scale), math.ceil(w / scale))
    ref = slow_imresize(x.numpy(), out.shape[-2:], (1 / scale, 1 / scale))
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("h", "w", "scale"), [(8, 10, 2), (7, 9, 2), (9, 6, 4), (5, 11, 4)])
def test_upscale_matches_slow_loop(h: int, w: int, scale: int) -> None:
    x = _rand(3, h, w, seed=h + w)
    out = bicubic_upscale(x, scale)
    assert out.shape == (3, h * scale, w * scale)
    ref = slow_imresize(x.numpy(), (h * scale, w * scale), (scale, scale))
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("hw", "scale", "size"),
    [((23, 31), 0.7, None), ((12, 9), 1.5, None), ((25, 19), None, (10, 27)), ((9, 9), 1, None),
     # outputs over BLOCK (64) pixels a side: several bands of the banded product per axis
     ((300, 270), 0.25, None), ((40, 37), 4.0, None), ((401, 233), 0.37, None),
     ((150, 66), None, (203, 131)), ((130, 129), 0.5, None)],
)  # fmt: skip
def test_imresize_fractional_and_sized_match_slow_loop(
    hw: tuple[int, int], scale: float | None, size: tuple[int, int] | None
) -> None:
    assert resize_mod.BLOCK == 64  # the cases above cross it
    x = _rand(2, *hw, seed=3)
    out = imresize(x, scale=scale, size=size)
    if size is None:
        assert scale is not None
        size = (math.ceil(hw[0] * scale), math.ceil(hw[1] * scale))
        scales = (scale, scale)
    else:
        scales = (size[0] / hw[0], size[1] / hw[1])
    assert out.shape[-2:] == size
    np.testing.assert_allclose(out.numpy(), slow_imresize(x.numpy(), size, scales), atol=1e-12)


def test_gradient_is_the_transposed_matrices() -> None:
    """Autograd through the bands: d<G, Wh X Ww^T>/dX = Wh^T G Ww, with the dense matrices."""
    x = _rand(2, 150, 90, seed=5).requires_grad_()
    out = imresize(x, scale=0.5)
    g = _rand(*out.shape, seed=6)
    (out * g).sum().backward()
    w_h, w_w = resize_weights(150, 75), resize_weights(90, 45)
    torch.testing.assert_close(x.grad, w_h.T @ g @ w_w, rtol=0, atol=1e-12)


def test_no_antialias_keeps_the_narrow_kernel() -> None:
    x = _rand(1, 20, 18, seed=9)
    out = imresize(x, scale=0.5, antialias=False)
    ref = slow_resize_axis(x.numpy(), -2, 10, 0.5, antialias=False)
    ref = slow_resize_axis(ref, -1, 9, 0.5, antialias=False)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)
    assert not torch.allclose(out, imresize(x, scale=0.5))


# --- against Pillow and known facts ---------------------------------------------


@pytest.mark.parametrize("out_hw", [(19, 23), (13, 15), (25, 31), (74, 90), (148, 180)])
def test_interior_matches_pillow_bicubic(out_hw: tuple[int, int]) -> None:
    # Pillow's BICUBIC uses the same kernel (a = -0.5), the same pixel-centre
    # mapping and the same antialiasing, but renormalises the truncated kernel
    # at the borders instead of mirroring: away from the borders the two agree.
    x = np.random.default_rng(0).random((37, 45)).astype(np.float32)
    pil = Image.fromarray(x, mode="F").resize(out_hw[::-1], Image.Resampling.BICUBIC)
    ours = imresize(torch.from_numpy(x).double(), size=out_hw).numpy()
    margin = 6
    inner = (slice(margin, -margin), slice(margin, -margin))
    np.testing.assert_allclose(ours[inner], np.asarray(pil)[inner], atol=1e-6)


@pytest.mark.parametrize(("hw", "op"), [((31, 26), "down3"), ((17, 20), "down4"), ((9, 7), "up4")])
def test_constant_image_stays_constant(hw: tuple[int, int], op: str) -> None:
    x = torch.full((3, *hw), 0.37, dtype=torch.float64)
    out = bicubic_upscale(x, 4) if op == "up4" else bicubic_downscale(x, int(op[-1]))
    torch.testing.assert_close(out, torch.full_like(out, 0.37), rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [2, 4])
def test_up_then_down_is_near_identity_on_smooth_content(scale: int) -> None:
    h, w = 48, 56
    yy, xx = torch.meshgrid(
        torch.linspace(0, 1, h, dtype=torch.float64),
        torch.linspace(0, 1, w, dtype=torch.float64),
        indexing="ij",
    )
    img = 0.5 + 0.3 * torch.sin(2 * math.pi * 1.3 * yy) * torch.cos(2 * math.pi * 0.9 * xx)
    back = bicubic_downscale(bicubic_upscale(img, scale), scale)
    assert back.shape == img.shape
    assert (back - img).abs().max() < 5e-3  # the mirrored borders cost a little
    assert (back - img)[4:-4, 4:-4].abs().max() < 1e-4


def test_weights_rows_sum_to_one_and_are_cached() -> None:
    for in_len, out_len in [(31, 8), (8, 32), (10, 10), (7, 3)]:
        w = resize_weights(in_len, out_len)
        assert w.shape == (out_len, in_len)
        torch.testing.assert_close(w.sum(1), torch.ones(out_len, dtype=torch.float64))
    assert resize_weights(31, 8, 0.25) is resize_weights(31, 8, 0.25)
    assert resize_weights(31, 8, 0.25, dtype=torch.float32).dtype == torch.float32


def test_sizes_dtype_batch_dims_and_crop() -> None:
    x = _rand(2, 4, 3, 13, 10).float()
    assert imresize(x, scale=0.25).shape == (2, 4, 3, 4, 3)  # ceil(13/4), ceil(10/4)
    assert imresize(x, scale=0.25).dtype == torch.float32
    assert bicubic_downscale(x, 3).shape[-2:] == (5, 4)
    up = bicubic_upscale(x, 2, size=(25, 19))
    assert up.shape[-2:] == (25, 19)
    torch.testing.assert_close(up, bicubic_upscale(x, 2)[..., :25, :19])
    # Resizing is per channel and per batch item.
    torch.testing.assert_close(imresize(x, scale=0.5)[1, 2], imresize(x[1, 2], scale=0.5))
    with pytest.raises(TypeError):
        imresize(torch.zeros(4, 4, dtype=torch.uint8), scale=0.5)
    with pytest.raises(ValueError):
        imresize(x)
    with pytest.raises(ValueError):
        bicubic_upscale(x, 2, size=(27, 19))


def test_differentiable() -> None:
    x = _rand(1, 2, 7, 6, seed=21).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: bicubic_downscale(t, 2), (x,))
    assert torch.autograd.gradcheck(lambda t: bicubic_upscale(t, 2, size=(13, 11)), (x,))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    x = _rand(2, 3, 45, 37, seed=23)
    for f in (lambda t: bicubic_downscale(t, 4), lambda t: bicubic_upscale(t, 2)):
        torch.testing.assert_close(f(x.float().cuda()).cpu(), f(x).float(), atol=1e-5, rtol=0)
    # The 8-bit path sums in float64 on every device: equal, not just close.
    x8 = torch.round(x.float() * 255) / 255
    for f in (
        lambda t: bicubic_downscale(t, 4, uint8=True),
        lambda t: bicubic_upscale(t, 2, uint8=True),
    ):
        assert torch.equal(f(x8.cuda()).cpu(), f(x8))


# --- the published bicubic baselines ---------------------------------------------


def _bicubic_scores(folder: Path, scale: int, with_ssim: bool) -> tuple[float, float]:
    """Mean Y-PSNR and Y-SSIM (shave = scale) of down, 8-bit, up, crop: no modcrop.

    The LR image is clipped before quantising (bicubic overshoots), as storing
    it as 8-bit PNG would; the reconstruction is measured unrounded. SSIM is
    ``nan`` unless asked for.
    """
    files = sorted(folder.glob("*.png"))
    assert files, f"no PNG files in {folder}"
    psnrs, ssims = [], []
    for path in files:
        rgb = np.array(Image.open(path).convert("RGB"))
        hr = torch.from_numpy(rgb).permute(2, 0, 1).double() / 255
        lr = (bicubic_downscale(hr, scale).clamp(0, 1) * 255).round() / 255
        sr = bicubic_upscale(lr, scale, size=hr.shape[-2:])
        psnrs.append(psnr_y(sr, hr, shave=scale))
        ssims.append(ssim_y(sr, hr, shave=scale) if with_ssim else math.nan)
    return float(np.mean(psnrs)), float(np.mean(ssims))


def needs_datasets(test: Callable) -> Callable:
    """Marked ``datasets``, and skipped with the reason when ../shared/datasets is absent."""
    skip = pytest.mark.skipif(
        not (DATASETS / "val").is_dir(), reason=f"benchmark data sets not found at {DATASETS}"
    )
    return pytest.mark.datasets(skip(test))


@needs_datasets
@pytest.mark.parametrize(
    ("scale", "paper_psnr", "paper_ssim"), [(4, 28.42, 0.8104), (2, 33.66, 0.9299)]
)
def test_set5_bicubic_baseline_matches_paper(
    scale: int, paper_psnr: float, paper_ssim: float
) -> None:
    psnr, ssim = _bicubic_scores(DATASETS / "val" / "Set5", scale, with_ssim=True)
    print(f"Set5 x{scale} bicubic & bicubic: {psnr:.3f} dB / {ssim:.4f} (paper {paper_psnr})")
    assert abs(psnr - paper_psnr) < 0.1
    assert abs(ssim - paper_ssim) < 0.003


@needs_datasets
def test_set14_bicubic_baseline_close_to_paper() -> None:
    # Informational: Set14 copies differ between sources (sizes, the greyscale
    # bridge), so only a loose bound; measured 26.09 dB against the paper's 26.00.
    psnr, _ = _bicubic_scores(DATASETS / "val" / "Set14", 4, with_ssim=False)
    print(f"Set14 x4 bicubic & bicubic: {psnr:.3f} dB Y-PSNR (paper 26.00)")
    assert abs(psnr - 26.00) < 0.3


# --- 8-bit images: MATLAB's uint8 path, one axis at a time --------------------------


def _uint8_levels(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, generator=generator).float() / 255


def _matlab_round(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x + 0.5), 0, 255)


@pytest.mark.parametrize(
    ("hw", "size"), [((29, 35), (15, 18)), ((30, 20), (10, 15)), ((14, 9), (33, 20))]
)
def test_uint8_resizes_one_axis_at_a_time_with_rounding(
    hw: tuple[int, int], size: tuple[int, int]
) -> None:
    """Against the slow loop, rounding to 8 bits after each axis, the axis with the
    smaller scale first (MATLAB's order): (30, 20) -> (10, 15) shrinks rows 3x and
    columns 1.33x, so rows go first; (14, 9) -> (33, 20) enlarges columns less."""
    seed = hw[0] * hw[1]
    print(f"seed {seed}")
    x = _uint8_levels((3, *hw), seed=seed)
    levels = x.double().numpy() * 255
    scales = (size[0] / hw[0], size[1] / hw[1])
    if scales[0] <= scales[1]:
        first = _matlab_round(slow_resize_axis(levels, -2, size[0], scales[0]))
        ref = _matlab_round(slow_resize_axis(first, -1, size[1], scales[1]))
    else:
        first = _matlab_round(slow_resize_axis(levels, -1, size[1], scales[1]))
        ref = _matlab_round(slow_resize_axis(first, -2, size[0], scales[0]))
    out = imresize(x, size=size, uint8=True)
    assert out.dtype == torch.float32 and out.shape == (3, *size)
    np.testing.assert_array_equal(np.round(out.double().numpy() * 255), ref)
    assert torch.equal(out, torch.round(out * 255) / 255)  # on the 8-bit grid, exactly
    # The single float pass rounds once and differs on some pixels: the test has teeth.
    single = torch.round(imresize(x.double(), size=size).clamp(0, 1) * 255).numpy()
    assert (single != ref).any()


def test_uint8_is_only_for_8_bit_images() -> None:
    x = _uint8_levels((1, 12, 10), seed=5)
    lr = bicubic_downscale(x, 2, uint8=True)
    assert torch.equal(lr, bicubic_downscale(x + 0.4 / 255, 2, uint8=True))  # off-grid: rounded
    up = bicubic_upscale(lr, 2, size=(11, 9), uint8=True)
    assert up.shape == (1, 11, 9) and torch.equal(up, torch.round(up * 255) / 255)


@needs_datasets
@pytest.mark.parametrize("scale", [2, 4])
def test_uint8_downscale_matches_matlab_lr_files_bit_for_bit(scale: int) -> None:
    """The benchmark Set5 LR images (MATLAB imresize, uint8) from the Set5 HR images."""
    folder = DATASETS / "val" / "Set5_LR_matlab" / f"x{scale}"
    if not folder.is_dir():
        pytest.skip(f"MATLAB-made LR images not found at {folder}")
    files = sorted(folder.glob("*.png"))
    assert len(files) == 5
    for path in files:
        rgb = np.array(Image.open(DATASETS / "val" / "Set5" / path.name).convert("RGB"))
        hr = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
        matlab = np.array(Image.open(path).convert("RGB"))
        ours = bicubic_downscale(hr, scale, uint8=True)
        ours = np.round(ours.permute(1, 2, 0).double().numpy() * 255).astype(np.uint8)
        single = bicubic_downscale(hr.double(), scale).clamp(0, 1).permute(1, 2, 0).numpy()
        single = np.round(single * 255).astype(np.uint8)
        differ = float((single != matlab).mean())
        print(
            f"x{scale} {path.name}: uint8 path equal: {np.array_equal(ours, matlab)}, "
            f"single float pass differs on {differ:.1%} of samples"
        )
        assert ours.shape == matlab.shape
        np.testing.assert_array_equal(ours, matlab, err_msg=f"x{scale} {path.name}")
        assert differ > 0.05  # what the float path gets wrong, for the record
