"""The networks: paper sizes, any-size inputs, the bicubic start of the resampler."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from carcli.models import (
    EDSR,
    CARConfig,
    CARModel,
    SRConfig,
    SRNetwork,
    deepened,
    lr_size,
    normalize_kernels,
    pad_to_multiple,
    preset,
    quantize,
    sr_architectures,
)
from carcli.models.layers import DownsampleBlock
from carcli.models.resampler import ClampTowardRange
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
@pytest.mark.parametrize("start", ["init_as_bicubic", "reset_heads"])
def test_bicubic_init_gives_bicubic_like_lr(scale, start):
    """A fresh resampler started as a cubic kernel is close to classical bicubic."""
    model = CARModel(preset("compact", scale))
    if start == "reset_heads":  # saturate the kernel head first, as a collapsed model would be
        model.resampler.kernels_weight[-1].bias.data.fill_(-5.0)
    getattr(model.resampler, start)()
    y, x = torch.meshgrid(torch.linspace(0, 6, 64), torch.linspace(0, 9, 96), indexing="ij")
    img = torch.stack([torch.sin(x + y), torch.cos(x - 0.5 * y), torch.sin(0.7 * x * y / 6)])
    img = (img[None] * 0.4 + 0.5) + 0.02 * torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        ours = quantize(model.downscale(img))
    ref = quantize(bicubic_downscale(img, scale))
    mse = torch.mean((ours - ref)[..., 2:-2, 2:-2] ** 2)
    assert -10 * torch.log10(mse) > 38


def test_kernel_clamp_passes_gradients_that_lead_back_into_range():
    """Forward as clamp + normalise; backward keeps saturated taps trainable."""
    gen = torch.Generator().manual_seed(7)
    raw = (torch.randn(2, 9, 3, 4, generator=gen) * 0.8).requires_grad_()
    kernels = normalize_kernels(raw)
    clamped = raw.detach().clamp(1e-6, 1.0)
    torch.testing.assert_close(kernels, clamped / clamped.sum(dim=1, keepdim=True))

    # The clamp alone: +1 everywhere asks every tap to go down, -1 to go up.
    below, above = raw.detach() < 1e-6, raw.detach() > 1.0
    assert below.any() and above.any()
    (down,) = torch.autograd.grad(ClampTowardRange.apply(raw, 1e-6, 1.0).sum(), raw)
    (up,) = torch.autograd.grad(-ClampTowardRange.apply(raw, 1e-6, 1.0).sum(), raw)
    assert torch.equal(down, (~below).float())  # taps below the range may not go lower
    assert torch.equal(up, -(~above).float())  # taps above may not go higher

    # Through the normalisation: asking a tap below the range for more weight reaches it.
    n, t, i, j = below.nonzero()[0].tolist()
    (grad,) = torch.autograd.grad(-normalize_kernels(raw)[n, t, i, j], raw)
    assert grad[n, t, i, j] < 0


@pytest.mark.parametrize("head", ["separate", "shared"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resampler_inference_path_equals_the_autograd_path(head: str, precision: str) -> None:
    """Without autograd the kernels are normalised (and shared-head offsets squashed) in
    place in float32; with it, out of place. Same kernels; offsets within bf16's rounding."""
    from dataclasses import replace

    from carcli.models import CARModel, preset
    from carcli.models.precision import autocast

    seed = 11
    print(f"seed {seed}")
    torch.manual_seed(seed)
    tiny = preset("tiny", 4)
    model = CARModel(replace(tiny, resampler=replace(tiny.resampler, head=head))).eval()
    for p in model.resampler.parameters():  # away from the bicubic start: real offsets
        p.data.add_(torch.randn_like(p) * 0.05)
    hr = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(seed))
    with autocast(hr.device, precision):
        trained = model.resampler(hr.requires_grad_())
        with torch.no_grad():
            inferred = model.resampler(hr)
    assert trained[0].requires_grad and not inferred[0].requires_grad
    tol = 0 if precision == "fp32" else 4e-3  # bf16 tanh's output rounding
    for a, b in zip(trained, inferred, strict=True):
        assert a.dtype == torch.float32 or precision == "bf16"
        torch.testing.assert_close(b.float(), a.detach().float(), rtol=0, atol=max(tol, 1e-6))
    torch.testing.assert_close(inferred[0].sum(dim=1), torch.ones(1, 12, 10), rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_downsample_block_equals_unshuffle_then_1x1_conv(channels_last: bool) -> None:
    """The strided-conv fast path is the authors' PixelUnshuffle + 1x1 conv, gradients too."""
    block = DownsampleBlock(5, 7).double()
    x = torch.randn(2, 5, 10, 14, dtype=torch.float64, requires_grad=True)
    if channels_last:
        block = block.to(memory_format=torch.channels_last)
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    reference = block.downsample(x)  # the container as the authors wrote it
    torch.testing.assert_close(block(x), reference, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(block(x).square().sum(), [x, *block.parameters()])
    ref_grads = torch.autograd.grad(reference.square().sum(), [x, *block.parameters()])
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [2, 4])
def test_deepened_edsr_computes_the_same_then_learns_with_its_new_blocks(scale):
    model = CARModel(preset("tiny", scale))
    for p in model.parameters():  # a "trained" pair: no zero weights anywhere
        p.data.add_(0.05 * torch.randn_like(p))
    grown = deepened(model, 5, name="tiny-deep")
    assert grown.config.sr.blocks == 5 and grown.config.name == "tiny-deep"
    assert model.config.sr.blocks == 2  # the original is left alone
    old_sr, new_sr = model.parameter_counts()["sr"], grown.parameter_counts()["sr"]
    assert new_sr - old_sr == 3 * 2 * (16 * 16 * 9 + 16)  # three blocks of two 3x3 convs
    x = torch.rand(2, 3, 19, 26)
    with torch.no_grad():
        torch.testing.assert_close(grown(x), model(x), rtol=0, atol=0)
        lr = quantize(model.downscale(x))
        torch.testing.assert_close(grown.upscale(lr), model.upscale(lr), rtol=0, atol=0)

    grown.upscale(lr).square().mean().backward()
    second_conv = grown.sr.body[3].body[2].weight  # zero-initialised: receives gradient
    assert second_conv.grad is not None and second_conv.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot deepen"):
        deepened(model, 1)


@pytest.mark.parametrize("scale", [2, 4])
def test_deepened_rep_computes_the_same_then_learns_with_its_new_layers(scale):
    """rep grows by layers whose conv branches are zero and whose PReLU has slope 1."""
    rep = SRConfig(arch="rep", features=16, blocks=2, res_scale=1.0)
    model = CARModel(replace(preset("tiny", scale), sr=rep))
    for p in model.parameters():  # a "trained" pair: no zero weights anywhere
        p.data.add_(0.05 * torch.randn_like(p))
    for train_mode in (False, True):  # fused (inference) and branch (training) forms
        model.train(train_mode)
        grown = deepened(model, 5, name="rep-deep")
        assert grown.config.sr.blocks == 5 and grown.config.sr.arch == "rep"
        assert grown.training == train_mode
        x = torch.rand(2, 3, 19, 26)
        with torch.no_grad():
            lr = quantize(model.eval().downscale(x))
            model.train(train_mode)
            torch.testing.assert_close(grown.upscale(lr), model.upscale(lr), rtol=0, atol=1e-6)
    assert model.config.sr.blocks == 2  # the original is left alone
    grown.train().upscale(lr).square().mean().backward()
    new_conv = grown.sr.body[8].conv3.weight  # the last added layer: zero, receives gradient
    assert new_conv.grad is not None and new_conv.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cannot deepen"):
        deepened(model, 1)


# --------------------------------------------------------------------------- SR registry


class _ShuffleSR(SRNetwork):
    """A minimal SR network: two 3x3 convs and a pixel shuffle (receptive field 2 LR px)."""

    def __init__(self, config: CARConfig) -> None:
        super().__init__()
        self.scale = config.scale
        s = config.scale
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 3 * s * s, 3, padding=1),
            torch.nn.PixelShuffle(s),
        )

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        return self.body(lr)

    def margin(self) -> int:
        return 2


