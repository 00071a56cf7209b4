"""The GPU burst script, dry-run on the CPU with a few steps (the device itself is lent rarely)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from carcli.checkpoints import load_model

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_burst.sh"


@pytest.mark.slow
@pytest.mark.parametrize("chosen", ["fast", None])  # None: the default, the cheap design
def test_gpu_burst_dry_run_on_the_cpu_writes_small_v2_checkpoints(
    tmp_path: Path, chosen: str | None
) -> None:
    design = chosen or "cheap"
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    rng = np.random.default_rng(7)
    crops = tmp_path / "crops"
    crops.mkdir()
    for i in range(3):
        coarse = (rng.random((20, 20, 3)) * 255).astype(np.uint8)
        Image.fromarray(coarse).resize((160, 160), Image.BICUBIC).save(crops / f"{i}.png")
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OUT=str(out),
        BURST_DEVICE="cpu",
        BURST_STEPS="2",
        BURST_BATCH="2",
        BURST_SKIP_OP="1",
        BURST_CROPS=str(crops),
        BURST_RUNS=str(tmp_path / "runs"),
        BURST_DESIGN=chosen or "",  # empty: the script's default
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    done = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for scale in (4, 2):
        path = out / f"{design}_x{scale}.safetensors"
        assert path.stat().st_size < 16 * 2**20  # what the device tool brings back
        model, meta = load_model(path, scale)
        assert model.config.sr.arch == "rep" and meta["steps"] == 2
        resampler = model.config.resampler
        # both start from the shipped pair; cheap grafts its resampler onto one shared head
        assert resampler.head == ("shared" if design == "cheap" else "separate")
        assert resampler.head_kernel == 3
        assert resampler.offsets == (design == "fast" or scale == 2)
        assert Path(meta["recipe"]["init"]).name == f"car_x{scale}.safetensors"
        # the student's SR network started from the bundled generic upscaler's
        assert Path(meta["recipe"]["init_sr"]).name == f"car_generic_x{scale}.safetensors"
    assert "done" in (out / "burst.log").read_text()
