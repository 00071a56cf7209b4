"""Y-PSNR / Y-SSIM against scikit-image and against cases computable by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from carcli import metrics
from carcli.metrics import psnr_y, psnr_y_batch, rgb_to_y, ssim_y, ssim_y_batch

SAMPLES = Path(__file__).resolve().parents[1] / "carcli" / "samples"


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _noisy(x: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    """x plus Gaussian noise, clipped and quantised to 8 bits like a stored image."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return ((x + sigma * noise).clamp(0, 1) * 255).round() / 255


def _sample(name: str) -> torch.Tensor:
    img = np.asarray(Image.open(SAMPLES / name).convert("RGB"), dtype=np.float64)
    return torch.from_numpy(img / 255).permute(2, 0, 1).contiguous()


def _skimage_ssim(y1: np.ndarray, y2: np.ndarray) -> float:
    # skimage filters the whole image (reflect padding) and then averages the
    # SSIM map after cropping (win_size - 1) // 2 = 5 pixels from each border.
    # With sigma 1.5 its Gaussian is truncated at 3.5 sigma -> radius 5, an
    # 11-tap kernel normalised to sum 1: exactly our window. The map values
    # that survive its crop are the ones whose 11x11 window lies inside the
    # image, i.e. our valid region, so the two definitions coincide (up to
    # float rounding), not merely approximately.
    return structural_similarity(
        y1,
        y2,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
    )


def _y_np(x: torch.Tensor) -> np.ndarray:
    return rgb_to_y(x)[0].numpy()


# --- rgb_to_y -----------------------------------------------------------------