def test_configs_without_an_architecture_are_edsr() -> None:
    """Checkpoints written before SRConfig.arch existed load as EDSR; unknown names are refused."""
    data = CARConfig(scale=4, sr=SRConfig(features=16, blocks=2)).to_dict()
    assert data["sr"]["arch"] == "edsr"
    del data["sr"]["arch"]
    config = CARConfig.from_dict(data)
    assert config.sr.arch == "edsr" and isinstance(CARModel(config).sr, EDSR)
    assert "edsr" in sr_architectures()
    data["sr"]["arch"] = "no-such-net"
    with pytest.raises(ValueError, match="unknown SR architecture 'no-such-net'"):
        CARConfig.from_dict(data)


@pytest.mark.parametrize("scale", [2, 4])
def test_a_registered_architecture_runs_tiled_and_refined(scale, monkeypatch) -> None:
    """The tiler and refinement need only the SRNetwork methods, not EDSR's layers."""
    from carcli.engine import Processor
    from carcli.models import sr as sr_module
    from carcli.tiler import TiledModel

    monkeypatch.setitem(sr_module._BUILDERS, "shuffle-test", _ShuffleSR)
    torch.manual_seed(scale)
    config = replace(preset("tiny", scale), sr=SRConfig(arch="shuffle-test"))
    model = CARModel(config).eval()
    assert isinstance(model.sr, _ShuffleSR) and model.sr.stage_margins() == (0, 2)
    lr = quantize(torch.rand(1, 3, 23, 31, generator=torch.Generator().manual_seed(9)))
    with torch.inference_mode():
        whole = model.upscale(lr).clamp(0, 1)
        tiled = TiledModel(model).upscale(lr, tile=8 * scale)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    hr = torch.rand(3, 40, 36, generator=torch.Generator().manual_seed(10))
    plain = Processor(model).downscale(hr)
    refined = Processor(model, refine=2, memory_budget=1 << 20).downscale(hr)
    assert refined.shape == plain.shape
    assert (refined - plain).abs().max() <= 4 / 255 + 1e-6  # within --refine-range levels
