"""`car average`: uniform weight averaging of checkpoints (model soups)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image
from typer.testing import CliRunner

from carcli.checkpoints import WeightsError, load_checkpoint, save_checkpoint
from carcli.cli import app
from carcli.models import CARModel, preset
from carcli.train.average import average_checkpoints

# The checkpoints are random (global generators): seeded per test and printed.
pytestmark = pytest.mark.usefixtures("seed")


def _random_checkpoints(folder: Path, count: int, scale: int = 2, name: str = "tiny") -> list:
    """``count`` differently initialised checkpoints, each with its own metadata."""
    paths = []
    for i in range(count):
        model = CARModel(preset(name, scale))
        with torch.no_grad():  # move every weight, so no tensor is equal across files
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        path = folder / f"m{i}.safetensors"
        meta = {"steps": 100 * (i + 1), "training_data": ["train/"], "source": f"run {i}"}
        meta["cpu_timing"] = {"image": "1632x1224", "fp32": {"roundtrip_s": 3.0 + i}}
        save_checkpoint(model, path, meta)
        paths.append(path)
    return paths


@pytest.mark.slow
def test_average_is_the_mean_of_every_tensor(tmp_path: Path):
    paths = _random_checkpoints(tmp_path, 3)
    states = [load_checkpoint(p)[0].state_dict() for p in paths]
    model, meta = average_checkpoints(paths)
    for key, value in model.state_dict().items():
        expected = (states[0][key].double() + states[1][key] + states[2][key]) / 3
        torch.testing.assert_close(value, expected.float(), rtol=0, atol=1e-7)
    # Order does not matter (float64 sums), and averaging one file with itself is that file.
    reordered, _ = average_checkpoints(paths[::-1])
    for key, value in model.state_dict().items():
        assert torch.equal(value, reordered.state_dict()[key]), key
    same, _ = average_checkpoints([paths[0], paths[0]])
    for key, value in same.state_dict().items():
        assert torch.equal(value, states[0][key]), key

    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    ingredients = meta["recipe"]["ingredients"]
    assert [i["sha256"] for i in ingredients] == digests
    assert [i["steps"] for i in ingredients] == [100, 200, 300]
    assert meta["training_data"] == ["train/"] and "validation" not in meta
    assert meta["parameters"] == model.parameter_counts()
    # The network's cost does not depend on its weights: the last ingredient's timing is kept.
    assert meta["cpu_timing"]["fp32"]["roundtrip_s"] == 5.0


def test_average_refuses_mixed_architectures_and_single_files(tmp_path: Path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (a,) = _random_checkpoints(tmp_path / "a", 1, scale=2)
    (b,) = _random_checkpoints(tmp_path / "b", 1, scale=4)
    with pytest.raises(WeightsError, match=r"b/m0\.safetensors is a different network"):
        average_checkpoints([a, b])
    with pytest.raises(WeightsError, match="at least two"):
        average_checkpoints([a])
    with pytest.raises(WeightsError, match="does not exist"):
        average_checkpoints([a, tmp_path / "missing.safetensors"])


@pytest.mark.slow
def test_car_average_command(tmp_path: Path, seed: int):
    paths = _random_checkpoints(tmp_path, 2, scale=2)
    val = tmp_path / "val"
    val.mkdir()
    Image.fromarray(photo(30, 42, seed=int(np.random.default_rng(seed).integers(1 << 30)))).save(
        val / "v.png"
    )
    out = tmp_path / "avg.safetensors"
    invoke = CliRunner().invoke
    args = ["average", *map(str, paths), "-o", str(out), "--val", str(val), "--no-timing"]
    result = invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    model, meta = load_checkpoint(out)
    assert summary["ingredients"] == 2 and model.scale == 2
    # The recorded validation is the averaged model's own round trip, as `car roundtrip`
    # measures it in fp32 (to 1e-3 dB; for one seed they differed by 4e-5 dB). The
    # weights are random, so the figure itself can be anything (it was 9.79 dB for one seed).
    psnr = meta["validation"]["val"]["psnr"]
    assert psnr == summary["validation"]["val"]["psnr"] and math.isfinite(psnr)
    measured = invoke(
        app,
        [
            "roundtrip",
            str(val),
            "-s",
            "2",
            "-w",
            str(out),
            "-q",
            "--json",
            "-",
            "--precision",
            "fp32",
        ],
    )
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.stdout)["psnr"] == pytest.approx(psnr, abs=1e-3)
    assert meta["source"] == "carcli average of 2 checkpoints"

    # An existing output is kept unless --overwrite; usage errors are one line and exit 2.
    before = out.read_bytes()
    result = invoke(app, args)
    assert result.exit_code == 2 and "exists" in result.stderr and out.read_bytes() == before
    missing = tmp_path / "nope.safetensors"
    result = invoke(app, ["average", str(paths[0]), str(missing), "-o", str(tmp_path / "x.st")])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "nope.safetensors does not exist" in result.stderr
    assert not (tmp_path / "x.st").exists()
