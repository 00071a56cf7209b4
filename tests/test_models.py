"""The networks: paper sizes, any-size inputs, the bicubic start of the resampler."""

from __future__ import annotations

import pytest
import torch

from carcli.models import CARModel, lr_size, pad_to_multiple, preset, quantize
from carcli.resize import bicubic_downscale


@pytest.mark.parametrize("scale,resampler,sr", [(4, 9.90e6, 43.09e6), (2, 10.65e6, 40.73e6)])
def test_paper_parameter_counts(scale, resampler, sr):
    counts = CARModel(preset("paper", scale)).parameter_counts()
    assert counts["resampler"] == pytest.approx(resampler, rel=2e-3)
    assert counts["sr"] == pytest.approx(sr, rel=2e-3)


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("size", [(1, 1), (3, 7), (8, 8), (9, 17), (37, 53)])
def test_any_size(scale, size):
    model = CARModel(preset("tiny", scale)).eval()
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        lr = model.downscale(x)
        y = model(x)
    assert lr.shape[-2:] == lr_size(*size, scale)
    assert y.shape == x.shape


def test_pad_to_multiple_reflects_bottom_right():
    x = torch.rand(1, 3, 5, 11)
    p = pad_to_multiple(x, 8)
    assert p.shape[-2:] == (8, 16)
    torch.testing.assert_close(p[..., :5, :11], x)
    torch.testing.assert_close(p[..., 5, :11], x[..., 3, :])  # reflection without edge repeat


@pytest.mark.parametrize("scale", [2, 4])
def test_bicubic_init_gives_bicubic_like_lr(scale):
    """A fresh resampler started as a cubic kernel is close to classical bicubic."""
    model = CARModel(preset("compact", scale))
    model.resampler.init_as_bicubic()
    y, x = torch.meshgrid(torch.linspace(0, 6, 64), torch.linspace(0, 9, 96), indexing="ij")
    img = torch.stack([torch.sin(x + y), torch.cos(x - 0.5 * y), torch.sin(0.7 * x * y / 6)])
    img = (img[None] * 0.4 + 0.5) + 0.02 * torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ours = quantize(model.downscale(img))
    ref = quantize(bicubic_downscale(img, scale))
    mse = torch.mean((ours - ref)[..., 2:-2, 2:-2] ** 2)
    assert -10 * torch.log10(mse) > 38
