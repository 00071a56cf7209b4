"""The ``car`` command end to end: mixed folders, resume, usage errors, reports, data sets."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import photo
from PIL import Image
from typer.testing import CliRunner

import carcli
from carcli import cli
from carcli.cli import app

runner = CliRunner()


def car(*args: str | Path, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".carcli-tmp-" in p.name]


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """A mixed folder: good, truncated, text-as-JPEG, RGBA, 16-bit grey, 1x1."""
    src = tmp_path / "mixed"
    src.mkdir()
    Image.fromarray(photo(23, 31, seed=1)).save(src / "good.png")
    Image.fromarray(photo(18, 21, seed=2)).save(src / "photo.jpg", quality=92)
    buf = io.BytesIO()
    Image.fromarray(photo(40, 40, seed=3)).save(buf, "PNG")
    (src / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (src / "text.jpg").write_text("I am a text file\n")
    Image.fromarray(photo(17, 26, seed=4, channels=4), "RGBA").save(src / "rgba.png")
    grey16 = (photo(19, 13, seed=5)[..., 0].astype(np.uint16) * 257) + 3
    cv2.imwrite(str(src / "grey16.png"), grey16)
    Image.fromarray(photo(1, 1, seed=6)).save(src / "dot.png")
    (src / "notes.txt").write_text("ignored: not an image name\n")
    return src


GOOD = {"good": (23, 31), "photo": (18, 21), "rgba": (17, 26), "grey16": (19, 13), "dot": (1, 1)}


@pytest.mark.slow
def test_mixed_folder_downscale_upscale_roundtrip(mixed: Path, tmp_path: Path, tiny_weights):
    lr_dir, up_dir, rt_dir = tmp_path / "lr", tmp_path / "up", tmp_path / "rt"
    result = car("downscale", mixed, lr_dir, "-w", tiny_weights, "--json", tmp_path / "d.json")
    assert result.exit_code == 1, result.output
    errors = error_lines(result)
    assert len(errors) == 2, result.stderr
    assert any(e.startswith("error: truncated.png: ") and "truncated" in e for e in errors)
    assert any(e.startswith("error: text.jpg: ") and "not an image" in e for e in errors)
    assert "Traceback" not in result.output
    assert "8-bit by design" in result.stderr  # the one-time note for the 16-bit input
    assert result.stderr.count("8-bit by design") == 1
    for name, (h, w) in GOOD.items():
        im = Image.open(lr_dir / f"{name}.png")
        assert im.size == (-(-w // 4), -(-h // 4)) and im.text["carcli:source-size"] == f"{w}x{h}"
    assert Image.open(lr_dir / "rgba.png").mode == "RGBA"
    assert Image.open(lr_dir / "grey16.png").mode == "RGB"  # 8-bit LR
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["count"] == 5 and {f["file"] for f in report["failed"]} == {
        "truncated.png",
        "text.jpg",
    }

    result = car("upscale", lr_dir, up_dir, "-w", tiny_weights)
    assert result.exit_code == 0, result.output
    for name, (h, w) in GOOD.items():
        assert Image.open(up_dir / f"{name}.png").size == (w, h)  # exact original size
    assert Image.open(up_dir / "rgba.png").mode == "RGBA"

    result = car(
        "roundtrip", mixed, "-o", rt_dir, "-w", tiny_weights, "--json", tmp_path / "r.json"
    )
    assert result.exit_code == 1 and len(error_lines(result)) == 2
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["count"] == 5
    deep = cv2.imread(str(rt_dir / "sr" / "grey16.png"), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint16 and deep.shape[:2] == (19, 13)
    assert Image.open(rt_dir / "sr" / "rgba.png").mode == "RGBA"
    for name in set(GOOD) - {"grey16"}:  # 8-bit inputs: in memory == through files
        np.testing.assert_array_equal(
            np.asarray(Image.open(rt_dir / "sr" / f"{name}.png")),
            np.asarray(Image.open(up_dir / f"{name}.png")),
        )
    assert temp_files(tmp_path) == []


def test_resume_skips_existing_and_overwrite_replaces(tmp_path: Path, tiny_weights) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo(12, 9, seed=i)).save(src / f"{i}.png")
    assert car("downscale", src, out, "-w", tiny_weights, "-s", "2").exit_code == 0
    (out / "1.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = car("downscale", src, out, "-w", tiny_weights, "-s", "2")
    assert result.exit_code == 0
    assert "2 skipped" in result.stderr and "--overwrite" in result.stderr
    assert {p.name for p in out.iterdir()} == {"0.png", "1.png", "2.png"}
    assert all((out / n).stat().st_mtime_ns == t for n, t in before.items())
    result = car("downscale", src, out, "-w", tiny_weights, "-s", "2", "--overwrite")
    assert result.exit_code == 0 and "skipped" not in result.stderr
    assert all((out / n).stat().st_mtime_ns != t for n, t in before.items())


def test_interrupt_exits_130_and_leaves_no_partial_files(
    tmp_path: Path, tiny_weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        Image.fromarray(photo(12, 9, seed=i)).save(src / f"{i}.png")
    from carcli import imageio

    real_replace, calls = os.replace, []

    def replace_then_interrupt(a, b):  # Ctrl-C while the second output is being written
        calls.append(b)
        if len(calls) == 1:  # a slow first write: the compute loop is done before it is
            time.sleep(0.5)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(imageio.os, "replace", replace_then_interrupt)
    result = car("downscale", src, out, "-w", tiny_weights)
    assert result.exit_code == 130 and "run the same command again" in result.stderr
    assert [p.name for p in out.iterdir()] == ["0.png"] and temp_files(tmp_path) == []
    monkeypatch.setattr(imageio.os, "replace", real_replace)
    result = car("downscale", src, out, "-w", tiny_weights)
    assert result.exit_code == 0 and "1 skipped" in result.stderr


def test_usage_errors_exit_2(tmp_path: Path, tiny_weights) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(photo(12, 12)).save(src / "a.png")
    result = car("downscale", src, src, "-w", tiny_weights)
    assert result.exit_code == 2 and "same as INPUT" in result.stderr
    result = car("downscale", src / "a.png", src / "a.png", "-w", tiny_weights)
    assert result.exit_code == 2 and "same as INPUT" in result.stderr
    result = car("downscale", src, src / "sub", "-r", "-w", tiny_weights)
    assert result.exit_code == 2 and "inside INPUT" in result.stderr
    result = car("roundtrip", src, "-o", src / "sub" / "x", "-r", "-w", tiny_weights)
    assert result.exit_code == 2
    assert car("downscale", src, tmp_path / "o", "--scale", "3").exit_code == 2
    assert car("downscale", tmp_path / "missing", tmp_path / "o").exit_code == 2
    result = car("downscale", src, tmp_path / "o", "--device", "tpu", "-w", tiny_weights)
    assert result.exit_code == 2 and "device" in result.stderr
    result = car("downscale", src, tmp_path / "o", "-f", "jpg", "-w", tiny_weights)
    assert result.exit_code == 2 and "--allow-lossy" in result.stderr
    result = car("roundtrip", src, "--compare", "-w", tiny_weights)
    assert result.exit_code == 2 and "--output" in result.stderr
    result = car("downscale", src / "sub", tmp_path / "o", "-w", tiny_weights)
    assert result.exit_code == 2 and "no images found" in result.stderr
    assert not (tmp_path / "o").exists()


def test_lossy_downscale_needs_allow_lossy(tmp_path: Path, tiny_weights) -> None:
    Image.fromarray(photo(12, 12)).save(tmp_path / "a.png")
    result = car(
        "downscale",
        tmp_path / "a.png",
        tmp_path / "a_small.jpg",
        "--allow-lossy",
        "-w",
        tiny_weights,
    )
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "a_small.jpg").format == "JPEG"
    result = car("downscale", tmp_path / "a.png", tmp_path / "w", "-f", "webp", "-w", tiny_weights)
    assert result.exit_code == 0 and Image.open(tmp_path / "w" / "a.webp").size == (3, 3)


def test_missing_weights_message(tmp_path: Path, no_installed_weights: Path) -> None:
    Image.fromarray(photo(12, 12)).save(tmp_path / "a.png")
    result = car("downscale", tmp_path / "a.png", tmp_path / "out")
    assert result.exit_code == 2
    assert "no carcli weights are installed for 4x" in result.stderr
    assert "--weights" in result.stderr and "Traceback" not in result.output
    result = car("roundtrip", tmp_path / "a.png", "-w", tmp_path / "nowhere")
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_recursive_mirrors_relative_paths(tmp_path: Path, tiny_weights) -> None:
    src = tmp_path / "src"
    for rel in ["top.png", "a/one.png", "a/b/two.jpg"]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(10, 14)).save(src / rel)
    out = tmp_path / "out"
    result = car("downscale", src, out, "-r", "-s", "2", "-w", tiny_weights)
    assert result.exit_code == 0, result.output
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert found == ["a/b/two.png", "a/one.png", "top.png"]
    result = car("downscale", src, tmp_path / "flat", "-s", "2", "-w", tiny_weights)
    assert [p.name for p in (tmp_path / "flat").iterdir()] == ["top.png"]
    assert temp_files(tmp_path) == []


def test_roundtrip_table_json_and_compare(tmp_path: Path, tiny_weights) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(40, 36, seed=1)).save(src / "one.png")
    Image.fromarray(photo(33, 45, seed=2)).save(src / "two.png")
    result = car(
        "roundtrip", src, "-o", tmp_path / "o", "--compare", "--json", tmp_path / "r.json",
        "-w", tiny_weights,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "one.png" in result.stdout and "mean of 2" in result.stdout
    assert "bicubic" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["count"] == 2 and set(report["baselines"]["bicubic"]) == {"psnr", "ssim"}
    for sub in ("lr", "sr", "compare"):
        assert sorted(p.name for p in (tmp_path / "o" / sub).iterdir()) == ["one.png", "two.png"]
    assert Image.open(tmp_path / "o" / "compare" / "one.png").width > 3 * 36
    result = car("roundtrip", src, "-o", tmp_path / "o", "-q", "-w", tiny_weights)
    assert result.exit_code == 0 and result.stdout == ""


def test_roundtrip_defaults_to_bundled_samples(
    tiny_weights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = Path(__file__).resolve().parents[1] / "carcli" / "samples"
    assert samples == cli.SAMPLES_DIR
    assert len(list(samples.glob("*.png"))) >= 3, "the bundled samples are missing"
    # Run the no-INPUT path on a small stand-in (the real samples take long on 2 cores).
    standin = tmp_path / "samples"
    standin.mkdir()
    for i in range(2):
        Image.fromarray(photo(24, 20, seed=i)).save(standin / f"{i}.png")
    monkeypatch.setattr(cli, "SAMPLES_DIR", standin)
    result = car("roundtrip", "-w", tiny_weights, "-q", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["count"] == 2
    monkeypatch.setattr(cli, "SAMPLES_DIR", tmp_path / "gone")
    result = car("roundtrip", "-w", tiny_weights)
    assert result.exit_code == 2 and "samples" in result.stderr


def test_info(tiny_weights, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CARCLI_WEIGHTS", str(tiny_weights))
    result = car("info", "--json", tmp_path / "info.json")
    assert result.exit_code == 0, result.output
    for word in ("carcli", "torch", "python", "cpu", "torch", str(tiny_weights)[:20]):
        assert word in result.stdout
    data = json.loads((tmp_path / "info.json").read_text())
    assert {w["scale"] for w in data["weights"]} == {2, 4}
    assert data["devices"][0]["backend"]
    assert data["weights"][0]["parameter_counts"]["sr"] > 0
    for entry in data["weights"]:  # each checkpoint is identified by its SHA-256, also on screen
        digest = hashlib.sha256(Path(entry["file"]).read_bytes()).hexdigest()
        assert entry["sha256"] == digest
        assert digest[:8] in result.stdout  # the table folds the rest on narrow terminals


def test_info_without_weights(no_installed_weights: Path) -> None:
    result = car("info")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "until the trained" not in text and "--weights" in text


def test_info_on_a_checkpoint_the_user_names(tmp_path: Path) -> None:
    """`car info --weights FILE_OR_FOLDER` shows that file's architecture and digest instead
    of the installed weights; a missing path is a one-line error."""
    shipped = Path(carcli.__file__).parent / "weights" / "car_x4.safetensors"
    mine = tmp_path / "my-pair.safetensors"
    mine.write_bytes(shipped.read_bytes())
    result = car("info", "--weights", mine, "--json", "-")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert f"weights in {mine}" in text and "EDSR 16 blocks x 64" in text
    assert "car_generic_x2" not in text  # the installed ones are not listed
    data = json.loads(result.stdout[result.stdout.index("{") :])
    assert data["weights_listed"] == str(mine)
    [entry] = data["weights"]
    assert entry["scale"] == 4 and entry["config"] == "compact-no-offsets"
    assert entry["sha256"] == hashlib.sha256(mine.read_bytes()).hexdigest()

    result = car("info", "--weights", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert result.output.strip() == f"error: weights path {tmp_path / 'nowhere'} does not exist"


def test_help_and_version() -> None:
    for command in ("downscale", "upscale", "roundtrip", "info"):
        result = car(command, "--help")
        assert result.exit_code == 0 and "--json" in result.stdout
    assert "source-size" in car("upscale", "--help").stdout
    assert "ceil(H/s)" in car("downscale", "--help").stdout
    result = subprocess.run(
        [sys.executable, "-m", "carcli", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("carcli ")


def test_help_reads_the_same_on_every_typer() -> None:
    """`car downscale --help` through the real entry point names INPUT and OUTPUT and shows
    on/off flags bare, also on typer 0.27+ (which would print `{input} {output}`, and 0.29
    `<bool>` after each flag)."""
    import typer

    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb"}
    result = subprocess.run(
        [sys.executable, "-m", "carcli", "downscale", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    usage = next(line for line in result.stdout.splitlines() if "Usage:" in line)
    # INPUT is required (typer 0.27+ writes {INPUT}), OUTPUT optional since -o exists.
    names = [word.strip("{}[]") for word in usage.split("[OPTIONS]")[1].split()]
    assert names == ["INPUT", "OUTPUT"], (typer.__version__, usage)
    assert "{input}" not in result.stdout and "<bool>" not in result.stdout, typer.__version__
    recursive = next(line for line in result.stdout.splitlines() if "--recursive" in line)
    assert recursive.split()[1:4] == ["--recursive", "-r", "Descend"], recursive  # bare flag
    assert "FILE" in next(line for line in result.stdout.splitlines() if "--json" in line)


@pytest.mark.slow
def test_help_and_usage_errors_do_not_import_torch() -> None:
    """`car --help` and a bad option answer without importing torch (seconds of start-up);
    the API names of the package still resolve, on first use."""
    probe = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from carcli.cli import app\n"
        "runner = CliRunner()\n"
        "for args in (['--help'], ['train', '--help'], ['roundtrip', '--scale', '3']):\n"
        "    result = runner.invoke(app, args)\n"
        "    print(result.exit_code, 'torch' in sys.modules)\n"
        "import carcli\n"
        "print(callable(carcli.roundtrip), 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.split("\n")[:4] == ["0 False", "0 False", "2 False", "True True"]
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        carcli.nonexistent  # noqa: B018


def test_single_file_to_named_output(tmp_path: Path, tiny_weights) -> None:
    Image.fromarray(photo(13, 10)).save(tmp_path / "in.bmp")
    result = car("downscale", tmp_path / "in.bmp", tmp_path / "small.png", "-w", tiny_weights)
    assert result.exit_code == 0 and Image.open(tmp_path / "small.png").size == (3, 4)
    result = car("upscale", tmp_path / "small.png", tmp_path / "big.png", "-w", tiny_weights)
    assert result.exit_code == 0 and Image.open(tmp_path / "big.png").size == (10, 13)


# ----------------------------------------------------------------------------- data sets


def _roundtrip_json(folder: Path, scale: int, weights: Path, out: Path) -> dict:
    result = car(
        "roundtrip", folder, "--scale", str(scale), "--weights", weights, "--json", out, "-q"
    )
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


@pytest.mark.slow
def test_set5_bicubic_baseline(datasets_dir: Path, tiny_ckpt, tmp_path: Path) -> None:
    for scale, expected in ((4, 28.4), (2, 33.6)):
        report = _roundtrip_json(
            datasets_dir / "val" / "Set5", scale, tiny_ckpt(scale), tmp_path / "r.json"
        )
        assert report["count"] == 5
        assert report["baselines"]["bicubic"]["psnr"] == pytest.approx(expected, abs=0.1)


@pytest.mark.slow
def test_set14_all_images(datasets_dir: Path, tiny_ckpt, tmp_path: Path) -> None:
    report = _roundtrip_json(datasets_dir / "val" / "Set14", 4, tiny_ckpt(4), tmp_path / "r.json")
    assert report["count"] == 14
    assert "bridge.png" in {r["file"] for r in report["images"]}  # the greyscale one
    assert all(r["psnr"] is not None and r["bicubic_psnr"] is not None for r in report["images"])
    assert report["baselines"]["bicubic"]["psnr"] == pytest.approx(26.0, abs=0.3)
