"""The image commands as a careful hostile user drives them: no lost data, no traceback,
no hang, no silent garbage (issue 37: F1, F2, F8, F9, F11-F14, F16, F17).

Each test names the finding it covers; each failed on the code before its fix.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from typer.testing import CliRunner

from carcli.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def car(*args: str | Path, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def no_traceback(result) -> None:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".carcli-tmp-" in p.name]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name in ("a", "b", "c"):
        pixels = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
    return folder


# ----------------------------------------------------------------------------- F1: --json


@pytest.mark.parametrize("command", ["downscale", "upscale", "roundtrip"])
def test_json_never_replaces_an_input(tmp_path: Path, images: Path, tiny_weights, command) -> None:
    """F1: `car downscale in out --json in/b.png` replaced the input image with JSON (exit 0)."""
    before = snapshot(images)
    args = [command, images] + ([] if command == "roundtrip" else [tmp_path / "out"])
    result = car(*args, "-w", tiny_weights, "--json", images / "b.png", "-q")
    no_traceback(result)
    assert result.exit_code == 2 and len(errors(result)) == 1, result.output
    assert "--json" in errors(result)[0] and "input" in errors(result)[0]
    assert snapshot(images) == before
    # A single-file INPUT named as the report, through another spelling of its path.
    single = [images / "a.png"] + ([] if command == "roundtrip" else [tmp_path / "o.png"])
    spelled = images / ".." / "in" / "a.png"
    result = car(command, *single, "-w", tiny_weights, "--json", spelled, "-q")
    assert result.exit_code == 2 and snapshot(images) == before, result.output


def test_json_never_replaces_an_output_of_the_same_run(
    tmp_path: Path, images: Path, tiny_weights
) -> None:
    """F1: --json naming an output just written replaced it; a resumed run then skipped it."""
    out = tmp_path / "out"
    result = car("downscale", images, out, "-w", tiny_weights, "--json", out / "b.png", "-q")
    assert result.exit_code == 2 and "output of this run" in errors(result)[0], result.output
    assert not out.exists()
    rt = tmp_path / "rt"
    result = car("roundtrip", images, "-o", rt, "-w", tiny_weights, "--json", rt / "sr" / "c.png")
    assert result.exit_code == 2 and "output of this run" in errors(result)[0], result.output
    # An existing image that is neither is not replaced by a report either.
    other = tmp_path / "photo.png"
    Image.new("RGB", (4, 4)).save(other)
    before = other.read_bytes()
    result = car("downscale", images, out, "-w", tiny_weights, "--json", other, "-q")
    assert result.exit_code == 2 and other.read_bytes() == before, result.output
    # ... while a plain report next to them is written.
    result = car("downscale", images, out, "-w", tiny_weights, "--json", tmp_path / "r.json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["count"] == 3


# ----------------------------------------------------------------------------- F2: read-only


@pytest.fixture
def read_only_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every new file fails with EROFS, and so does removing one: a read-only file system.

    (Portable: no mount needed. The old cleanup's unlink raised again inside its
    handler, which is what turned the failure into a traceback.)
    """
    import builtins

    real_open, real_unlink = builtins.open, Path.unlink

    def ro_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if any(flag in mode for flag in "wxa") and ".carcli-tmp-" in str(file):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    def ro_unlink(self: Path, missing_ok: bool = False) -> None:
        if ".carcli-tmp-" in self.name:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(Path, "unlink", ro_unlink)


def test_read_only_outputs_and_report_are_one_line_each(
    tmp_path: Path, images: Path, tiny_weights, read_only_writes
) -> None:
    """F2: --json on a read-only file system ended in an OSError traceback, and image
    outputs got a raw 'OSError ... .NAME.carcli-tmp-XXXX' line."""
    out = tmp_path / "out"
    out.mkdir()
    report = tmp_path / "r.json"
    result = car("downscale", images, out, "-w", tiny_weights, "--json", report, "-q")
    no_traceback(result)
    assert result.exit_code == 1, result.output
    lines = errors(result)
    assert len(lines) == 4, result.stderr
    for name in ("a", "b", "c"):
        assert f"error: {name}.png: cannot write {out / name}.png: Read-only file system" in lines
    assert lines[-1] == f"error: --json: cannot write {report}: Read-only file system"
    assert "carcli-tmp" not in result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a read-only tmpfs needs root")
