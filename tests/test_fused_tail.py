"""EDSR's tail run as one LR conv (FusedTail) equals its layers, whole and in tiles."""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace

import pytest
import torch

from carcli.models import CARModel, preset, quantize
from carcli.models.config import SRConfig
from carcli.models.edsr import EDSR, FusedTail
from carcli.tiler import TiledModel

SEED = 20261207


def edsr(scale: int, features: int = 8, seed: int = SEED) -> EDSR:
    """A small EDSR with weights far from their init, so every tap of the tail matters."""
    print(f"seed {seed}")
    config = replace(preset("tiny", scale), sr=SRConfig(features=features, blocks=2, res_scale=1.0))
    net = EDSR(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return net.eval()


def assert_float32_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 rounding of sums over many taps: 2e-5 of the largest value."""
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-5 * ref.abs().max().item())


SIZES = [(1, 1), (2, 3), (5, 6), (6, 6), (6, 9), (7, 7), (13, 8), (31, 40)]


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("size", SIZES)
def test_fused_tail_equals_the_layers(scale: int, size: tuple[int, int]) -> None:
    net = edsr(scale)
    feats = torch.randn(2, 8, *size, generator=torch.Generator().manual_seed(SEED + 1))
    with torch.no_grad():
        layers = net.tail(feats)
        fused = net.fused_tail(feats)
    assert fused.shape == layers.shape == (2, 3, size[0] * scale, size[1] * scale)
    assert fused.dtype == torch.float32
    assert_float32_close(fused, layers)


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("size", [(2, 2), (2, 5), (3, 4), (5, 6), (6, 9), (13, 8)])
def test_the_exported_form_equals_the_layers(scale: int, size: tuple[int, int]) -> None:
    """What a graph export runs (bands joined by cat, no branch on the size): the layers'
    image from 2 LR pixels a side, where the strips are the whole input, upwards."""
    net = edsr(scale).double()
    feats = torch.randn(2, 8, *size, generator=torch.Generator().manual_seed(SEED + 2))
    feats = feats.double()
    with torch.no_grad():
        net.fused_tail(torch.zeros(1, 8, 8, 8, dtype=torch.float64))  # the weights, cached
        joined = net.fused_tail._joined(feats)
        layers = net.tail(feats)
    assert joined.shape == layers.shape
    torch.testing.assert_close(joined, layers, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [2, 4])
def test_fused_weights_do_not_depend_on_the_memory_layout(scale: int) -> None:
    """A channels-last copy of a network (as the CPU engine runs it) derives the very same
    fused weights: derived in each one's own layout they were 4e-8 apart, enough to make an
    exported pair and its training EMA differ by 1.6e-6 at random."""
    net = edsr(scale, features=64)
    other = copy.deepcopy(net).to(memory_format=torch.channels_last)
    for mine, theirs in zip(net.fused_tail.fused(), other.fused_tail.fused(), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("scale", [2, 4])
def test_fused_weights_match_the_composed_maps(scale: int) -> None:
    """Float64 weights: the fused conv reproduces the layers to 1e-12 away from the edges,
    and differs within BAND of an edge (so the strips there are needed, not decoration)."""
    net = edsr(scale).double()
    weight, bias = net.fused_tail.fused()
    assert weight.shape == (3 * scale**2, 8, 5, 5)
    feats = torch.randn(1, 8, 12, 14, dtype=torch.float64)
    with torch.no_grad():
        layers = net.tail(feats)
        plain = torch.nn.functional.pixel_shuffle(
            torch.nn.functional.conv2d(feats, weight, bias, padding=FusedTail.REACH), scale
        )
    band = scale * FusedTail.BAND
    inner = (..., slice(band, -band), slice(band, -band))
    torch.testing.assert_close(plain[inner], layers[inner], rtol=0, atol=1e-12)
    assert (plain - layers).abs().max() > 1e-6  # the frame differs without the strips


@pytest.mark.parametrize("scale", [2, 4])
def test_cut_edges_differ_only_in_the_band(scale: int) -> None:
    """A tile's cut sides (edges False) may differ within BAND; the tiler crops more."""
    net = edsr(scale)
    feats = torch.randn(1, 8, 11, 12)
    band = scale * FusedTail.BAND
    assert net.stage_margins()[1] >= FusedTail.BAND
    with torch.no_grad():
        layers = net.tail(feats)
        for edges in itertools.product([False, True], repeat=4):
            out = net.fused_tail(feats, edges)
            top, bottom, left, right = (0 if e else band for e in edges)
            region = (..., slice(top, out.shape[-2] - bottom), slice(left, out.shape[-1] - right))
            assert_float32_close(out[region], layers[region])


def test_a_float64_network_runs_its_fused_tail_in_float64() -> None:
    net = edsr(2).double()
    lr = torch.rand(1, 3, 9, 10, dtype=torch.float64)
    with torch.no_grad():
        out = net(lr)
        layers = net.train()(lr)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, layers, rtol=0, atol=1e-12)


