"""Tiled inference: margins cover the receptive field, tiles stitch to the untiled result.

"Untiled" is the model's own forward pass (``CARModel.downscale`` / ``upscale``)
on the whole image. The tolerance: after 8-bit quantisation at
least 99.9 % of values equal and none more than one level apart.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo, record_dtypes
from PIL import Image

from carcli import runpolicy
from carcli.engine import Processor
from carcli.models import CARModel, op_halo, preset, quantize
from carcli.tiler import TiledModel, spans

SAMPLES = Path(__file__).resolve().parents[1] / "carcli" / "samples"
# Some tests draw random weights, crops or sample names: seeded per test and printed.
pytestmark = pytest.mark.usefixtures("seed")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small tiles are latency-bound; one thread is faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh(name: str, scale: int, seed: int = 0) -> CARModel:
    torch.manual_seed(seed)
    return CARModel(preset(name, scale)).eval()


def levels(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(0, 1) * 255)


def assert_close_8bit(tiled: torch.Tensor, untiled: torch.Tensor) -> None:
    assert tiled.shape == untiled.shape
    diff = (levels(tiled) - levels(untiled)).abs()
    equal = (diff == 0).float().mean().item()
    assert diff.max().item() <= 1, f"max difference {diff.max().item():.0f} levels"
    assert equal >= 0.999, f"only {100 * equal:.3f} % equal"


def sample(name: str, height: int, width: int) -> torch.Tensor:
    """A crop of a bundled photo (real image content), 1x3xHxW."""
    array = np.asarray(Image.open(SAMPLES / name).convert("RGB"))[:height, :width]
    return torch.from_numpy(array.astype(np.float32) / 255).permute(2, 0, 1)[None].contiguous()


def random_content(height: int, width: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, height, width, generator=gen)


# --------------------------------------------------------------------------- margins


def _support(grad: torch.Tensor) -> tuple[int, int]:
    rows = torch.nonzero(grad.abs().sum(dim=(0, 1, 3))).flatten()
    return int(rows.min()), int(rows.max())


@pytest.mark.parametrize("scale", [2, 4])
def test_margins_cover_the_receptive_field(scale: int) -> None:
    """What the gradient of one output reaches never exceeds the computed margins."""
    model = fresh("tiny", scale)
    m = model.downscale_margin()
    assert m % 8 == 0 and m >= op_halo(scale)
    hr = torch.rand(1, 3, 192, 40, requires_grad=True)
    kernels, off_h, off_v = model.resampler(hr)
    reach = 0
    for i in range(96 // scale, 96 // scale + 8 // scale):  # every phase within an H/8 cell
        hr.grad = None
        (kernels[0, :, i].sum() + off_h[0, :, i].sum() + off_v[0, :, i].sum()).backward(
            retain_graph=True
        )
        lo, hi = _support(hr.grad)
        reach = max(reach, i * scale - lo, hi - (i * scale + scale - 1))
    assert reach <= m < reach + 8  # covers it, and no more than the 8-pixel rounding

    body, up = model.sr.stage_margins()
    lr = torch.rand(1, 3, 48, 12, requires_grad=True)
    model.sr(lr)[0, :, 24 * scale].sum().backward()  # HR row at the start of LR row 24
    lo, hi = _support(lr.grad)
    assert max(24 - lo, hi - 24) == body + up


def test_spans_cover_align_and_balance() -> None:
    for length, tile, align in [(100, 30, 1), (101, 8, 4), (7, 100, 2), (64, 3, 4), (1, 1, 1)]:
        pieces = spans(length, tile, align)
        assert pieces[0][0] == 0 and pieces[-1][1] == length
        assert all(a % align == 0 for a, _ in pieces)
        assert all(b == c for (_, b), (c, _) in zip(pieces, pieces[1:], strict=False))
        sizes = [b - a for a, b in pieces]
        assert max(sizes) <= max(tile - tile % align, align)
    assert [b - a for a, b in spans(100, 30)] == [25, 25, 25, 25]  # no sliver at the end


# --------------------------------------------------------------------------- tiled == untiled


def untiled(model: CARModel, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        lr = quantize(model.downscale(hr))
        return lr, model.upscale(lr)[..., : hr.shape[-2], : hr.shape[-1]].clamp(0, 1)


CASES = [  # (content, height, width); odd sizes, not multiples of 8 or of the scale
    ("random", 77, 101),
    ("astronaut.png", 101, 123),
    ("rocket.png", 118, 83),
]


@pytest.mark.slow
@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("content,height,width", CASES)
def test_tiled_matches_untiled(scale: int, content: str, height: int, width: int) -> None:
    model = fresh("tiny", scale, seed=scale)
    hr = random_content(height, width, 1) if content == "random" else sample(content, height, width)
    lr_ref, sr_ref = untiled(model, hr)
    runner = TiledModel(model)
    margin_lr = model.downscale_margin() // scale
    # LR tile sides: smaller than the margin, about the margin, a few tiles per side.
    for tile in (max(2, margin_lr // 3), margin_lr + 2, 24):
        with torch.inference_mode():
            lr = quantize(runner.downscale(hr, tile=tile))
            up = runner.upscale(lr_ref, size=(height, width), tile=tile * scale)
        assert_close_8bit(lr, lr_ref)
        assert_close_8bit(up, sr_ref)


def test_compact_model_tiled_matches_untiled() -> None:
    """The configuration carcli ships, with margins of 56 HR / 36 LR pixels."""
    model = fresh("compact", 4)
    hr = sample("coffee.png", 140, 172)
    lr_ref, sr_ref = untiled(model, hr)
    runner = TiledModel(model)
    with torch.inference_mode():
        assert_close_8bit(quantize(runner.downscale(hr, tile=16)), lr_ref)
        assert_close_8bit(runner.upscale(lr_ref, size=(140, 172), tile=40), sr_ref)


def test_bf16_tiles_match_bf16_whole() -> None:
    """Mixed precision stays tile-independent (kernel normalisation runs in float32)."""
    model = fresh("tiny", 4, seed=4)
    hr = sample("chelsea.png", 121, 133)
    runner = TiledModel(model, precision="bf16", channels_last=True)
    with torch.inference_mode():
        whole = quantize(runner.downscale(hr, tile=10**6))
        tiled = quantize(runner.downscale(hr, tile=6))
        assert_close_8bit(tiled, whole)
        assert_close_8bit(
            runner.upscale(whole, (121, 133), tile=24),
            runner.upscale(whole, (121, 133), tile=10**6),
        )


def test_bf16_keeps_the_8bit_input_and_rgb_output_in_float32() -> None:
    """EDSR's first and last convs run in float32 under bf16, the residual body in bf16."""
    model = fresh("tiny", 2, seed=int(torch.randint(0, 2**31 - 1, ())))
    sr = model.sr
    seen = record_dtypes({"head": sr.head[0], "block": sr.body[0].body[0], "last": sr.tail[-1]})
    lr = torch.randint(0, 256, (1, 3, 23, 29)).float() / 255
    with torch.inference_mode():
        out = TiledModel(model, precision="bf16").upscale(lr)
    assert seen["head"] == (torch.float32, torch.float32)
    assert seen["block"] == (torch.bfloat16, torch.bfloat16)  # the residual stream stays half
    assert seen["last"] == (torch.float32, torch.float32)
    assert out.dtype == torch.float32


