"""Encoder-side refinement (``--refine``): lower error, bounded change, 8-bit, tiled, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image
from typer.testing import CliRunner

import carcli
from carcli import metrics
from carcli.cli import app
from carcli.engine import Processor
from carcli.refine import refine, refine_tile


def _hr(height: int, width: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(photo(height, width, seed=seed)).permute(2, 0, 1).float() / 255


def _error(processor: Processor, lr: torch.Tensor, hr: torch.Tensor) -> float:
    """Mean squared error of the reconstruction over the user's pixels only."""
    out = processor.upscale(lr, size=tuple(hr.shape[-2:]))
    return float(torch.mean((out - hr) ** 2))


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("max_change", [1, 4])
def test_refined_lr_restores_better_and_stays_within_range(
    tiny_model, scale: int, max_change: int
) -> None:
    model = tiny_model(scale)
    hr = _hr(37, 50, seed=scale + 10 * max_change)  # odd sizes: the last LR row is part padding
    plain = Processor(model)
    tuned = Processor(model, refine=6, refine_max_change=max_change)
    lr0, lr = plain.downscale(hr), tuned.downscale(hr)
    assert lr.shape == lr0.shape == (3, -(-37 // scale), -(-50 // scale))
    levels = lr * 255
    assert torch.equal(levels, levels.round()), "refined LR left the 8-bit grid"
    moved = (levels - lr0 * 255).abs()
    assert moved.max() <= max_change + 1e-4
    assert moved.max() >= 1, "nothing moved"
    before, after = _error(plain, lr0, hr), _error(plain, lr, hr)
    assert after < before, (before, after)


def test_zero_range_or_zero_steps_change_nothing(tiny_model) -> None:
    model = tiny_model(4)
    hr = _hr(33, 41, seed=5)
    lr0 = Processor(model).downscale(hr)
    assert torch.equal(Processor(model, refine=3, refine_max_change=0).downscale(hr), lr0)
    assert torch.equal(refine(model, lr0[None], hr[None], steps=0), lr0[None])


def test_tile_scores_only_its_region_and_moves_only_its_pixels(tiny_model) -> None:
    """Against an independent computation: the kept step is never worse than the start."""
    model = tiny_model(2)
    hr = _hr(40, 40, seed=7)[None]
    lr0 = Processor(model).downscale(hr)
    free = (slice(5, 12), slice(3, 15))
    tuned = refine_tile(model, lr0, hr, free, steps=5, max_change=3)
    outside = torch.ones_like(lr0, dtype=torch.bool)
    outside[..., free[0], free[1]] = False
    assert torch.equal(tuned[outside], lr0[outside])
    with torch.no_grad():
        err0 = torch.mean((model.sr(lr0) - hr) ** 2)
        err1 = torch.mean((model.sr(tuned) - hr) ** 2)
    assert err1 < err0


def test_tiled_refinement_improves_like_the_whole_image(tiny_model) -> None:
    model = tiny_model(4)
    hr = _hr(96, 120, seed=11)
    plain = Processor(model)
    lr0 = plain.downscale(hr)
    whole = Processor(model, refine=5).downscale(hr)
    tiled_processor = Processor(model, refine=5)
    tiled_processor.down_tile = 9  # 4 x 4 tiles of the 24 x 30 LR image
    tiled = tiled_processor.downscale(hr)
    assert not torch.equal(tiled, whole)  # really went tile by tile
    base = _error(plain, lr0, hr)
    gain_whole = base - _error(plain, whole, hr)
    gain_tiled = base - _error(plain, tiled, hr)
    assert gain_whole > 0 and gain_tiled > 0.5 * gain_whole, (gain_whole, gain_tiled)
    assert (tiled * 255 - lr0 * 255).abs().max() <= 4 + 1e-4


def test_python_api_refines(tiny_ckpt) -> None:
    image = photo(30, 42, seed=13)
    plain = carcli.roundtrip(image, scale=2, weights=tiny_ckpt(2), device="cpu")
    tuned = carcli.roundtrip(image, scale=2, weights=tiny_ckpt(2), device="cpu", refine=4)
    err = lambda out: np.mean((out.astype(float) - image) ** 2)  # noqa: E731
    assert err(tuned) < err(plain)
    again = carcli.roundtrip(image, scale=2, weights=tiny_ckpt(2), device="cpu")
    assert np.array_equal(again, plain)  # the cached processor was not changed


def test_cli_refine_downscale_then_upscale_equals_roundtrip(tmp_path: Path, tiny_weights) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(35, 46, seed=17)).save(src / "a.png")
    runner = CliRunner()
    env = {"CARCLI_WEIGHTS": str(tiny_weights)}
    common = ["--scale", "4", "--device", "cpu", "--precision", "fp32", "--quiet"]
    args = ["roundtrip", str(src), *common, "--json"]
    result = runner.invoke(app, [*args, str(tmp_path / "plain.json")], env=env)
    assert result.exit_code == 0, result.output
    refine_args = ["--refine", "4", "--refine-range", "3"]
    result = runner.invoke(app, [*args, str(tmp_path / "r.json"), *refine_args], env=env)
    assert result.exit_code == 0, result.output
    plain = json.loads((tmp_path / "plain.json").read_text())
    refined = json.loads((tmp_path / "r.json").read_text())
    assert refined["refine"] == {"steps": 4, "range": 3}
    assert refined["psnr"] > plain["psnr"]
    result = runner.invoke(
        app, ["downscale", str(src), str(tmp_path / "lr"), *common, *refine_args], env=env
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["upscale", str(tmp_path / "lr"), str(tmp_path / "sr"), *common], env=env
    )
    assert result.exit_code == 0, result.output
    out = np.asarray(Image.open(tmp_path / "sr" / "a.png")).astype(float)
    target = photo(35, 46, seed=17).astype(float)
    psnr = metrics.psnr_y(
        torch.from_numpy(out).permute(2, 0, 1) / 255,
        torch.from_numpy(target).permute(2, 0, 1) / 255,
        shave=4,
    )
    assert psnr == pytest.approx(refined["images"][0]["psnr"], abs=1e-6)


def test_refine_runs_in_bfloat16(tiny_model) -> None:
    """Autocast on the CPU: the search runs in bf16 where the upscale does; the LR stays 8-bit."""
    model = tiny_model(2)
    hr = _hr(31, 26, seed=19)
    plain = Processor(model, precision="bf16")
    lr0 = plain.downscale(hr)
    lr = Processor(model, precision="bf16", refine=3).downscale(hr)
    assert lr.dtype == torch.float32 and lr.shape == lr0.shape
    assert (lr * 255 - lr0 * 255).abs().max() <= 4 + 1e-4
    assert _error(plain, lr, hr) <= _error(plain, lr0, hr)


def test_refinement_differentiates_the_pixels_only(tiny_model) -> None:
    """The weights are frozen while it runs (EDSR then runs its tail as one conv, which
    must hold after inference-mode passes cached it) and their flags come back."""
    model = tiny_model(4)
    hr = _hr(40, 44, seed=3)
    Processor(model).roundtrip(hr)  # inference mode: caches the fused tail
    flags = [p.requires_grad for p in model.parameters()]
    fused_calls = []
    hook = model.sr.fused_tail.register_forward_hook(lambda *a: fused_calls.append(1))
    try:
        lr = Processor(model, refine=2).downscale(hr)
    finally:
        hook.remove()
    assert lr.shape == (3, 10, 11)
    assert len(fused_calls) >= 3  # every step's forward pass, and the plan's probe
    assert [p.requires_grad for p in model.parameters()] == flags