def test_fused_weights_follow_weight_changes() -> None:
    net = edsr(4)
    feats = torch.randn(1, 8, 9, 10)
    with torch.no_grad():
        net.fused_tail(feats)  # fills the cache
        net.tail[-1].weight.mul_(-2.0)
        assert_float32_close(net.fused_tail(feats), net.tail(feats))
        net.load_state_dict(edsr(4, seed=SEED + 5).state_dict())
        assert_float32_close(net.fused_tail(feats), net.tail(feats))


def test_inference_uses_the_fused_tail_training_the_layers() -> None:
    net = edsr(2)
    lr = torch.rand(1, 3, 9, 9)
    calls = []
    net.fused_tail.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        net.reconstruct(net.features(lr))
    assert calls == [1]
    net.train()
    out = net.reconstruct(net.features(lr))
    out.sum().backward()
    assert calls == [1]  # training ran the layers, and their weights got gradients
    assert all(p.grad is not None for p in net.tail.parameters())


def test_no_new_weights_in_the_checkpoint() -> None:
    net = edsr(4)
    assert not [k for k in net.state_dict() if "fused" in k]
    assert len(list(net.parameters())) == len(list(net.named_parameters()))


@pytest.mark.parametrize("scale", [2, 4])
def test_tiled_edsr_upscale_equals_the_layers(scale: int) -> None:
    """Through the tiler, cut edges inside the image and strips along its own edges."""
    torch.manual_seed(SEED)
    model = CARModel(preset("tiny", scale)).eval()
    with torch.no_grad():
        for p in model.sr.parameters():
            if p.requires_grad:
                p.mul_(3.0)
    lr = quantize(torch.rand(1, 3, 37, 29, generator=torch.Generator().manual_seed(SEED)))
    with torch.inference_mode():
        layers = model.train().upscale(lr)  # in training mode: the layers, untiled
        model.eval()
        atol = 2e-5 * layers.abs().max().item()  # float32 rounding, as assert_float32_close
        whole = layers.clamp(0, 1)
        torch.testing.assert_close(model.upscale(lr).clamp(0, 1), whole, rtol=0, atol=atol)
        for tile in (8 * scale, 16 * scale, 64 * scale):
            tiled = TiledModel(model).upscale(lr, size=None, tile=tile)
            torch.testing.assert_close(tiled, whole, rtol=0, atol=atol)


def test_the_memory_probe_does_not_count_the_derivation() -> None:
    """The first use derives the fused weights from a 64-image probe; the tiler sizes its
    tiles from forward hooks, so that probe made the first plan's upscale tiles tiny."""
    from carcli.tiler import Footprint

    model = CARModel(preset("compact", 2)).eval()
    first = Footprint.measure(model, torch.device("cpu"), "fp32")
    assert Footprint.measure(model, torch.device("cpu"), "fp32") == first
    assert first.sr_up < 1000  # bytes per LR pixel: features in, RGB out (82944 with it)
