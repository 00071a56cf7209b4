"""Hostile and damaged weights: one line and exit 2, no code run, nothing allocated from a lie.

Issue 37, findings F3 (config metadata trusted), F7 (export from a bad state.pt),
F8 (NaN/Inf weights), F15 (average over its own input), F17 (CARCLI_WEIGHTS naming a
file, torch's advice to load unsafely, exit codes of export/average).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_error
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import carcli.checkpoints as ck
from carcli.cli import app

runner = CliRunner()


def car(*args: str | Path, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(37)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(
            folder / f"{name}.png"
        )
    return folder


def rewrite(
    src: Path,
    dst: Path,
    config: Callable[[dict], None] | None = None,
    tensors: Callable[[dict], None] | None = None,
) -> Path:
    """A copy of a checkpoint with its config metadata and/or tensors edited."""
    state = load_file(src)
    with safe_open(str(src), "pt") as handle:
        meta = dict(handle.metadata())
    cfg = json.loads(meta["config"])
    if config:
        config(cfg)
    meta["config"] = json.dumps(cfg)
    if tensors:
        tensors(state)
    save_file(state, str(dst), metadata=meta)
    return dst


def _set(section: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda cfg: cfg[section].__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_set("sr", "features", -3), "sr.features must be between 1 and"),
        (_set("sr", "features", "wide"), "sr.features must be a whole number"),
        (_set("sr", "blocks", 2.5), "sr.blocks must be a whole number"),
        (_set("resampler", "c1", True), "resampler.c1 must be a whole number"),
        (_set("sr", "res_scale", "x"), "sr.res_scale must be a number"),
        (_set("sr", "res_scale", float("nan")), "sr.res_scale must be in"),
        (_set("sr", "features", 100_000), "sr.features must be between 1 and"),
        (lambda cfg: cfg.__setitem__("sr", [1, 2]), "sr must be a mapping"),
        (lambda cfg: cfg.__setitem__("scale", "4"), "scale must be a whole number"),
    ],
)
def test_invalid_config_metadata_is_one_line(
    tiny_ckpt, images: Path, tmp_path: Path, edit, needle: str
) -> None:
    """F3: a negative or string width used to end in a torch traceback."""
    bad = rewrite(tiny_ckpt(4), tmp_path / "bad.safetensors", config=edit)
    result = car("roundtrip", images, "-w", bad, "-q")
    assert_one_error(result, 2, str(bad), "invalid model config", needle)


@pytest.mark.slow
def test_config_claiming_a_huge_network_is_refused_before_allocating(
    tiny_ckpt, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F3: a small file whose config claims a huge EDSR: shapes compared before any allocation.

    On the old code this config (4096 features, 1024 blocks: about 1.2 TB of float32)
    was built for real before the shapes were compared; here every real (not meta)
    construction of a network other than the tiny one fails the test.
    """
    big = rewrite(
        tiny_ckpt(4),
        tmp_path / "big.safetensors",
        config=lambda cfg: cfg["sr"].update(features=4096, blocks=1024),
    )
    real = ck.CARModel

    def guarded(config):  # noqa: ANN001, ANN202
        if torch.get_default_device().type != "meta":
            assert config.sr.features == 16, "a network was allocated from an unchecked config"
        return real(config)

    monkeypatch.setattr(ck, "CARModel", guarded)
    result = car("downscale", images, tmp_path / "out", "-w", big, "-q")
    line = assert_one_error(result, 2, str(big), "does not match", "shape mismatch")
    assert "file (16, 3, 3, 3), model (4096, 3, 3, 3)" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_at_load(
    tiny_ckpt, images: Path, tmp_path: Path, value: float
) -> None:
    """F8: NaN/Inf weights gave black images, 'nan dB' and exit 0."""

    def poison(state: dict) -> None:
        key = "sr.tail.1.weight"
        state[key] = state[key].clone()
        state[key].view(-1)[3] = value

    bad = rewrite(tiny_ckpt(4), tmp_path / "nan.safetensors", tensors=poison)
    result = car("roundtrip", images, "-w", bad)
    assert_one_error(result, 2, str(bad), "NaN or infinite", "sr.tail.1.weight")
    assert "nan" not in result.stdout
    result = car("upscale", images, tmp_path / "up", "-w", bad)
    assert_one_error(result, 2, "NaN or infinite")
    assert not (tmp_path / "up").exists()
    # car average used to average a NaN checkpoint into its output.
    out = tmp_path / "avg.safetensors"
    result = car("average", tiny_ckpt(4), bad, "-o", out, "--no-timing")
    assert_one_error(result, 2, "NaN or infinite")
    assert not out.exists()