def test_bf16_upscale_is_within_a_level_of_fp32_with_shipped_weights() -> None:
    """With trained weights, bf16 upscaling moves few pixels, far fewer than plain autocast.

    Measured on 160-px crops of the samples at 2x: 95-98 % of 8-bit values equal to
    fp32's, RMS 0.04-0.07 levels; ``EDSR.forward`` under autocast: 75-84 %, 0.2-0.45.
    """
    weights = Path(__file__).resolve().parents[1] / "carcli" / "weights" / "car_x2.safetensors"
    if not weights.is_file():
        pytest.skip(f"no shipped 2x weights at {weights}")
    from carcli.checkpoints import load_checkpoint

    model, _ = load_checkpoint(weights)
    model.eval()
    name = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"][int(torch.randint(4, ()))]
    y, x = (int(v) for v in torch.randint(0, 100, (2,)))
    hr = sample(name, 260, 260)[..., y : y + 160, x : x + 160]
    with torch.inference_mode():
        lr = quantize(model.downscale(hr))
        ref = model.upscale(lr).clamp(0, 1)
        ours = TiledModel(model, precision="bf16").upscale(lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model.upscale(lr).float().clamp(0, 1)
    rms = lambda a: float(((a - ref) * 255).pow(2).mean().sqrt())  # noqa: E731
    diff = (levels(ours) - levels(ref)).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.93, (name, y, x)
    assert rms(ours) < 0.12 and rms(ours) < 0.5 * rms(plain), (name, y, x, rms(ours), rms(plain))


def test_processor_default_tiles_large_images_and_matches() -> None:
    """Through the Processor (quantised, 3xHxW), with tiles sized from a small budget."""
    model = fresh("tiny", 2)
    hr = random_content(90, 70, 5)[0]
    lr_ref, sr_ref = untiled(model, hr[None])
    processor = Processor(model, memory_budget=2 << 20)  # a tiny budget forces several tiles
    plan = processor.runner.plan()
    assert plan.down < 45 and plan.up < 140  # smaller than the image: it is really tiled
    lr, rec = processor.roundtrip(hr)
    assert_close_8bit(lr, lr_ref[0])
    assert_close_8bit(processor.upscale(lr_ref[0], size=(90, 70)), sr_ref[0])
    assert rec.shape == hr.shape


# --------------------------------------------------------------------------- planning


def test_plan_grows_with_budget_and_untiled_fits() -> None:
    runner = TiledModel(fresh("compact", 4))
    small, big = runner.plan(budget=256 << 20), runner.plan(budget=1 << 30)
    assert small.down < big.down and small.up < big.up and small.up_inner <= big.up_inner
    assert runner.plan(batch=4, budget=1 << 30).up < big.up
    assert runner.max_batch(256, 256) == 1  # CPU: no batching
    assert runpolicy.available_memory(torch.device("cpu")) > 0
    assert 0 < runpolicy.default_budget(torch.device("cpu")) <= runpolicy.CPU_BUDGET_CAP


def test_precision_choices() -> None:
    cpu = torch.device("cpu")
    assert runpolicy.resolve_precision("auto", cpu) in ("bf16", "fp32")
    assert runpolicy.resolve_precision("FP32", cpu) == "fp32"
    with pytest.raises(runpolicy.PrecisionError, match="CUDA"):
        runpolicy.resolve_precision("fp16", cpu)
    with pytest.raises(runpolicy.PrecisionError):
        runpolicy.resolve_precision("fp8", cpu)
    assert 1 <= runpolicy.default_threads() <= torch.get_num_threads()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc/stat")
def test_busy_cores_sees_a_process_spinning_now() -> None:
    """A busy core counts while it is busy, not minutes later as the load average would."""
    cpu = min(os.sched_getaffinity(0))
    spin = f"import os, time\nos.sched_setaffinity(0, {{{cpu}}})\nt = time.time()\n"
    spin += "while time.time() - t < 5: pass\n"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.3)  # let it start spinning
        assert runpolicy.busy_cores({cpu}, interval=0.3) > 0.7
    finally:
        child.kill()
        child.wait()