def test_rgb_to_y_known_values() -> None:
    colours = torch.tensor(
        [[0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64
    )
    y = rgb_to_y(colours.T.reshape(3, 1, 5))[0, 0]
    expected = [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966]
    assert y.tolist() == pytest.approx(expected, abs=1e-12)


def test_rgb_to_y_8bit_form_and_shapes() -> None:
    # The 8-bit form of the formula, 16 + (65.481 R + 128.553 G + 24.966 B) / 255.
    rgb8 = torch.randint(0, 256, (2, 4, 3, 5, 6), generator=torch.Generator().manual_seed(3))
    r, g, b = rgb8.double().unbind(-3)
    expected = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    y = rgb_to_y(rgb8.double() / 255)
    assert y.shape == (2, 4, 1, 5, 6)
    torch.testing.assert_close(y[..., 0, :, :], expected, rtol=0, atol=1e-10)


def test_rgb_to_y_grey_is_r_equals_g_equals_b() -> None:
    grey = _rand(2, 1, 7, 9)
    torch.testing.assert_close(rgb_to_y(grey), rgb_to_y(grey.expand(2, 3, 7, 9)))
    with pytest.raises(ValueError, match="channels"):
        rgb_to_y(_rand(2, 7, 9))  # 2 channels


# --- against scikit-image -------------------------------------------------------


@pytest.mark.parametrize(("h", "w", "sigma", "seed"), [(32, 32, 0.1, 0), (41, 57, 0.03, 1)])
def test_random_images_match_skimage(h: int, w: int, sigma: float, seed: int) -> None:
    target = _rand(3, h, w, seed=seed)
    pred = _noisy(target, sigma, seed=seed + 10)
    y_pred, y_target = _y_np(pred), _y_np(target)
    assert abs(ssim_y(pred, target) - _skimage_ssim(y_target, y_pred)) < 1e-3
    assert abs(psnr_y(pred, target) - peak_signal_noise_ratio(y_target, y_pred, data_range=255)) < (
        0.01
    )
    # The agreement is in fact exact up to float64 rounding (see _skimage_ssim).
    assert ssim_y(pred, target) == pytest.approx(_skimage_ssim(y_target, y_pred), abs=1e-10)


@pytest.mark.parametrize(
    ("name", "sigma", "shave"), [("chelsea.png", 0.02, 4), ("rocket.png", 0.05, 2)]
)
def test_real_image_plus_noise_matches_skimage(name: str, sigma: float, shave: int) -> None:
    target = _sample(name)
    pred = _noisy(target, sigma)
    s = slice(shave, -shave)
    y_pred, y_target = _y_np(pred)[s, s], _y_np(target)[s, s]
    ours_ssim = ssim_y(pred, target, shave=shave)
    ours_psnr = psnr_y(pred, target, shave=shave)
    assert abs(ours_ssim - _skimage_ssim(y_target, y_pred)) < 1e-3
    assert abs(ours_psnr - peak_signal_noise_ratio(y_target, y_pred, data_range=255)) < 0.01
    assert 0.3 < ours_ssim < 0.99 and 20 < ours_psnr < 45  # a realistic, non-trivial case


# --- hand-computable cases ------------------------------------------------------


@pytest.mark.parametrize("delta_8bit", [1, 5, 20])
def test_constant_images_psnr_and_ssim_by_hand(delta_8bit: int) -> None:
    # Grey levels a and a + delta (8-bit) on all channels: Y differs by 219 * delta / 255.
    a = 100 / 255
    b = (100 + delta_8bit) / 255
    pred = torch.full((3, 24, 30), b, dtype=torch.float64)
    target = torch.full((3, 24, 30), a, dtype=torch.float64)
    d = 219 * delta_8bit / 255
    assert psnr_y(pred, target) == pytest.approx(20 * math.log10(255 / d), abs=1e-9)
    # Zero variances: only the luminance term is left, (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    m1, m2, c1 = 16 + 219 * b, 16 + 219 * a, (0.01 * 255) ** 2
    expected = (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1)
    assert ssim_y(pred, target) == pytest.approx(expected, abs=1e-12)


def test_identical_images() -> None:
    x = _sample("coffee.png")[:, :64, :80]
    assert psnr_y(x, x) == float("inf")
    assert ssim_y(x, x) == pytest.approx(1.0, abs=1e-12)
    assert torch.isinf(psnr_y_batch(x[None], x[None], 0)).all()


def test_ssim_uses_only_full_windows() -> None:
    # An 11x11 image has exactly one valid window: SSIM is that single window's
    # Gaussian-weighted statistic, which we recompute directly here.
    target = _rand(3, 11, 11, seed=5)
    pred = _noisy(target, 0.1)
    y1, y2 = rgb_to_y(pred)[0], rgb_to_y(target)[0]
    t = torch.arange(-5, 6, dtype=torch.float64)
    g = torch.exp(-(t**2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    m1, m2 = (w * y1).sum(), (w * y2).sum()
    v1, v2 = (w * (y1 - m1) ** 2).sum(), (w * (y2 - m2) ** 2).sum()
    cov = (w * (y1 - m1) * (y2 - m2)).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    expected = ((2 * m1 * m2 + c1) * (2 * cov + c2)) / ((m1**2 + m2**2 + c1) * (v1 + v2 + c2))
    assert ssim_y(pred, target) == pytest.approx(float(expected), abs=1e-12)
    with pytest.raises(ValueError, match="11x11"):
        ssim_y(pred[:, :10], target[:, :10])


# --- shave, shapes, batches -------------------------------------------------------


def test_shave_crops_borders() -> None:
    target = _rand(3, 40, 36, seed=7)
    pred = _noisy(target, 0.05)
    for shave in (1, 4):
        inner = (slice(None), slice(shave, -shave), slice(shave, -shave))
        assert psnr_y(pred, target, shave) == pytest.approx(psnr_y(pred[inner], target[inner]))
        assert ssim_y(pred, target, shave) == pytest.approx(ssim_y(pred[inner], target[inner]))
    # Errors confined to a 3-pixel border vanish once 3 pixels are shaved.
    damaged = target.clone()
    damaged[:, :3] = 0
    damaged[:, :, -3:] = 1
    assert math.isfinite(psnr_y(damaged, target, shave=2))
    assert psnr_y(damaged, target, shave=3) == float("inf")
    assert ssim_y(damaged, target, shave=3) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="shave"):
        psnr_y(pred, target, shave=20)


def test_batch_matches_single_and_4d_single() -> None:
    target = _rand(4, 3, 30, 26, seed=11)
    pred = _noisy(target, 0.04)
    psnrs = psnr_y_batch(pred, target, 2)
    ssims = ssim_y_batch(pred, target, 2)
    assert psnrs.shape == ssims.shape == (4,)
    for i in range(4):
        assert psnrs[i].item() == pytest.approx(psnr_y(pred[i], target[i], 2), abs=1e-12)
        assert ssims[i].item() == pytest.approx(ssim_y(pred[i], target[i], 2), abs=1e-12)
        assert psnr_y(pred[i : i + 1], target[i : i + 1], 2) == psnr_y(pred[i], target[i], 2)
    with pytest.raises(ValueError, match="one image"):
        psnr_y(pred, target)
    with pytest.raises(ValueError, match="differ"):
        ssim_y_batch(pred, target[:, :, :-1])


def test_greyscale_inputs_count_as_rgb() -> None:
    target = _rand(1, 25, 31, seed=13)
    pred = _noisy(target, 0.05)
    assert psnr_y(pred, target) == pytest.approx(psnr_y(pred.expand(3, -1, -1), target))
    assert ssim_y(pred, target) == pytest.approx(ssim_y(pred.expand(3, -1, -1), target))
    # Mixed: a grey prediction of an RGB target.
    rgb_target = target.expand(3, -1, -1)
    assert ssim_y(pred, rgb_target) == pytest.approx(ssim_y(pred.expand(3, -1, -1), rgb_target))


def test_float32_path_close_to_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    # Accelerators compute in float32; exercise that path on the CPU.
    target = _sample("chelsea.png")
    pred = _noisy(target, 0.01)
    ref_psnr, ref_ssim = psnr_y(pred, target, 4), ssim_y(pred, target, 4)
    monkeypatch.setattr(metrics, "_compute_dtype", lambda device: torch.float32)
    assert psnr_y(pred, target, 4) == pytest.approx(ref_psnr, abs=1e-3)
    assert ssim_y(pred, target, 4) == pytest.approx(ref_ssim, abs=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    target = _rand(2, 3, 64, 48, seed=17)
    pred = _noisy(target, 0.03)
    cpu_p, cpu_s = psnr_y_batch(pred, target, 4), ssim_y_batch(pred, target, 4)
    gpu_p = psnr_y_batch(pred.float().cuda(), target.float().cuda(), 4)
    gpu_s = ssim_y_batch(pred.float().cuda(), target.float().cuda(), 4)
    assert gpu_p.device.type == "cuda"
    torch.testing.assert_close(gpu_p.cpu().double(), cpu_p, rtol=0, atol=1e-3)
    torch.testing.assert_close(gpu_s.cpu().double(), cpu_s, rtol=0, atol=1e-5)
