"""Downscale/upscale/round trip on tensors, pictures and folders; reports; the Python API."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import carcli
from carcli import tasks
from carcli.batch import Outcome, Task, make_items, run_batch
from carcli.console import ConsoleReporter
from carcli.engine import Processor
from carcli.errors import UsageError
from carcli.evaluation import evaluate_folder
from carcli.imageio import SCALE_KEY, SOURCE_SIZE_KEY, read_image, to_array
from carcli.models import quantize
from carcli.paths import check_paths, collect_inputs, output_target
from carcli.pictures import restored_size, roundtrip_picture
from carcli.resize import bicubic_downscale, bicubic_upscale
from carcli.runpolicy import resolve_device
from carcli.tasks import DownscaleTask, RoundtripTask, UpscaleTask


def run(task: Task, source: Path) -> list[Outcome]:
    return run_batch(task, make_items(task, collect_inputs(source)), ConsoleReporter(quiet=True))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Odd-sized images: RGB, greyscale and RGBA."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(37, 41, seed=1)).save(src / "rgb.png")
    Image.fromarray(photo(24, 31, seed=2)[..., 0]).save(src / "grey.png")
    Image.fromarray(photo(29, 50, seed=3, channels=4), "RGBA").save(src / "rgba.png")
    return src


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("size", [(1, 1), (1, 9), (7, 5), (15, 16), (17, 23), (33, 18)])
def test_sizes(tiny_model, scale: int, size: tuple[int, int]) -> None:
    processor = Processor(tiny_model(scale))
    hr = torch.rand(3, *size)
    lr = processor.downscale(hr)
    assert lr.shape == (3, math.ceil(size[0] / scale), math.ceil(size[1] / scale))
    assert torch.equal(lr, quantize(lr))  # on the 8-bit grid
    lr2, rec = processor.roundtrip(hr)
    assert torch.equal(lr2, lr) and rec.shape == hr.shape
    assert processor.upscale(lr).shape == (3, lr.shape[1] * scale, lr.shape[2] * scale)


def test_processor_matches_model_forward(tiny_model) -> None:
    model = tiny_model(4)
    hr = torch.rand(1, 3, 21, 30)
    with torch.inference_mode():
        expected = model(hr).clamp(0, 1)
    assert torch.equal(Processor(model).roundtrip(hr)[1], expected)


@pytest.mark.parametrize("scale", [2, 4])
def test_roundtrip_in_memory_equals_files(tiny_model, folder: Path, tmp_path: Path, scale: int):
    processor = Processor(tiny_model(scale))
    lr_dir, up_dir, rt_dir = tmp_path / "lr", tmp_path / "up", tmp_path / "rt"
    assert all(o.status == "ok" for o in run(DownscaleTask(processor, lr_dir), folder))
    assert all(o.status == "ok" for o in run(UpscaleTask(processor, up_dir), lr_dir))
    assert all(o.status == "ok" for o in run(RoundtripTask(processor, rt_dir), folder))
    for name in ("rgb.png", "grey.png", "rgba.png"):
        source = read_image(folder / name)
        via_files = np.asarray(Image.open(up_dir / name))
        assert via_files.shape[:2] == (source.height, source.width)
        lr, rec = roundtrip_picture(processor, source)
        np.testing.assert_array_equal(to_array(rec.rgb, rec.alpha, 8), via_files)
        np.testing.assert_array_equal(np.asarray(Image.open(rt_dir / "sr" / name)), via_files)
        np.testing.assert_array_equal(
            np.asarray(Image.open(rt_dir / "lr" / name)), np.asarray(Image.open(lr_dir / name))
        )
        assert Image.open(lr_dir / name).size == (lr.width, lr.height)


def test_upscale_without_size_note_gives_full_multiple(tiny_model, tmp_path: Path) -> None:
    Image.fromarray(photo(5, 7)).save(tmp_path / "plain.png")
    out = tmp_path / "out"
    run(UpscaleTask(Processor(tiny_model(4)), out), tmp_path / "plain.png")
    assert Image.open(out / "plain.png").size == (28, 20)


def test_restored_size_checks_scale_and_fit() -> None:
    picture = carcli.imageio.picture_from_array(photo(5, 7))
    picture.text = {SOURCE_SIZE_KEY: "27x19", SCALE_KEY: "4"}
    assert restored_size(picture, 4) == ((19, 27), None)
    size, warning = restored_size(picture, 2)
    assert size is None and "4x" in warning
    picture.text = {SOURCE_SIZE_KEY: "99x99"}
    assert restored_size(picture, 4)[0] is None


def _y(rgb_uint8: np.ndarray) -> np.ndarray:
    rgb = rgb_uint8.astype(np.float64)
    return 16 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255


def _reference_metrics(pred: np.ndarray, target: np.ndarray, shave: int) -> tuple[float, float]:
    a, b = (_y(x)[shave:-shave, shave:-shave] for x in (pred, target))
    psnr = peak_signal_noise_ratio(b, a, data_range=255)
    ssim = structural_similarity(
        b, a, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )
    return psnr, ssim


def test_evaluate_folder_report_matches_independent_metrics(tiny_model, folder: Path) -> None:
    model = tiny_model(4)
    report = evaluate_folder(model, folder)
    assert set(report) == {"scale", "count", "psnr", "ssim", "baselines", "images"}
    assert report["scale"] == 4 and report["count"] == 3
    assert set(report["baselines"]) == {"bicubic"}
    assert [r["file"] for r in report["images"]] == ["grey.png", "rgb.png", "rgba.png"]
    for record in report["images"]:
        assert set(record) == {"file", "psnr", "ssim", "bicubic_psnr", "bicubic_ssim"}
        im = Image.open(folder / record["file"]).convert("RGB")
        target = np.asarray(im)
        hr = torch.from_numpy(target.astype(np.float32) / 255).permute(2, 0, 1)[None]
        with torch.inference_mode():
            rec = model(hr).clamp(0, 1)
        ours = (rec[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        psnr, ssim = _reference_metrics(ours, target, 4)
        assert record["psnr"] == pytest.approx(psnr, abs=0.01)
        assert record["ssim"] == pytest.approx(ssim, abs=1e-3)
        # bicubic: MATLAB's uint8 imresize down to an 8-bit LR, then up (8-bit inputs)
        lr = bicubic_downscale(hr, 4, uint8=True)
        up = bicubic_upscale(lr, 4, size=hr.shape[-2:], uint8=True)
        base = (up[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        psnr, ssim = _reference_metrics(base, target, 4)
        assert record["bicubic_psnr"] == pytest.approx(psnr, abs=0.01)
        assert record["bicubic_ssim"] == pytest.approx(ssim, abs=1e-3)
    images = report["images"]
    assert report["psnr"] == pytest.approx(np.mean([r["psnr"] for r in images]))
    assert report["baselines"]["bicubic"]["ssim"] == pytest.approx(
        np.mean([r["bicubic_ssim"] for r in images])
    )


def test_evaluate_folder_caches_bicubic_and_restores_model(
    tiny_model, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tiny_model(2)
    model.train()
    tasks._BICUBIC_CACHE.clear()
    calls = []
    original = tasks.bicubic_roundtrip
    monkeypatch.setattr(
        tasks, "bicubic_roundtrip", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    first = evaluate_folder(model, folder, recursive=True)
    assert len(calls) == 3 and model.training  # mode restored
    second = evaluate_folder(model, folder)
    assert len(calls) == 3 and first == second
    model.eval()
    bare = evaluate_folder(model, folder, compare_bicubic=False)
    assert "baselines" not in bare and set(bare["images"][0]) == {"file", "psnr", "ssim"}


def test_16bit_roundtrip_keeps_16_bits(tiny_model, tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 65536, (19, 22), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.png"), array)
    out = tmp_path / "out"
    outcomes = run(RoundtripTask(Processor(tiny_model(2)), out), tmp_path / "deep.png")
    assert outcomes[0].status == "ok"
    assert read_image(out / "sr" / "deep.png").bits == 16
    assert read_image(out / "lr" / "deep.png").bits == 8


def test_tiny_images_are_processed_without_metrics(tiny_model, tmp_path: Path) -> None:
    Image.fromarray(photo(1, 1)).save(tmp_path / "dot.png")
    report = evaluate_folder(tiny_model(4), tmp_path)
    assert report["count"] == 1 and report["images"][0]["psnr"] is None
    assert report["psnr"] is None


def test_name_clash_and_input_overwrite_fail_up_front(tiny_model, tmp_path: Path) -> None:
    Image.fromarray(photo(8, 8)).save(tmp_path / "a.png")
    Image.fromarray(photo(8, 8)).save(tmp_path / "a.bmp")
    task = DownscaleTask(Processor(tiny_model(4)), tmp_path / "out")
    items = make_items(task, collect_inputs(tmp_path))
    assert [bool(i.error) for i in items] == [False, True]
    task = DownscaleTask(Processor(tiny_model(4)), tmp_path)  # would write a.png over a.png
    assert "input" in make_items(task, collect_inputs(tmp_path))[1].error


def test_path_checks(tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    with pytest.raises(UsageError, match="same as INPUT"):
        check_paths(src, src, False)
    with pytest.raises(UsageError, match="inside INPUT"):
        check_paths(src, src / "sub", True)
    check_paths(src, src / "sub", False)  # not re-read without --recursive
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert output_target(image, tmp_path / "y.webp", None) == (
        None,
        tmp_path / "y.webp",
        "webp",
    )
    assert output_target(image, tmp_path / "outdir", None) == (
        tmp_path / "outdir",
        None,
        "png",
    )
    with pytest.raises(UsageError, match="contradicts"):
        output_target(image, tmp_path / "y.png", "webp")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(UsageError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            resolve_device("cuda:0")


def test_python_api_returns_the_same_kind(tiny_ckpt) -> None:
    weights = tiny_ckpt(4)
    rgb = photo(21, 30)

    pil = Image.fromarray(rgb)
    small = carcli.downscale(pil, scale=4, weights=weights, device="cpu")
    assert isinstance(small, Image.Image) and small.size == (8, 6)
    back = carcli.upscale(small, scale=4, weights=weights, device="cpu")
    assert isinstance(back, Image.Image) and back.size == (30, 21)  # size note travels along
    same = carcli.roundtrip(pil, scale=4, weights=weights, device="cpu")
    np.testing.assert_array_equal(np.asarray(same), np.asarray(back))

    small = carcli.downscale(rgb, scale=4, weights=weights, device="cpu")
    assert small.dtype == np.uint8 and small.shape == (6, 8, 3)
    assert carcli.upscale(small, scale=4, weights=weights, device="cpu").shape == (24, 32, 3)
    deep = rgb.astype(np.uint16) * 257
    out = carcli.roundtrip(deep, scale=4, weights=weights, device="cpu")
    assert out.dtype == np.uint16 and out.shape == deep.shape

    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    small = carcli.downscale(tensor, scale=4, weights=weights, device="cpu")
    assert small.shape == (3, 6, 8) and torch.equal(small, quantize(small))
    assert carcli.roundtrip(tensor, scale=4, weights=weights, device="cpu").shape == tensor.shape

    model = carcli.load_model(weights, 4)[0]
    assert carcli.downscale(rgb, scale=4, weights=model).shape == (6, 8, 3)
    with pytest.raises(TypeError):
        carcli.downscale("not an image", weights=weights)
