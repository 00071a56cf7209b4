"""SIGTERM and SIGHUP in the middle of a batch end it like Ctrl-C (issue 37, F10).

A real process is started and signalled once its first output exists: it must
say how to resume, exit 128 + N, leave no temp file, and the same command run
again must finish the batch, skipping what was done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from carcli.cli import app

REPO = Path(__file__).resolve().parents[1]
COUNT = 40  # enough images that the batch is still running when the signal arrives

pytestmark = [
    pytest.mark.skipif(os.name != "posix", reason="POSIX signals"),
    pytest.mark.slow,  # a real process per signal (torch import)
]


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("signals") / "in"
    folder.mkdir()
    rng = np.random.default_rng(10)
    for i in range(COUNT):
        pixels = rng.integers(0, 256, (96, 112, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png", compress_level=0)
    return folder


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".carcli-tmp-" in p.name] if root.exists() else []


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_signal_mid_batch_stops_cleanly_and_resumes(
    batch: Path, tmp_path: Path, tiny_weights, sig: str
) -> None:
    signum = getattr(signal, sig)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO), CARCLI_WEIGHTS=str(tiny_weights))
    env.pop("CARCLI_DEBUG", None)
    args = [sys.executable, "-m", "carcli", "downscale", str(batch), str(out), "--threads", "1"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 180
        while not pngs(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"finished before the signal: {proc.stderr.read()}"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert f"interrupted by {sig}: finished outputs are complete; run the same command " in stderr
    done = pngs(out)
    assert 1 <= len(done) < COUNT, f"{len(done)} of {COUNT} written before {sig}"
    assert temp_files(out) == []
    for name in done:  # every output that exists is complete
        with Image.open(out / name) as im:
            im.load()
            assert im.size == (28, 24)

    result = CliRunner().invoke(app, ["downscale", str(batch), str(out), "-w", str(tiny_weights)])
    assert result.exit_code == 0, result.output
    assert f"{len(done)} skipped" in result.stderr
    assert pngs(out) == pngs(batch) and temp_files(out) == []


def test_a_closed_terminal_stops_training_with_its_state_saved(tmp_path: Path) -> None:
    """Found while looking for more: `car train` saved its state on SIGINT and SIGTERM,
    but a SIGHUP (the terminal or SSH session closing) killed it, losing every step
    since the last periodic save."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(11)
    for i in range(2):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(data / f"{i}.png")
    run = tmp_path / "run"
    args = [sys.executable, "-m", "carcli", "train", "--data", str(data), "--val", str(data)]
    args += ["--run", str(run), "--config", "tiny", "--scale", "2", "--steps", "100000"]
    args += ["--batch", "2", "--patch", "16", "--precision", "fp32", "--val-every", "0"]
    args += ["--log-every", "1", "--threads", "1", "-q"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        log = run / "log.jsonl"
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            if log.exists() and len(log.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGHUP)
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGHUP, stderr
    assert "interrupted by SIGHUP: state saved at step" in stderr
    import torch

    state = torch.load(run / "state.pt", weights_only=True)
    assert state["step"] >= 3
