"""`car train` setup mistakes: one line and exit 2 before any step; damaged data; no lost state.

Issue 37, findings F4 (setup errors printed tracebacks with exit 1), F5 (one damaged
training image aborted the run) and F6 (a missing --val folder surfaced after all the
training and took the unsaved state with it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_error as one_error
from PIL import Image
from typer.testing import CliRunner

from carcli.cli import app

runner = CliRunner()
pytestmark = pytest.mark.slow  # short training runs


def car(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.fixture
def val(tmp_path: Path) -> Path:
    folder = tmp_path / "val"
    folder.mkdir()
    pixels = np.random.default_rng(6).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "v.png")
    return folder


def train(data: Path, run: Path, *extra: str | Path, val: Path | None = None):
    val = val or data
    args = ["train", "--data", data, "--val", val, "--run", run, "--config", "tiny", "--scale", "2"]
    args += ["--steps", "2", "--batch", "2", "--patch", "16", "--precision", "fp32"]
    args += ["--val-every", "0", "--ema", "0", "-q", *extra]
    return car(*args)


def test_setup_mistakes_are_one_line_and_exit_2(
    data: Path, val: Path, tmp_path: Path, tiny_ckpt
) -> None:
    """F4: each of these printed a full traceback and exited 1."""
    run = tmp_path / "run"
    one_error(train(tmp_path / "nope", run), 2, "--data", "nope", "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error(train(empty, run), 2, "--data", "no images")
    one_error(train(data, run, "--patch", "64"), 2, "64x64")
    afile = tmp_path / "afile"
    afile.write_text("x")
    one_error(train(data, afile), 2, "--run", "not a folder")
    one_error(train(data, run, "--init", tmp_path / "missing.safetensors"), 2, "missing")
    one_error(train(data, run, "--init", data / "0.png"), 2, "0.png", "not a safetensors file")
    one_error(train(data, run, "--init", tiny_ckpt(4)), 2, "4x weights, but 2x")
    if not torch.cuda.is_available():
        one_error(train(data, run, "--device", "cuda"), 2, "CUDA is not available")
    assert not (run / "state.pt").exists()


@pytest.mark.parametrize("kind", ["garbage", "malicious", "foreign", "truncated"])
def test_resume_from_a_bad_state_is_one_line(data: Path, tmp_path: Path, kind: str) -> None:
    """F4: a garbage or malicious state.pt on --resume gave a traceback (or unsafe advice)."""
    run = tmp_path / "run"
    assert train(data, run).exit_code == 0
    state = run / "state.pt"
    good = state.read_bytes()
    marker = tmp_path / "PWNED"
    if kind == "garbage":
        state.write_bytes(np.random.default_rng(1).bytes(2000))
    elif kind == "malicious":

        class Evil:
            def __reduce__(self):  # noqa: ANN204
                return (os.system, (f"touch {marker}",))

        torch.save({"config": Evil()}, state)
    elif kind == "foreign":
        torch.save({"config": {"scale": 2}, "model": [1, 2]}, state)
    else:
        state.write_bytes(good[: len(good) // 2])
    result = train(data, run, "--resume", "--steps", "4")
    one_error(result, 2, "state.pt")
    assert "weights_only" not in result.output and not marker.exists()


def test_damaged_training_images_are_skipped_with_a_note(data: Path, tmp_path: Path) -> None:
    """F5: one truncated or empty image aborted `car train` with a traceback naming no file."""
    good = (data / "0.png").read_bytes()
    (data / "cut.png").write_bytes(good[: len(good) // 3])
    (data / "empty.jpg").write_bytes(b"")
    (data / "text.png").write_text("not an image")
    run = tmp_path / "run"
    args = ["train", "--data", data, "--val", data, "--run", run, "--config", "tiny"]
    args += ["--scale", "2", "--steps", "2", "--batch", "2", "--patch", "16"]
    result = car(*args, "--precision", "fp32", "--val-every", "0", "--ema", "0")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: skipped")]
    for name in ("cut.png", "empty.jpg", "text.png"):
        assert sum(name in line for line in notes) == 1, result.stderr
    assert (run / "state.pt").exists()
    # Nothing readable at all: one line, exit 2.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(good[:40])
    one_error(train(bad, tmp_path / "run2"), 2, "no readable training image")


def test_missing_val_folder_is_refused_before_the_first_step(
    data: Path, val: Path, tmp_path: Path
) -> None:
    """F6: a missing --val folder was noticed only at the end, in validation."""
    run = tmp_path / "run"
    result = train(data, run, "--val", tmp_path / "nope", "--val-every", "1", val=val)
    one_error(result, 2, "--val", "nope", "no such folder")
    assert not (run / "state.pt").exists() and not (run / "log.jsonl").exists()


def test_a_failed_validation_keeps_the_trained_state(data: Path, tmp_path: Path) -> None:
    """F6: a crash in validation lost every step trained since the last save."""
    val = tmp_path / "val"
    val.mkdir()
    (val / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)  # named like an image
    run = tmp_path / "run"
    result = train(data, run, "--val-every", "2", "--steps", "3", val=val)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines[0].startswith("error: broken.png: "), lines  # the file, named once
    assert "validation at step 2" in lines[1] and "state saved at step 2" in lines[1]
    assert "--resume" in lines[1] and len(lines) == 2
    saved = torch.load(run / "state.pt", weights_only=True)
    assert saved["step"] == 2
