"""One run policy: the CLI, the API and training pick device, precision and threads alike."""

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
from carcli import runpolicy
from carcli.cli import app
from carcli.engine import build_processor
from carcli.imageio import read_image
from carcli.metrics import measure
from carcli.models import CARModel, preset
from carcli.runpolicy import RunPolicy
from carcli.train.trainer import TrainConfig


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_cli_and_api_roundtrip_give_identical_results(
    tmp_path: Path, tiny_ckpt, precision: str
) -> None:
    """`car roundtrip` and carcli.roundtrip() with the same options: same pixels, same PSNR."""
    source = tmp_path / "in" / "photo.png"
    source.parent.mkdir()
    Image.fromarray(photo(45, 61, seed=3)).save(source)
    weights = tiny_ckpt(4)
    options = ["--scale", "4", "--weights", str(weights), "--precision", precision]
    result = CliRunner().invoke(
        app,
        ["roundtrip", str(source), "-o", str(tmp_path / "out"), *options, "--threads", "1"]
        + ["--json", str(tmp_path / "r.json"), "-q"],
    )
    assert result.exit_code == 0, result.output
    via_cli = np.asarray(Image.open(tmp_path / "out" / "sr" / "photo.png"))
    report = json.loads((tmp_path / "r.json").read_text())

    image = Image.open(source)
    via_api = np.asarray(
        carcli.roundtrip(image, scale=4, weights=weights, precision=precision, threads=1)
    )
    np.testing.assert_array_equal(via_api, via_cli)
    rgb = torch.from_numpy(via_api.astype(np.float32) / 255).permute(2, 0, 1)
    psnr, _ = measure(rgb, read_image(source).rgb, 4)
    assert psnr == pytest.approx(report["psnr"], abs=1e-9)


@pytest.mark.parametrize("native", [False, True])
def test_train_config_defaults_follow_the_cpu(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """A library user's TrainConfig gets no emulated bf16 (10-14x slower) on a plain AVX2 CPU."""
    monkeypatch.setattr(runpolicy, "cpu_has_bf16", lambda: native)
    cpu = torch.device("cpu")
    cfg = TrainConfig(scale=2, data=[], val=[])
    resolved = cfg.resolved(cpu)
    assert (resolved.precision, resolved.channels_last) == (
        ("bf16", True) if native else ("fp32", False)
    )
    assert resolved.resolved(cpu) == resolved  # resolving a resolved config changes nothing
    explicit = TrainConfig(scale=2, data=[], val=[], precision="bf16", channels_last=False)
    assert explicit.resolved(cpu).channels_last is False


def test_build_processor_applies_the_policy() -> None:
    """Threads as asked (or left alone with "keep"), precision resolved, weights channels-last."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        model = CARModel(preset("tiny", 2))
        processor = build_processor(model, RunPolicy("cpu", "fp32", threads=2))
        assert torch.get_num_threads() == 2 and processor.precision == "fp32"
        conv = model.sr.head[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last)
        build_processor(model, RunPolicy("cpu", "auto", threads="keep", channels_last=False))
        assert torch.get_num_threads() == 2
        expected = "bf16" if runpolicy.cpu_has_bf16() else "fp32"
        assert build_processor(model, RunPolicy("cpu", threads="keep")).precision == expected
    finally:
        torch.set_num_threads(before)