class Evil:
    """Unpickling this would run a shell command; weights_only loading must refuse it."""

    marker: Path

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def malicious(path: Path, marker: Path, raw: bool = False) -> Path:
    Evil.marker = marker
    if raw:
        path.write_bytes(pickle.dumps({"x": Evil()}, protocol=4))
    else:
        torch.save({"x": Evil()}, path)
    return path


UNSAFE_ADVICE = ("weights_only", "trusted source", "arbitrary code", "Re-running")


@pytest.mark.parametrize("raw", [False, True], ids=["torch-zip", "raw-pickle"])
def test_malicious_pickle_runs_no_code_and_gives_no_unsafe_advice(
    tmp_path: Path, images: Path, raw: bool
) -> None:
    """F17: the refusal repeated torch's advice to load the file with weights_only=False."""
    marker = tmp_path / "PWNED"
    folder = tmp_path / "authors"
    folder.mkdir()
    malicious(folder / "kgn.pth", marker, raw)
    torch.save({"head.0.weight": torch.zeros(1)}, folder / "usn.pth")
    result = car("downscale", images, tmp_path / "out", "-w", folder)
    line = assert_one_error(result, 2, str(folder / "kgn.pth"), "refused")
    for advice in UNSAFE_ADVICE:
        assert advice not in result.output, result.output
    assert "warning" not in result.stderr.lower()  # torch's pickle-protocol UserWarning
    assert not marker.exists()
    if not raw:
        assert "os.system" in line or "posix.system" in line


