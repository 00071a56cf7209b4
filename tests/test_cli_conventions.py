"""The commands as users of other upscalers expect them: -o, --suffix, stdin/stdout, scale
from the note, the warning (and generic upscaler) for foreign images, fast usage errors,
completion, colour profiles and the one report schema."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo
from iccbuild import rgb_profile
from PIL import Image
from typer.testing import CliRunner

from carcli.cli import app
from carcli.report import SCHEMA, check_report

runner = CliRunner()


def car(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder(root: Path, names: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, (h, w)) in enumerate(names.items()):
        Image.fromarray(photo(h, w, seed=seed + i)).save(root / name)
    return root


# --------------------------------------------------------------------------- usage, fast


PROBE = """
import runpy, sys, time
sys.argv = ["car", *sys.argv[1:]]
start = time.perf_counter()
try:
    runpy.run_module("carcli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("RESULT", code, "torch" in sys.modules, round(time.perf_counter() - start, 2))
"""


def run_probe(*args: str | Path) -> tuple[int, bool, str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True
    )
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT")][-1].split()
    print(args, "->", line, result.stderr.strip()[:200])
    return int(line[1]), line[2] == "True", result.stderr


@pytest.mark.slow
def test_usage_errors_answer_without_importing_torch(tmp_path: Path) -> None:
    src = folder(tmp_path / "src", {"x.png": (12, 12), "x.jpg": (12, 12)})
    cases = [
        (["downscale", tmp_path / "missing", tmp_path / "o"], "INPUT"),
        (["downscale", src, src], "same as INPUT"),
        (["downscale", src, tmp_path / "o"], "would both be written"),
        (["downscale", src / "x.png", tmp_path / "o.jpg"], "--allow-lossy"),
        (["upscale", src / "x.png"], "missing OUTPUT"),
        (["upscale", src / "x.png", "a.png", "-o", "b.png"], "given twice"),
        (["upscale", src / "x.png", "-", "--json", "-"], "standard output"),
        (["roundtrip", src, "--compare"], "--output"),
        (["downscale", src, tmp_path / "o", "--suffix", "a/b"], "path separator"),
        (["roundtrip", src, "-w", tmp_path / "nowhere"], "does not exist"),
    ]
    for args, words in cases:
        code, imported_torch, stderr = run_probe(*args)
        assert code == 2, (args, stderr)
        assert not imported_torch, args
        assert words in stderr and "Traceback" not in stderr
        assert len([x for x in stderr.splitlines() if x.startswith("error:")]) == 1
    assert not (tmp_path / "o").exists()


def test_image_data_is_not_written_to_a_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from carcli import cli

    src = folder(tmp_path / "src", {"x.png": (12, 12)})
    monkeypatch.setattr(cli, "_stdout_is_terminal", lambda: True)
    result = car("downscale", src / "x.png", "-")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: refusing to write image data to a terminal")


def test_shell_completion_is_offered() -> None:
    result = car("--help")
    assert result.exit_code == 0
    assert "--install-completion" in result.stdout and "--show-completion" in result.stdout


# --------------------------------------------------------------------------- outputs


def test_output_option_equals_positional(tmp_path: Path, tiny_weights: Path) -> None:
    src = folder(tmp_path / "src", {"a.png": (20, 24)})
    assert car("downscale", src, tmp_path / "pos", "-w", tiny_weights).exit_code == 0
    assert car("downscale", src, "-o", tmp_path / "opt", "-w", tiny_weights).exit_code == 0
    assert (tmp_path / "pos" / "a.png").read_bytes() == (tmp_path / "opt" / "a.png").read_bytes()
    result = car("upscale", tmp_path / "opt" / "a.png", "-o", tmp_path / "up.png", "-w",
                 tiny_weights)  # fmt: skip
    assert result.exit_code == 0 and Image.open(tmp_path / "up.png").size == (24, 20)


def test_suffix_and_collisions(tmp_path: Path, tiny_weights: Path) -> None:
    src = folder(tmp_path / "src", {"x.png": (16, 16), "x.jpg": (16, 16), "y.bmp": (8, 12)})
    result = car("downscale", src, tmp_path / "o", "-w", tiny_weights)
    assert result.exit_code == 2 and not (tmp_path / "o").exists()
    assert result.stderr.startswith("error: x.jpg and x.png would both be written to "), (
        result.stderr
    )
    assert "--suffix '_{ext}'" in result.stderr

    result = car("downscale", src, tmp_path / "o", "--suffix", "_{ext}", "-w", tiny_weights)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "x_jpg.png",
        "x_png.png",
        "y_bmp.png",
    ]
    result = car("upscale", tmp_path / "o", tmp_path / "up", "--suffix", "_x4", "-w",
                 tiny_weights)  # fmt: skip
    assert result.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == [
        "x_jpg_x4.png",
        "x_png_x4.png",
        "y_bmp_x4.png",
    ]
    result = car("roundtrip", src, "-o", tmp_path / "rt", "--suffix", "-{ext}", "-w",
                 tiny_weights, "-q")  # fmt: skip
    assert result.exit_code == 0
    assert sorted(p.name for p in (tmp_path / "rt" / "sr").iterdir()) == [
        "x-jpg.png",
        "x-png.png",
        "y-bmp.png",
    ]


# --------------------------------------------------------------------------- upscale


@pytest.mark.slow
def test_upscale_takes_the_scale_from_the_note(tmp_path: Path, tiny_weights: Path) -> None:
    src = folder(tmp_path / "src", {"a.png": (41, 53)})
    assert car("downscale", src, tmp_path / "lr", "-s", "2", "-w", tiny_weights).exit_code == 0
    assert Image.open(tmp_path / "lr" / "a.png").size == (27, 21)
    # Before: the default 4x made a 108x84 image with exit 0.
    result = car("upscale", tmp_path / "lr", tmp_path / "up", "-w", tiny_weights, "--json",
                 tmp_path / "r.json")  # fmt: skip
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert Image.open(tmp_path / "up" / "a.png").size == (53, 41)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["scale"] == 2 and report["models"][0]["scale"] == 2
    # An explicit --scale wins, with the per-file warning that the size is not restored.
    result = car("upscale", tmp_path / "lr", tmp_path / "up4", "-s", "4", "-w", tiny_weights)
    assert result.exit_code == 0
    assert "was downscaled at 2x, upscaling at 4x" in result.stderr
    assert Image.open(tmp_path / "up4" / "a.png").size == (108, 84)
    # Lossless WebP keeps the note too (in XMP): scale and exact size come back.
    result = car("downscale", src, tmp_path / "webp", "-s", "2", "-f", "webp", "-w", tiny_weights)
    assert result.exit_code == 0
    result = car("upscale", tmp_path / "webp", tmp_path / "upw", "-w", tiny_weights)
    assert result.exit_code == 0 and "warning" not in result.stderr
    assert Image.open(tmp_path / "upw" / "a.png").size == (53, 41)


def test_upscale_of_foreign_images_warns_once(tmp_path: Path, tiny_weights: Path) -> None:
    src = folder(tmp_path / "src", {"a.png": (10, 12), "b.jpg": (9, 9), "c.png": (8, 8)})
    result = car("upscale", src, tmp_path / "up", "-w", tiny_weights, "-q")
    assert result.exit_code == 0
    warnings = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert warnings == [
        "warning: 3 of 3 images carry no carcli note (not made by `car downscale`): the CAR "
        "upscaler is trained on its own downscaled images; results may be worse than bicubic "
        "(no generic upscaler car_generic_x4.safetensors is installed next to the weights)"
    ]


def _generic(folder: Path, role: str | None = "generic-sr", scale: int = 4) -> Path:
    from carcli.checkpoints import generic_name, save_checkpoint
    from carcli.models import CARModel, preset

    torch.manual_seed(100 + scale)
    path = folder / generic_name(scale)
    save_checkpoint(CARModel(preset("tiny", scale)), path, {"role": role} if role else None)
    return path


def test_upscale_uses_an_installed_generic_upscaler(
    tmp_path: Path, tiny_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = tmp_path / "weights"
    shutil.copytree(tiny_weights, weights)
    src = folder(tmp_path / "src", {"photo.png": (20, 16)})
    assert car("downscale", src, tmp_path / "lr", "-w", weights).exit_code == 0
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(tmp_path / "lr" / "photo.png", mixed / "ours.png")
    shutil.copy(src / "photo.png", mixed / "theirs.png")

    plain = car("upscale", mixed, tmp_path / "pair", "-w", weights, "--json", tmp_path / "p.json")
    assert plain.exit_code == 0
    # Without a generic upscaler both images go through the one pair model: one entry.
    assert len(json.loads((tmp_path / "p.json").read_text())["models"]) == 1
    generic = _generic(weights)
    result = car("upscale", mixed, tmp_path / "gen", "-w", weights, "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "1 of 2 images carry no carcli note" in result.stderr
    assert f"using the generic upscaler {generic} for them" in result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert check_report(report) == []
    roles = {m["role"]: m for m in report["models"]}
    assert set(roles) == {"pair", "generic"}
    assert roles["generic"]["files"] == [{"path": str(generic), "sha256": sha256(generic)}]
    assert [i["file"] for i in report["images"]] == ["ours.png", "theirs.png"]
    pair, gen = (np.asarray(Image.open(tmp_path / d / "theirs.png")) for d in ("pair", "gen"))
    assert pair.shape == gen.shape == (80, 64, 3) and not np.array_equal(pair, gen)
    ours = [np.asarray(Image.open(tmp_path / d / "ours.png")) for d in ("pair", "gen")]
    np.testing.assert_array_equal(*ours)  # carcli's own LR still goes through the pair

    monkeypatch.setenv("CARCLI_WEIGHTS", str(weights))
    assert car("info", "--json", tmp_path / "info.json").exit_code == 0
    listed = json.loads((tmp_path / "info.json").read_text())["weights"]
    assert {(Path(w["file"]).name, w["role"]) for w in listed} >= {
        ("car_generic_x4.safetensors", "generic"),
        ("car_x4.safetensors", "pair"),
    }

    _generic(weights, role=None)  # a file with the name but not the marking
    result = car("upscale", mixed, tmp_path / "bad", "-w", weights)
    assert result.exit_code == 2 and 'lacks "role": "generic-sr"' in result.stderr
    assert not (tmp_path / "bad").exists()  # refused before any image was written


# --------------------------------------------------------------------------- stdin / stdout


@pytest.mark.slow
def test_stdin_to_stdout_pipeline(tmp_path: Path, tiny_weights: Path) -> None:
    original = photo(41, 53, seed=7)
    buf = io.BytesIO()
    Image.fromarray(original).save(buf, "PNG")
    cmd = [sys.executable, "-m", "carcli"]
    down = subprocess.run(
        [*cmd, "downscale", "-", "-", "-s", "2", "-w", tiny_weights],
        input=buf.getvalue(),
        capture_output=True,
    )
    assert down.returncode == 0, down.stderr
    assert down.stdout[:8] == b"\x89PNG\r\n\x1a\n"  # only the image on stdout
    assert b"done: 1 image downscaled" in down.stderr
    small = Image.open(io.BytesIO(down.stdout))
    assert small.size == (27, 21) and small.text["carcli:source-size"] == "53x41"

    up = subprocess.run(
        [*cmd, "upscale", "-", "-", "-w", tiny_weights, "-f", "webp", "-q"],
        input=down.stdout,
        capture_output=True,
    )
    assert up.returncode == 0 and up.stderr == b""
    restored = Image.open(io.BytesIO(up.stdout))
    assert restored.format == "WEBP" and restored.size == (53, 41)

    to_file = subprocess.run(
        [*cmd, "upscale", "-", tmp_path / "big.png", "-w", tiny_weights, "--json", "-"],
        input=down.stdout,
        capture_output=True,
    )
    assert to_file.returncode == 0
    report = json.loads(to_file.stdout)
    assert check_report(report) == [] and report["images"][0]["file"] == "<stdin>"
    assert Image.open(tmp_path / "big.png").size == (53, 41)

    rt = subprocess.run(
        [*cmd, "roundtrip", "-", "-o", tmp_path / "rt", "-w", tiny_weights, "-q"],
        input=buf.getvalue(),
        capture_output=True,
    )
    assert rt.returncode == 0, rt.stderr
    assert Image.open(tmp_path / "rt" / "sr" / "stdin.png").size == (53, 41)

    empty = subprocess.run([*cmd, "downscale", "-", "-", "-w", tiny_weights], input=b"",
                           capture_output=True)  # fmt: skip
    assert empty.returncode == 1 and empty.stdout == b""
    assert b"error: <stdin>: empty file" in empty.stderr


# --------------------------------------------------------------------------- colour, formats


def test_display_p3_input_is_converted_and_said(tmp_path: Path, tiny_weights: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    array = photo(24, 24)
    Image.fromarray(array).save(src / "p3.png", icc_profile=rgb_profile("Display P3 (test)"))
    Image.fromarray(array).save(src / "srgb.png")
    result = car("downscale", src, tmp_path / "lr", "-w", tiny_weights)
    assert result.exit_code == 0
    notes = [x for x in result.stderr.splitlines() if "colour profile" in x]
    assert notes == [
        "note: converted from the embedded colour profile 'Display P3 (test)' to sRGB "
        "(outputs are sRGB)"
    ]
    p3, srgb = (np.asarray(Image.open(tmp_path / "lr" / n)) for n in ("p3.png", "srgb.png"))
    assert not np.array_equal(p3, srgb)  # the same numbers meant different colours
    assert Image.open(tmp_path / "lr" / "p3.png").info.get("icc_profile") is None  # sRGB


def test_avif_input(tmp_path: Path, tiny_weights: Path) -> None:
    Image.init()
    if "AVIF" not in Image.SAVE:
        pytest.skip("this Pillow has no AVIF encoder")
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(20, 28)).save(src / "a.avif", quality=95)
    result = car("downscale", src, tmp_path / "lr", "-w", tiny_weights)
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "lr" / "a.png").size == (7, 5)


# --------------------------------------------------------------------------- reports


def test_one_report_schema_for_all_commands(tmp_path: Path, tiny_weights: Path) -> None:
    src = folder(tmp_path / "src", {"a.png": (20, 24), "b.png": (16, 16)})
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    weights_file = tiny_weights / "car_x4.safetensors"
    reports = {}
    for command, extra in (
        ("downscale", [tmp_path / "lr"]),
        ("upscale", [tmp_path / "lr", tmp_path / "up"]),
        ("roundtrip", ["-o", tmp_path / "rt"]),
    ):
        inp = [] if command == "upscale" else [src]
        json_path = tmp_path / f"{command}.json"
        result = car(command, *inp, *extra, "-w", tiny_weights, "--json", json_path, "-q")
        reports[command] = json.loads(json_path.read_text())
        assert result.exit_code == (0 if command == "upscale" else 1), result.output
    (tmp_path / "lr" / "a.png").touch()
    again = car("downscale", src, tmp_path / "lr", "-w", tiny_weights, "--json",
                tmp_path / "again.json", "-q")  # fmt: skip
    assert again.exit_code == 1
    reports["again"] = json.loads((tmp_path / "again.json").read_text())

    for name, report in reports.items():
        assert check_report(report) == [], name
        assert report["schema"] == SCHEMA and report["device"] == "cpu"
        assert report["precision"] in ("fp32", "bf16")
        assert report["models"] == [
            {
                "role": "pair",
                "scale": 4,
                "files": [{"path": str(weights_file), "sha256": sha256(weights_file)}],
            }
        ]
    for name in ("downscale", "roundtrip"):  # failures are listed, also by roundtrip now
        assert reports[name]["failed"] == [
            {"file": "broken.png", "error": reports[name]["failed"][0]["error"]}
        ]
        assert reports[name]["count"] == 2 and reports[name]["total"] == 3
    assert reports["roundtrip"]["baselines"]["bicubic"]["psnr"] > 10
    assert all(i["psnr"] > 0 for i in reports["roundtrip"]["images"])
    assert reports["again"]["skipped"] == [
        {
            "file": "a.png",
            "reason": "output exists (--overwrite replaces it)",
            "outputs": [str(tmp_path / "lr" / "a.png")],
        },
        {
            "file": "b.png",
            "reason": "output exists (--overwrite replaces it)",
            "outputs": [str(tmp_path / "lr" / "b.png")],
        },
    ]


def test_check_report_finds_problems() -> None:
    assert check_report({"schema": SCHEMA}) != []
    good = {
        "schema": SCHEMA, "command": "upscale", "carcli_version": "1", "created": "t",
        "input": "a", "output": None, "scale": 4, "device": "cpu", "precision": "fp32",
        "models": [], "seconds": 1.0, "total": 1, "count": 0, "failed_count": 1,
        "skipped_count": 0, "images": [], "failed": [{"file": "x", "error": "bad"}],
        "skipped": [],
    }  # fmt: skip
    assert check_report(good) == []
    assert check_report({**good, "total": 2}) == [
        "total is not the sum of count, failed_count and skipped_count"
    ]
    assert check_report({**good, "failed": [{"file": "x"}]}) == ["failed[0] lacks 'error'"]


def test_report_is_strict_json_when_a_round_trip_is_exact(
    tmp_path: Path, tiny_weights: Path
) -> None:
    """A flat image comes back from bicubic identical (PSNR infinite): the report must still
    be JSON that strict readers take, not Python's ``Infinity``; the table says inf."""
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (24, 24), (90, 120, 30)).save(src / "flat.png")
    json_path = tmp_path / "rt.json"
    result = car("roundtrip", src, "-w", tiny_weights, "--json", json_path)
    assert result.exit_code == 0, result.output
    assert "inf" in result.stdout

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    report = json.loads(json_path.read_text(), parse_constant=refuse)
    assert check_report(report) == []
    assert report["images"][0]["bicubic_psnr"] is None
    assert report["baselines"]["bicubic"]["psnr"] is None
    assert report["baselines"]["bicubic"]["ssim"] == 1.0
    assert check_report({**report, "psnr": float("inf")}) == [
        "report.psnr is inf: JSON has no such number"
    ]


def test_timing_probe_is_fast_enough_to_matter() -> None:
    """Usage errors used to take ~5 s (importing torch); they now take well under that."""
    start = time.perf_counter()
    code, imported_torch, _ = run_probe("downscale", "/nonexistent/x.png", "/tmp/o")
    elapsed = time.perf_counter() - start
    print(f"usage error answered in {elapsed:.2f} s")
    assert code == 2 and not imported_torch
