"""Grafting a two-branch resampler onto a shared head (carcli.models.graft)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carcli.checkpoints import load_model, save_checkpoint
from carcli.models import (
    CARConfig,
    CARModel,
    ResamplerConfig,
    ResamplerNet,
    preset,
    without_offsets,
)
from carcli.models.graft import can_graft_shared_head, graft_shared_head
from carcli.train.trainer import TrainConfig, Trainer

SEED = 20261207
SMALL = ResamplerConfig(c1=8, c2=16, c4=16, blocks=1, c8=16, trunk_convs=1)


def _resampler(scale: int, **fields) -> ResamplerNet:
    config = replace(preset("tiny", scale), resampler=replace(SMALL, **fields))
    return ResamplerNet(config)


def _patches(seed: int, count: int = 6) -> list[torch.Tensor]:
    """Smooth random images (bicubic-enlarged noise), closer to photos than white noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 4, 3, 12, 12, generator=g)
    up = torch.nn.functional.interpolate(coarse.flatten(0, 1), size=64, mode="bicubic")
    return list(up.clamp(0, 1).unflatten(0, (count, 4)))


def _offsets_read_the_kernel_features(source: ResamplerNet) -> None:
    """Make the offsets' trunk and first head conv the kernels': offsets become a linear
    function of the kernel head's hidden layer, which a graft must then reproduce."""
    with torch.no_grad():
        source.offsets_trunk.load_state_dict(source.kernels_trunk.state_dict())
        for head in (source.offsets_h_generation, source.offsets_v_generation):
            head[1].load_state_dict(source.kernels_weight[1].state_dict())


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("head_kernel", [3, 1])
def test_graft_reproduces_offsets_that_are_linear_in_the_kernel_features(
    scale: int, head_kernel: int
) -> None:
    print("seed", SEED)
    torch.manual_seed(SEED)
    source = _resampler(scale, head_kernel=head_kernel).eval()
    _offsets_read_the_kernel_features(source)
    target = _resampler(scale, head="shared", head_kernel=head_kernel).eval()
    fit = graft_shared_head(source, target, _patches(SEED), ridge=1e-9)
    assert fit.kernels_r2 == 1.0 and fit.offsets_r2 > 0.99999
    assert fit.pixels == 6 * 4 * (64 // scale) ** 2
    x = _patches(SEED + 1, 1)[0]  # images the fit never saw
    with torch.no_grad():
        want, got = source(x), target(x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-7)  # kernel rows: copies
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=2e-4)


def test_graft_of_independent_offsets_copies_the_kernels_and_reports_the_fit() -> None:
    torch.manual_seed(SEED)
    source = _resampler(4).eval()
    target = _resampler(4, head="shared").eval()
    fit = graft_shared_head(source, target, _patches(SEED))
    assert fit.kernels_r2 == 1.0 and 0.0 < fit.offsets_r2 < 1.0
    x = _patches(SEED + 1, 1)[0]
    with torch.no_grad():
        torch.testing.assert_close(target(x)[0], source(x)[0], rtol=0, atol=1e-7)


def test_graft_onto_a_one_by_one_head_fits_the_kernels_too() -> None:
    torch.manual_seed(SEED)
    source = _resampler(2).eval()
    target = _resampler(2, head="shared", head_kernel=1).eval()
    fit = graft_shared_head(source, target, _patches(SEED))
    assert 0.0 < fit.kernels_r2 < 1.0 and 0.0 < fit.offsets_r2 < 1.0


def test_only_a_merge_of_the_two_branches_is_grafted() -> None:
    shared = replace(SMALL, head="shared")
    assert can_graft_shared_head(SMALL, shared)
    assert can_graft_shared_head(SMALL, replace(shared, head_kernel=1))
    assert not can_graft_shared_head(SMALL, SMALL)
    assert not can_graft_shared_head(shared, shared)
    assert not can_graft_shared_head(SMALL, replace(shared, c8=32))
    assert not can_graft_shared_head(SMALL, replace(shared, blocks=2))
    with pytest.raises(ValueError, match="two-branch source"):
        graft_shared_head(_resampler(2), _resampler(2), _patches(SEED, 1))
    with pytest.raises(ValueError, match="at least one batch"):
        graft_shared_head(_resampler(2), _resampler(2, head="shared"), [])


def _graft_run(tmp_path: Path, steps: int) -> tuple[Path, TrainConfig]:
    """A random compact pair and a `--config fast-lite --init PAIR` run on three small images."""
    rng = np.random.default_rng(SEED)
    data = tmp_path / "train"
    data.mkdir()
    for i in range(3):
        coarse = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
        Image.fromarray(coarse).resize((72 + 8 * i, 64), Image.BICUBIC).save(data / f"{i}.png")
    torch.manual_seed(SEED)
    pair = tmp_path / "compact.safetensors"
    save_checkpoint(CARModel(preset("compact", 2)).eval(), pair, {})
    cfg = TrainConfig(
        scale=2, data=[str(data)], val=[], config="fast-lite", init=str(pair), steps=steps,
        batch=2, patch=32, warmup=0, precision="fp32", channels_last=False, val_every=0, ema=0,
        seed=SEED,
    )  # fmt: skip
    return pair, cfg