def test_a_real_read_only_file_system(tmp_path: Path, images: Path, tiny_weights) -> None:
    """F2 on a real read-only mount, where the machine allows one."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(ro)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = car("downscale", images, tmp_path / "out", "-w", tiny_weights, "-q",
                     "--json", ro / "r.json")  # fmt: skip
        no_traceback(result)
        assert result.exit_code == 1
        assert errors(result) == [
            f"error: --json: cannot write {ro / 'r.json'}: Read-only file system"
        ]
        result = car("downscale", images, ro / "out", "-w", tiny_weights, "-q")
        assert result.exit_code == 1 and len(errors(result)) == 3
        assert all("Read-only file system" in line for line in errors(result))
    finally:
        subprocess.run(["umount", str(ro)])


# ----------------------------------------------------------------------------- F8: output


def test_non_finite_network_output_fails_that_file(
    tmp_path: Path, images: Path, tiny_weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F8: a network output with NaN was written as a black image with exit 0."""
    from carcli import tiler

    real = tiler.TiledModel.upscale

    def poisoned(self, lr, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = real(self, lr, *args, **kwargs)
        return out.clone().fill_(float("nan")) if lr.shape[-1] == 7 else out

    monkeypatch.setattr(tiler.TiledModel, "upscale", poisoned)
    Image.new("RGB", (7, 5), "gray").save(images / "d.png")  # only this one goes wrong
    out = tmp_path / "up"
    result = car("upscale", images, out, "-w", tiny_weights, "-s", "4", "-q")
    no_traceback(result)
    assert result.exit_code == 1, result.output
    assert errors(result) == [
        "error: d.png: the SR network produced NaN or infinite values (damaged weights, or an "
        "overflow at reduced precision: try --precision fp32)"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]
    result = car("roundtrip", images, "-w", tiny_weights)
    assert result.exit_code == 1 and "nan" not in result.stdout.lower(), result.output


# ----------------------------------------------------------------------------- F9: FIFO


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_input_is_refused_at_once(tmp_path: Path, tiny_weights) -> None:
    """F9: a FIFO given as the single INPUT blocked forever."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    env = dict(os.environ, CARCLI_WEIGHTS=str(tiny_weights))
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "carcli", "downscale", str(fifo), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO,
    )  # fmt: skip
    assert time.monotonic() - start < 120
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"error: INPUT {fifo} is a FIFO, not a file or folder (use - to read standard input)"
    )


def test_a_fifo_is_never_opened_by_the_reader(tmp_path: Path) -> None:
    """F9, one level down: read_image says what the file is without opening it."""
    from carcli.imageio import ImageReadError, read_image

    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def read() -> None:
        try:
            read_image(fifo)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # blocked in open(): release it, then fail
        with open(fifo, "wb"):
            pass
        reader.join(10)
        pytest.fail("read_image blocked on a FIFO")
    assert isinstance(outcome[0], ImageReadError), outcome
    assert "is a FIFO, not a regular file" in str(outcome[0])


# ----------------------------------------------------------------------------- F11-F13


def test_a_folder_where_an_output_belongs_is_an_error_not_a_skip(
    tmp_path: Path, images: Path, tiny_weights
) -> None:
    """F11: an output path occupied by a folder was 'skipped (output exists)', exit 0."""
    out = tmp_path / "out"
    (out / "b.png").mkdir(parents=True)
    result = car("downscale", images, out, "-w", tiny_weights, "-q")
    no_traceback(result)
    assert result.exit_code == 1, result.output
    assert errors(result) == [
        f"error: b.png: cannot write {out / 'b.png'}: a folder of that name is in the way"
    ]
    assert (out / "a.png").is_file() and (out / "b.png").is_dir()
    rt = tmp_path / "rt"
    (rt / "sr" / "a.png").mkdir(parents=True)
    result = car("roundtrip", images, "-o", rt, "-w", tiny_weights, "-q")
    assert result.exit_code == 1 and "a folder of that name is in the way" in result.stderr


def test_a_file_name_starting_with_a_dash_says_how_to_pass_it(
    tmp_path: Path, images: Path, tiny_weights
) -> None:
    """F12: `car downscale -x.png out` said 'No such option: -x' (the wrong argument)."""
    (tmp_path / "-x.png").write_bytes((images / "a.png").read_bytes())
    env = dict(os.environ, CARCLI_WEIGHTS=str(tiny_weights), COLUMNS="200", PYTHONPATH=str(REPO))
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "carcli", *a], capture_output=True, text=True, env=env,
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    done = run("downscale", "-x.png", "out")
    assert done.returncode == 2
    message = " ".join(done.stderr.split())  # the error box may wrap
    assert "-x.png starts with '-'" in message and "-- -x.png" in message, done.stderr
    assert "./-x.png" in message and "No such option: -x" not in message
    done = run("downscale", "-q", "--", "-x.png", "out")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "-x.png").is_file()


def test_an_output_name_that_is_no_image_format_is_refused(
    tmp_path: Path, images: Path, tiny_weights
) -> None:
    """F13: `car downscale a.png out.txt` silently made a folder out.txt/."""
    result = car("downscale", images / "a.png", tmp_path / "out.txt", "-w", tiny_weights)
    no_traceback(result)
    assert result.exit_code == 2 and len(errors(result)) == 1, result.output
    assert ".txt is not an image format carcli writes" in errors(result)[0]
    assert not (tmp_path / "out.txt").exists()
    # A folder of that name that exists already is used as the output folder.
    (tmp_path / "out.txt").mkdir()
    result = car("downscale", images / "a.png", tmp_path / "out.txt", "-w", tiny_weights, "-q")
    assert result.exit_code == 0 and (tmp_path / "out.txt" / "a.png").is_file()


# ----------------------------------------------------------------------------- F14, F16, F17


def png_bytes(height: int = 12, width: int = 10, **save) -> bytes:
    pixels = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", **save)
    return buf.getvalue()


def test_damaged_png_headers_are_called_damaged(tmp_path: Path, tiny_weights) -> None:
    """F14: a PNG with a bad IHDR checksum, or cut after its header, was 'not an image'."""
    src = tmp_path / "in"
    src.mkdir()
    data = bytearray(png_bytes())
    bad_crc = bytearray(data)
    bad_crc[29] ^= 0xFF
    (src / "crc.png").write_bytes(bytes(bad_crc))
    (src / "header.png").write_bytes(bytes(data[:33]))
    (src / "signature.png").write_bytes(bytes(data[:12]))
    (src / "text.png").write_text("hello")
    result = car("downscale", src, tmp_path / "out", "-w", tiny_weights, "-q")
    assert result.exit_code == 1
    lines = dict(line.split(": ", 2)[1:] for line in errors(result))
    assert lines["crc.png"] == "damaged PNG: the header chunk (IHDR) fails its checksum"
    assert lines["header.png"] == "damaged PNG: cut short or malformed after its header (33 bytes)"
    assert lines["signature.png"] == "damaged PNG: the file ends inside its header (12 bytes)"
    assert lines["text.png"] == "not an image, or not a supported format"


def test_frames_pages_and_float_range_that_are_not_processed_are_said(
    tmp_path: Path, tiny_weights
) -> None:
    """F16: animated WebP / multi-page TIFF used only frame 1 silently; a float TIFF
    outside [0, 1] was clipped silently (almost all white)."""
    src = tmp_path / "in"
    src.mkdir()
    frames = [Image.new("RGB", (20, 16), (v, v, v)) for v in (10, 200, 90)]
    frames[0].save(src / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(src / "pages.tif", save_all=True, append_images=frames[1:2])
    ramp = np.linspace(0, 4, 16 * 20, dtype=np.float32).reshape(16, 20)
    Image.fromarray(ramp, "F").save(src / "float.tif")
    Image.fromarray(ramp / 4, "F").save(src / "unit.tif")  # in range: no warning
    result = car("downscale", src, tmp_path / "out", "-w", tiny_weights, "-q")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: anim.webp: has 3 frames; only the first is processed",
        "warning: float.tif: float samples span [0, 4]; carcli reads float images as [0, 1] "
        "and clips the rest (scale the image to [0, 1] first)",
        "warning: pages.tif: has 2 pages; only the first is processed",
    ]


def test_a_huge_text_chunk_is_not_echoed(tmp_path: Path, tiny_weights) -> None:
    """F17: a 10,000-character carcli:source-size value was printed in full."""
    src = tmp_path / "in"
    src.mkdir()
    info = PngInfo()
    info.add_text("carcli:source-size", "9" * 10_000)
    info.add_text("carcli:scale", "4")
    (src / "x.png").write_bytes(png_bytes(pnginfo=info))
    result = car("upscale", src, tmp_path / "out", "-w", tiny_weights, "-s", "4")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stderr.splitlines() if x.startswith("warning: x.png"))
    assert len(line) < 200 and "(10000 characters)" in line, line


# ----------------------------------------------------------------------------- stale temps


def test_a_run_removes_temp_files_left_by_a_killed_run(
    tmp_path: Path, images: Path, tiny_weights
) -> None:
    """F10: a kill during a write left a full-size hidden temp file no later run removed."""
    out = tmp_path / "out"
    out.mkdir()
    dead = out / ".a.png.carcli-tmp-999999999-0badc0de"  # no such process
    dead.write_bytes(b"x" * 1000)
    old = out / ".b.png.carcli-tmp-deadbeef"  # the format before process ids
    old.write_bytes(b"x")
    live = out / f".c.png.carcli-tmp-{os.getppid()}-00000000"  # a live process: not ours to touch
    live.write_bytes(b"x")
    result = car("downscale", images, out, "-w", tiny_weights)
    assert result.exit_code == 0, result.output
    assert not dead.exists() and not old.exists() and live.exists()
    assert "removed 1 temp file(s) an interrupted run left" in result.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "a.png", "b.png", "c.png",
    ]  # fmt: skip


def test_an_upscale_too_large_for_memory_fails_that_file(
    tmp_path: Path, images: Path, tiny_weights, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found while looking for more: tiles bound the networks' memory, not the result's;
    an LR whose 4x result cannot fit in RAM got the run killed without a word."""
    from carcli import tasks

    Image.new("RGB", (60, 50), "gray").save(images / "big.png")
    need_small = 28 * 4 * 20 * 4 * tasks.RESULT_BYTES_PER_PIXEL  # a.png .. c.png fit
    monkeypatch.setattr(tasks, "available_memory", lambda device: need_small)
    out = tmp_path / "up"
    result = car("upscale", images, out, "-w", tiny_weights, "-s", "4", "-q")
    no_traceback(result)
    assert result.exit_code == 1, result.output
    assert errors(result) == [
        "error: big.png: the result would be 240x200 (0.0 MP, about 1.5 MiB in memory), "
        "but only 0.3 MiB is free"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png"]


def test_control_characters_in_file_names_are_escaped(tmp_path: Path, tiny_weights) -> None:
    """Found while looking for more: a file name holding a newline or a terminal escape
    was printed raw, so one error read as two lines or recoloured the terminal."""
    src = tmp_path / "in"
    src.mkdir()
    (src / "a\nb.png").write_text("junk")
    (src / "\x1b[31mred.png").write_text("junk")
    result = car("downscale", src, tmp_path / "out", "-w", tiny_weights, "-q")
    assert result.exit_code == 1
    assert "\x1b" not in result.stderr
    assert errors(result) == [
        "error: \\x1b[31mred.png: not an image, or not a supported format",
        "error: a\\nb.png: not an image, or not a supported format",
    ]


def test_report_naming_the_output_folder_and_long_output_names(
    tmp_path: Path, images: Path, tiny_weights
) -> None:
    """Found while looking for more: --json naming the (not yet created) output folder
    became a file, so every image then failed; and an output name near the 255-byte
    limit failed only because its temp file name did not fit."""
    out = tmp_path / "out"
    result = car("downscale", images, out, "-w", tiny_weights, "--json", out, "-q")
    assert result.exit_code == 2 and "a folder this run writes into" in errors(result)[0]
    assert not out.exists()
    long_name = "x" * 240 + ".png"
    (images / long_name).write_bytes((images / "a.png").read_bytes())
    result = car("downscale", images, out, "-w", tiny_weights, "-q")
    assert result.exit_code == 0, result.output
    assert (out / long_name).is_file() and temp_files(out) == []
