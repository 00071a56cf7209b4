"""`car export-onnx`: both networks as ONNX graphs that ONNX Runtime runs as PyTorch does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from carcli.cli import app
from carcli.models.quantize import quantize

pytestmark = pytest.mark.slow  # ONNX export and ONNX Runtime

SAMPLES = Path(__file__).resolve().parents[1] / "carcli" / "samples"


def _needs_onnx() -> None:
    for module in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(module, reason=f"{module} not installed (pip install 'carcli[onnx]')")


def car(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_shipped_2x_weights_run_in_onnxruntime(tmp_path: Path) -> None:
    """The real 2x pair: the SR graph at sizes and batch other than the export example's
    (dynamic axes), the resampler graph on a crop of a sample photo at its fixed tile."""
    _needs_onnx()
    import onnx
    import onnxruntime

    from carcli.checkpoints import load_model
    from carcli.export_onnx import export_onnx

    model, _ = load_model(None, 2)
    results = export_onnx(model, tmp_path, tile=64, metadata={"weights_sha256": "abc"})
    sr_path, down_path = (r.path for r in results)
    assert (sr_path.name, down_path.name) == ("car_x2_sr.onnx", "car_x2_resampler_64.onnx")
    for entry in results:  # export_onnx's own check ran, on a random input
        print(f"{entry.network}: max |diff| {entry.max_abs_error:.3g}, mismatch {entry.mismatch}")
        assert entry.max_abs_error is not None and entry.max_abs_error <= 1 / 255 + 1e-6
    graph = onnx.load(str(sr_path))
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["scale"] == "2" and meta["network"] == "sr" and meta["weights_sha256"] == "abc"
    # EDSR's tail as inference runs it: one 5x5 conv at LR to 3 s^2 channels (FusedTail;
    # the upsampler's layers remain for the edge strips only).
    assert (12, 64, 5, 5) in {tuple(t.dims) for t in graph.graph.initializer}

    seed = 39
    print(f"seed {seed}")
    generator = torch.Generator().manual_seed(seed)
    sr = onnxruntime.InferenceSession(str(sr_path), providers=["CPUExecutionProvider"])
    for shape in ((1, 3, 17, 23), (3, 3, 40, 31), (1, 3, 2, 2), (2, 3, 5, 4)):
        lr = torch.rand(*shape, generator=generator)
        (out,) = sr.run(None, {"lr": lr.numpy()})
        with torch.no_grad():
            ref = model.upscale(lr)
        assert out.shape == (shape[0], 3, shape[2] * 2, shape[3] * 2)
        err = float(np.abs(out - ref.numpy()).max())
        print(f"SR {shape}: max |ONNX Runtime - PyTorch| = {err:.3g}")
        assert err < 1e-4

    rgb = np.asarray(Image.open(SAMPLES / "chelsea.png").convert("RGB"))[100:164, 120:184]
    hr = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255
    down = onnxruntime.InferenceSession(str(down_path), providers=["CPUExecutionProvider"])
    (lr_onnx,) = down.run(None, {"hr": hr.numpy()})
    with torch.no_grad():
        lr_torch = quantize(model.downscale(hr)).numpy()
    assert lr_onnx.shape == lr_torch.shape == (1, 3, 32, 32)
    levels = np.abs(np.round(lr_onnx * 255) - np.round(lr_torch * 255))
    print(f"resampler: {(levels > 0).mean():.4%} of LR samples differ, by at most {levels.max()}")
    assert np.array_equal(np.round(lr_onnx * 255), lr_onnx * 255)  # on the 8-bit grid
    assert levels.max() <= 1 and (levels > 0).mean() < 0.002  # rounding ties only
    with pytest.raises(Exception, match="(?i)dim|shape|dimension"):  # the tile size is fixed
        down.run(None, {"hr": np.zeros((1, 3, 48, 64), np.float32)})


def test_cli_writes_both_graphs_and_keeps_existing(tiny_weights: Path, tmp_path: Path) -> None:
    _needs_onnx()
    out = tmp_path / "onnx"
    result = car("export-onnx", out, "-s", "4", "-w", tiny_weights, "--tile", "32")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["car_x4_resampler_32.onnx", "car_x4_sr.onnx"]
    assert "ONNX Runtime vs PyTorch" in result.stderr
    before = (out / "car_x4_sr.onnx").stat().st_mtime_ns
    result = car("export-onnx", out, "-s", "4", "-w", tiny_weights, "--tile", "32")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "car_x4_sr.onnx").stat().st_mtime_ns == before
    result = car("export-onnx", out, "-s", "4", "-w", tiny_weights, "--tile", "32", "--overwrite")
    assert result.exit_code == 0, result.output


def test_cli_usage_errors(
    tiny_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = car("export-onnx", tmp_path, "-s", "4", "-w", tiny_weights, "--tile", "36")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: --tile must be a multiple of 8 and at least 16, got 36"
    ]
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the extra were not installed
    result = car("export-onnx", tmp_path, "-s", "4", "-w", tiny_weights)
    assert result.exit_code == 2 and "carcli[onnx]" in result.stderr
    assert "Traceback" not in result.output


def test_a_resampler_without_offsets_exports_with_its_fixed_tap_op(tmp_path: Path) -> None:
    """offsets: false takes the op's fixed-tap path, which must export as well."""
    _needs_onnx()
    from dataclasses import replace

    from carcli.export_onnx import export_onnx
    from carcli.models import CARModel, preset

    torch.manual_seed(41)
    tiny = preset("tiny", 4)
    config = replace(tiny, resampler=replace(tiny.resampler, head="shared", offsets=False))
    results = export_onnx(CARModel(config).eval(), tmp_path, tile=64)
    for entry in results:  # export_onnx's own check against PyTorch
        print(f"{entry.network}: max |diff| {entry.max_abs_error:.3g}, mismatch {entry.mismatch}")
        assert entry.max_abs_error is not None and entry.max_abs_error <= 1 / 255 + 1e-6