def test_busy_cores_falls_back_to_the_load_average(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runpolicy, "_cpu_times", lambda cpus: None)
    monkeypatch.setattr(runpolicy.os, "getloadavg", lambda: (1.25, 0.0, 0.0))
    assert runpolicy.busy_cores({0, 1}) == 1.25
    monkeypatch.setattr(runpolicy, "busy_cores", lambda cpus, interval=0.1: len(cpus) - 0.4)
    assert runpolicy.default_threads() == 1  # almost every core busy: still one thread


# --------------------------------------------------------------------------- OOM retry


def test_out_of_memory_retries_with_smaller_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated on the CPU: regions above a size raise the CUDA OOM error type."""
    model = fresh("tiny", 4)
    hr = random_content(160, 200, 7)
    lr_ref, sr_ref = untiled(model, hr)
    runner = TiledModel(model)
    widths: list[int] = []

    def limited(original, pixels: int):
        def run(self, x: torch.Tensor) -> torch.Tensor:
            widths.append(x.shape[-1])
            if x.shape[-1] * x.shape[-2] > pixels:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return original(self, x)

        return run

    # Downscale regions (HR) hold at most 140 x 140 pixels, EDSR body regions (LR) 30 x 30.
    monkeypatch.setattr(
        TiledModel, "_downscale_region", limited(TiledModel._downscale_region, 140 * 140)
    )
    monkeypatch.setattr(TiledModel, "_features", limited(TiledModel._features, 30 * 30))
    with torch.inference_mode():
        lr = quantize(runner.downscale(hr, tile=1000))
        assert widths[0] == 200 and min(widths) <= 140  # first the whole image, then tiles
        up = runner.upscale(lr_ref, size=(160, 200), tile=1000)
    assert_close_8bit(lr, lr_ref)
    assert_close_8bit(up, sr_ref)
    assert runner.notes and "smaller tiles" in runner.notes[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_out_of_memory_retries_with_smaller_tiles() -> None:
    """A real CUDA OOM under a forced small memory budget, recovered by smaller tiles."""
    device = torch.device("cuda")
    model = fresh("compact", 4)
    hr = random_content(1024, 1024, 3)
    cpu = TiledModel(fresh("compact", 4))
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (384 << 20) / total), device)
    try:
        runner = TiledModel(model, device, budget=8 << 30)  # plans far more than it may use
        with torch.inference_mode():
            lr = quantize(runner.downscale(hr, tile=10**6))
            up = runner.upscale(lr, size=(1024, 1024), tile=10**6)
            lr_cpu = quantize(cpu.downscale(hr, tile=64))
            up_cpu = cpu.upscale(lr, size=(1024, 1024), tile=256)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
    assert runner.notes and "smaller tiles" in runner.notes[0]
    diff = (levels(lr) - levels(lr_cpu)).abs()
    assert (diff == 0).float().mean() >= 0.99 and diff.max() <= 1  # GPU vs CPU arithmetic
    assert (levels(up) - levels(up_cpu)).abs().max() <= 2


def test_pictures_of_any_size_roundtrip_through_tiles() -> None:
    """Thin and tiny images still work when tiles are smaller than the image."""
    model = fresh("tiny", 4)
    processor = Processor(model, tile=4)
    for h, w in [(1, 1), (5, 300), (300, 9), (17, 33)]:
        rgb = torch.from_numpy(photo(h, w, seed=h).astype(np.float32) / 255).permute(2, 0, 1)
        lr, rec = processor.roundtrip(rgb)
        assert lr.shape == (3, -(-h // 4), -(-w // 4)) and rec.shape == (3, h, w)


def test_large_images_are_measured_in_bands_with_the_same_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from carcli import metrics

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 530, 97, generator=gen)
    b = (a + 0.05 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    whole = (metrics.psnr_y(a, b, shave=4), metrics.ssim_y(a, b, shave=4))
    monkeypatch.setattr(metrics, "MEASURE_BAND_ROWS", 100)
    assert metrics.measure(a, b, 4) == pytest.approx(whole, rel=1e-12)
    assert metrics.measure(a, a, 4) == (float("inf"), pytest.approx(1.0))
