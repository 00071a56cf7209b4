"""The shipped generic upscalers on the SR literature's benchmark LR files (issue 35, item 5).

`car upscale` of MATLAB-bicubic LR images (no carcli note) must pick the installed generic
upscaler, say so, and beat bicubic by the issue's margins: Set5 >= 31.0 dB at 4x and
>= 37.0 dB at 2x (Y-PSNR, shave = scale, the benchmark convention).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from carcli.bundled import weights_path
from carcli.checkpoints import generic_name, read_metadata
from carcli.cli import app
from carcli.metrics import measure

# (scale, the target on Set5, MATLAB bicubic's own score on the same files)
TARGETS = [(2, 37.0, 33.67), (4, 31.0, 28.43)]


def _rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(255.0)


@pytest.mark.parametrize("scale,target,bicubic", TARGETS)
def test_shipped_generic_file_is_sr_only_and_marked(
    scale: int, target: float, bicubic: float
) -> None:
    path = weights_path() / generic_name(scale)
    assert path.is_file(), f"{path} is not installed"
    meta = read_metadata(path)
    assert meta["role"] == "generic-sr" and meta["scale"] == scale
    assert path.stat().st_size < 2 * 2**20  # SR network only, float16: every byte stays in git


@pytest.mark.parametrize("scale,target,bicubic", TARGETS)
def test_car_upscale_of_benchmark_lr_uses_the_generic_upscaler(
    datasets_dir: Path, tmp_path: Path, scale: int, target: float, bicubic: float
) -> None:
    lr_dir = datasets_dir / "val" / "Set5_LR_matlab" / f"x{scale}"
    result = CliRunner().invoke(
        app, ["upscale", str(lr_dir), str(tmp_path), "-s", str(scale), "--threads", "2"]
    )
    assert result.exit_code == 0, result.output
    assert f"using the generic upscaler {weights_path() / generic_name(scale)}" in result.stderr
    scores = []
    for hr_path in sorted((datasets_dir / "val" / "Set5").glob("*.png")):
        hr = _rgb(hr_path)
        sr = _rgb(tmp_path / hr_path.name)
        assert sr.shape[-2:] == (hr.shape[-2] // scale * scale, hr.shape[-1] // scale * scale)
        hr = hr[:, : sr.shape[-2], : sr.shape[-1]]
        scores.append(measure(sr[None], hr[None], scale)[0])
    psnr = float(np.mean(scores))
    print(f"Set5 x{scale}: car upscale (generic) {psnr:.3f} dB, bicubic {bicubic} dB")
    assert psnr >= target
    assert psnr >= bicubic + 2.0