def test_train_init_with_a_shared_head_preset_grafts_the_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`car train --init PAIR --config fast-lite`: starts as the pair's resampler, not bicubic."""
    pair, cfg = _graft_run(tmp_path, steps=1)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"))
    note = capsys.readouterr().err
    assert "resampler grafted onto one shared head for config fast-lite" in note
    assert "a new SR network" in note
    model: CARModel = trainer.model
    assert isinstance(model.config, CARConfig) and model.config.resampler.head == "shared"
    assert model.config.sr.arch == "rep"
    source, _ = load_model(pair, 2)
    x = _patches(SEED + 1, 1)[0]
    with torch.no_grad():
        got, want = model.resampler.eval()(x), source.resampler(x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)


def test_a_resumed_graft_run_skips_the_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resuming, the fit (seconds at 2x on real crops) would be overwritten by the state."""
    _, cfg = _graft_run(tmp_path, steps=2)
    first = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    first.run()
    import carcli.train.trainer as trainer_module

    def no_fit(*args: object, **kwargs: object) -> None:
        raise AssertionError("the graft was fitted again on resume")

    monkeypatch.setattr(trainer_module, "graft_shared_head", no_fit)
    resumed = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True, resuming=True)
    resumed.load_state()
    assert resumed.step == 2
    for name, value in first.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name].cpu(), value.cpu()), name


@pytest.mark.parametrize("head_kernel", [3, 1])
def test_graft_onto_a_head_without_offsets_keeps_the_kernels(head_kernel: int) -> None:
    """The 4x pairs' offsets are zero anyway: kernels only, copied (3x3) or fitted (1x1)."""
    torch.manual_seed(SEED)
    source = _resampler(4).eval()
    target = _resampler(4, head="shared", head_kernel=head_kernel, offsets=False).eval()
    assert can_graft_shared_head(SMALL, replace(SMALL, head="shared", offsets=False))
    assert not can_graft_shared_head(replace(SMALL, offsets=False), replace(SMALL, head="shared"))
    fit = graft_shared_head(source, target, _patches(SEED))
    assert fit.offsets_r2 is None
    x = _patches(SEED + 1, 1)[0]
    with torch.no_grad():
        got, want = target(x), source(x)
    assert got[1] is None and got[2] is None
    if head_kernel == 3:
        assert fit.pixels == 0 and fit.kernels_r2 == 1.0  # nothing to fit
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-7)
    else:
        assert fit.pixels > 0 and 0.0 < fit.kernels_r2 < 1.0


@pytest.mark.parametrize("head_kernel", [3, 1])
def test_a_source_without_offsets_grafts_onto_a_head_without_them(head_kernel: int) -> None:
    """The shipped 4x pair has no offsets (since session 7): its two-branch kernel head
    still grafts onto one shared head; a shared head with offsets it cannot teach."""
    torch.manual_seed(SEED)
    lean = replace(SMALL, offsets=False)
    source = _resampler(4, offsets=False).eval()
    target = _resampler(4, head="shared", head_kernel=head_kernel, offsets=False).eval()
    assert can_graft_shared_head(lean, replace(lean, head="shared", head_kernel=head_kernel))
    assert not can_graft_shared_head(lean, replace(SMALL, head="shared"))
    fit = graft_shared_head(source, target, _patches(SEED))
    x = _patches(SEED + 1, 1)[0]
    with torch.no_grad():
        got, want = target(x), source(x)
    if head_kernel == 3:
        assert fit.pixels == 0
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-7)
    else:
        assert fit.pixels > 0 and 0.0 < fit.kernels_r2 < 1.0
    with pytest.raises(ValueError, match="cannot teach a shared head offsets"):
        graft_shared_head(source, _resampler(4, head="shared"), _patches(SEED, 1))


def test_train_init_from_a_pair_without_offsets_adds_them_for_a_design_with_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--init car_x4 --config fast` (the GPU burst's fast design): offsets added at zero,
    a new rep SR network; `--config compact` (the default) continues the pair as it is."""
    _, cfg = _graft_run(tmp_path, steps=1)
    pair = tmp_path / "lean.safetensors"
    torch.manual_seed(SEED)
    lean = without_offsets(CARModel(preset("compact", 2))).eval()
    save_checkpoint(lean, pair, {})
    for config, offsets, arch in (("fast", True, "rep"), ("compact", False, "edsr")):
        run = tmp_path / f"run-{config}"
        trainer = Trainer(replace(cfg, config=config, init=str(pair)), run, torch.device("cpu"))
        note = capsys.readouterr().err
        model: CARModel = trainer.model
        assert model.config.resampler.offsets == offsets and model.config.sr.arch == arch
        assert ("offsets added" in note) == offsets
        x = _patches(SEED + 2, 1)[0]
        with torch.no_grad():
            got, want = model.eval().downscale(x), lean.downscale(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