def _run_folder(tmp_path: Path, state: Path | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    if state is not None:
        state.rename(run / "state.pt")
    return run


@pytest.mark.parametrize("kind", ["malicious", "garbage", "foreign", "empty"])
def test_export_from_a_bad_state_is_one_line(tmp_path: Path, kind: str) -> None:
    """F7: car export from a garbage or malicious state.pt printed a traceback."""
    marker = tmp_path / "PWNED"
    state = tmp_path / "state.pt"
    if kind == "malicious":
        malicious(state, marker)
    elif kind == "garbage":
        state.write_bytes(np.random.default_rng(7).bytes(3000))
    elif kind == "foreign":
        torch.save({"config": {"lr": 1}, "model": {}}, state)
    else:
        state.write_bytes(b"")
    run = _run_folder(tmp_path, state)
    out = tmp_path / "out.safetensors"
    result = car("export", run, out, "--which", "last", "--no-timing")
    assert_one_error(result, 2, "state.pt")
    for advice in UNSAFE_ADVICE:
        assert advice not in result.output
    assert not marker.exists() and not out.exists()


def test_export_usage_errors_exit_2(tmp_path: Path, tiny_ckpt) -> None:
    """F17: export usage errors exited 1; F7: writing below a file gave a traceback."""
    assert_one_error(car("export", tmp_path / "nope", tmp_path / "o.safetensors"), 2, "nope")
    run = _run_folder(tmp_path)
    assert_one_error(car("export", run, tmp_path / "o.safetensors"), 2, "best.safetensors")
    # A run whose best checkpoint exists, exported below a file: one line, exit 1 (a write failure).
    (run / "best.safetensors").write_bytes(tiny_ckpt(2).read_bytes())
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    result = car("export", run, blocker / "x.safetensors", "--no-timing")
    assert_one_error(result, 1, "cannot write", "afile is a file, not a folder")
    # ... and into a folder that does not exist yet: created.
    result = car("export", run, tmp_path / "new" / "sub" / "x.safetensors", "--no-timing")
    assert result.exit_code == 0, result.output
    assert ck.load_checkpoint(tmp_path / "new" / "sub" / "x.safetensors")[0].scale == 2


def test_average_never_replaces_an_input_and_refuses_duplicates(tmp_path: Path, tiny_ckpt) -> None:
    """F15: `car average A B -o A --overwrite` replaced input A; `A A` was accepted silently."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(tiny_ckpt(4).read_bytes())
    torch.manual_seed(1)
    ck.save_checkpoint(ck.CARModel(ck.preset("tiny", 4)), b)
    before = a.read_bytes()
    result = car("average", a, b, "-o", a, "--overwrite", "--no-timing")
    assert_one_error(result, 2, "one of the inputs")
    assert a.read_bytes() == before
    link = tmp_path / "link.safetensors"
    link.symlink_to(a)
    assert_one_error(car("average", a, b, "-o", link, "--overwrite", "--no-timing"), 2, "inputs")
    assert a.read_bytes() == before
    out = tmp_path / "x.safetensors"
    assert_one_error(car("average", a, a, "-o", out, "--no-timing"), 2, "given twice")
    assert_one_error(car("average", a, link, "-o", out, "--no-timing"), 2, "given twice")
    assert not out.exists()
    # F17: usage errors of average exit 2 (they exited 1).
    out.write_bytes(b"keep")
    assert_one_error(car("average", a, b, "-o", out, "--no-timing"), 2, "exists")
    assert out.read_bytes() == b"keep"
    assert_one_error(
        car("average", a, b, "-o", tmp_path / "y.st", "--val", tmp_path / "nope"), 2, "nope"
    )
    assert_one_error(car("average", a, tmp_path / "c.st", "-o", tmp_path / "y.st"), 2, "c.st")
    result = car("average", a, b, "-o", tmp_path / "ok.safetensors", "--no-timing")
    assert result.exit_code == 0, result.output


def test_weights_env_naming_a_file_is_called_out(tmp_path: Path, tiny_ckpt, images: Path) -> None:
    """F17: CARCLI_WEIGHTS=FILE said 'no weights installed ... FILE/car_x4.safetensors'."""
    env = {"CARCLI_WEIGHTS": str(tiny_ckpt(4))}
    result = car("downscale", images, tmp_path / "out", env=env)
    assert_one_error(result, 2, "CARCLI_WEIGHTS", "is a file", "--weights")


def test_export_never_replaces_the_runs_own_files(tmp_path: Path, tiny_ckpt) -> None:
    """Found while fixing F7: `car export RUN RUN/state.pt --which last --overwrite`
    replaced the run's resumable state with an inference checkpoint."""
    run = _run_folder(tmp_path)
    (run / "state.pt").write_bytes(b"the run's state")
    (run / "best.safetensors").write_bytes(tiny_ckpt(2).read_bytes())
    for name, which in (("state.pt", "last"), ("best.safetensors", "best")):
        before = (run / name).read_bytes()
        result = car("export", run, run / name, "--which", which, "--overwrite", "--no-timing")
        assert_one_error(result, 2, f"the run's own {name}")
        assert (run / name).read_bytes() == before


def test_deeply_nested_metadata_is_no_traceback(tmp_path: Path, tiny_ckpt, images: Path) -> None:
    """Found while looking for more: a metadata value nested 100,000 deep made the JSON
    decoder raise RecursionError, a traceback from `car downscale` and `car info`."""
    deep = "[" * 100_000 + "]" * 100_000
    state = load_file(tiny_ckpt(4))
    with safe_open(str(tiny_ckpt(4)), "pt") as handle:
        meta = dict(handle.metadata())
    folder = tmp_path / "w"
    folder.mkdir()
    save_file(state, str(folder / "car_x4.safetensors"), metadata=meta | {"note": deep})
    result = car("downscale", images, tmp_path / "out", "-w", folder, "-q")
    assert result.exit_code == 0, result.output
    result = car("info", env={"CARCLI_WEIGHTS": str(folder)})
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta | {"config": deep})
    assert_one_error(car("downscale", images, tmp_path / "o2", "-w", bad), 2, "no readable model")
