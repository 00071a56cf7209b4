"""Reflection-padded 3x3 convs run without the padded copy: same values, same gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from carcli.models import CARModel, preset
from carcli.models.layers import ReflectSequential, reflect_conv3, reflect_padded_conv3

SEED = 20261207


def plain(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return conv(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"))


@pytest.mark.parametrize("size", [(2, 2), (2, 5), (3, 3), (7, 4), (16, 17)])
def test_equals_pad_then_conv(size: tuple[int, int]) -> None:
    print(f"seed {SEED}")
    torch.manual_seed(SEED)
    conv = nn.Conv2d(3, 5, 3).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    torch.testing.assert_close(reflect_padded_conv3(x, conv), plain(conv, x), rtol=0, atol=1e-12)


def test_one_pixel_inputs_fail_as_the_pad_does() -> None:
    conv = nn.Conv2d(3, 5, 3)
    x = torch.randn(1, 3, 1, 6)
    with pytest.raises(RuntimeError) as ours:
        reflect_padded_conv3(x, conv)
    with pytest.raises(RuntimeError) as theirs:
        plain(conv, x)
    assert str(ours.value) == str(theirs.value)


def test_gradients_match_numerically() -> None:
    torch.manual_seed(SEED)
    conv = nn.Conv2d(2, 3, 3).double()
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: reflect_padded_conv3(t, conv), (x,))
    (gx,) = torch.autograd.grad(reflect_padded_conv3(x, conv).square().sum(), x)
    (want,) = torch.autograd.grad(plain(conv, x).square().sum(), x)
    torch.testing.assert_close(gx, want, rtol=0, atol=1e-12)
    gw = torch.autograd.grad(reflect_padded_conv3(x, conv).sum(), conv.weight)[0]
    torch.testing.assert_close(gw, torch.autograd.grad(plain(conv, x).sum(), conv.weight)[0])


def test_sequential_keeps_the_layout_and_the_result() -> None:
    torch.manual_seed(SEED)
    layers = [*reflect_conv3(4, 4), nn.ReLU(), *reflect_conv3(4, 6), nn.Tanh()]
    ours, theirs = ReflectSequential(*layers).double(), nn.Sequential(*layers).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-12)
    assert isinstance(ours[:2], ReflectSequential)  # slicing keeps the type


@pytest.mark.parametrize("scale", [2, 4])
def test_resampler_output_is_unchanged(scale: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole downscale, against the same model run with plain nn.Sequential (float32,
    and bf16 channels-last as the engine runs it on CPUs with bfloat16)."""
    torch.manual_seed(SEED)
    model = CARModel(preset("compact", scale)).eval()
    hr = torch.rand(1, 3, 64, 72)
    with torch.no_grad():
        fast = model.downscale(hr)
        fast_bf16 = model.downscale_mixed(hr.contiguous(memory_format=torch.channels_last), "bf16")
        monkeypatch.setattr(ReflectSequential, "forward", nn.Sequential.forward)
        slow = model.downscale(hr)
        slow_bf16 = model.downscale_mixed(hr.contiguous(memory_format=torch.channels_last), "bf16")
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-6)
    # bf16 sums in another order could round differently; measured: identical
    torch.testing.assert_close(fast_bf16, slow_bf16, rtol=0, atol=1e-2)


def test_hooked_pairs_run_as_their_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiler's memory probe and the graft watch modules through forward hooks."""
    from carcli.tiler import Footprint

    seq = ReflectSequential(*reflect_conv3(2, 2))
    calls: list[int] = []
    handle = seq[1].register_forward_hook(lambda *args: calls.append(1))
    seq(torch.randn(1, 2, 5, 5))
    handle.remove()
    seq(torch.randn(1, 2, 5, 5))
    assert calls == [1]
    model = CARModel(preset("compact", 2)).eval()
    ours = Footprint.measure(model, torch.device("cpu"), "fp32")
    monkeypatch.setattr(ReflectSequential, "forward", nn.Sequential.forward)
    assert Footprint.measure(model, torch.device("cpu"), "fp32") == ours
