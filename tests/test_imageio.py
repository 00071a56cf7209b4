"""Reading, writing and finding images: formats, orientation, colour modes, bit depth, errors."""

from __future__ import annotations

import io
import os
import stat
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image, ImageOps

from carcli import imageio
from carcli.imageio import (
    ImageReadError,
    ImageWriteError,
    find_images,
    read_image,
    to_array,
    write_image,
)


def as_uint8(picture: imageio.Picture) -> np.ndarray:
    return to_array(picture.rgb, picture.alpha, 8)


@pytest.mark.parametrize(
    ("suffix", "kwargs", "lossless"),
    [
        (".png", {}, True),
        (".bmp", {}, True),
        (".tif", {}, True),
        (".tiff", {"compression": "tiff_lzw"}, True),
        (".webp", {"lossless": True}, True),
        (".jpg", {"quality": 95}, False),
        (".jpeg", {"quality": 95}, False),
    ],
)
def test_reads_every_format(tmp_path: Path, suffix: str, kwargs: dict, lossless: bool) -> None:
    array = photo(13, 17)
    path = tmp_path / f"img{suffix}"
    Image.fromarray(array).save(path, **kwargs)
    picture = read_image(path)
    assert picture.rgb.shape == (3, 13, 17) and picture.rgb.dtype == torch.float32
    assert picture.bits == 8 and picture.alpha is None and not picture.grey
    expected = array if lossless else np.asarray(Image.open(path).convert("RGB"))
    np.testing.assert_array_equal(as_uint8(picture), expected)


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    array = photo(10, 24)  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(array).save(path, quality=95, exif=exif)
    picture = read_image(path)
    assert (picture.height, picture.width) == (24, 10)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    np.testing.assert_array_equal(as_uint8(picture), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow(tmp_path: Path, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    Image.fromarray(photo(5, 8, seed=orientation)).save(path, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    np.testing.assert_array_equal(as_uint8(read_image(path)), expected)


def test_grey_palette_cmyk_become_rgb(tmp_path: Path) -> None:
    rgb = photo(9, 11)
    grey = Image.fromarray(rgb).convert("L")
    grey.save(tmp_path / "grey.png")
    picture = read_image(tmp_path / "grey.png")
    assert picture.grey and picture.rgb.shape == (3, 9, 11)
    assert torch.equal(picture.rgb[0], picture.rgb[1]) and torch.equal(
        picture.rgb[1], picture.rgb[2]
    )
    np.testing.assert_array_equal(as_uint8(picture)[..., 0], np.asarray(grey))

    palette = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(
        as_uint8(read_image(tmp_path / "palette.png")), np.asarray(palette.convert("RGB"))
    )
    palette.save(tmp_path / "palette.gif.png", transparency=0)
    assert read_image(tmp_path / "palette.gif.png").alpha is not None

    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    picture = read_image(tmp_path / "cmyk.jpg")
    assert picture.rgb.shape == (3, 9, 11)
    expected = np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB")).astype(int)
    assert np.abs(as_uint8(picture).astype(int) - expected).max() <= 1


def test_rgba_keeps_alpha(tmp_path: Path) -> None:
    array = photo(7, 6, channels=4)
    Image.fromarray(array, "RGBA").save(tmp_path / "a.png")
    picture = read_image(tmp_path / "a.png")
    assert picture.alpha is not None and picture.alpha.shape == (1, 7, 6)
    np.testing.assert_array_equal(as_uint8(picture), array)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_16bit_png_is_read_at_full_precision(tmp_path: Path, channels: int) -> None:
    rng = np.random.default_rng(channels)
    shape = (6, 9) if channels == 1 else (6, 9, channels)
    array = rng.integers(0, 65536, shape, dtype=np.uint16)
    bgr = array if channels == 1 else array[..., [2, 1, 0, 3][:channels]]
    cv2.imwrite(str(tmp_path / "deep.png"), bgr)
    picture = read_image(tmp_path / "deep.png")
    assert picture.bits == 16 and picture.grey == (channels == 1)
    got = to_array(picture.rgb, picture.alpha, 16)
    expected = np.repeat(array[..., None], 3, axis=2) if channels == 1 else array
    np.testing.assert_array_equal(got, expected)
    # values that 8 bits cannot hold survive
    assert not torch.equal(picture.rgb, torch.round(picture.rgb * 255) / 255)


def test_16bit_tiff_colour(tmp_path: Path) -> None:
    array = np.random.default_rng(1).integers(0, 65536, (5, 4, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "deep.tif"), array[..., ::-1])
    picture = read_image(tmp_path / "deep.tif")
    assert picture.bits == 16
    np.testing.assert_array_equal(to_array(picture.rgb, None, 16), array)


def test_broken_files_give_one_line_errors(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "text.jpg").write_text("this is not a JPEG\n")
    (tmp_path / "empty.png").write_bytes(b"")
    cases = {"cut.png": "truncated", "text.jpg": "not an image", "empty.png": "empty"}
    for name, words in cases.items():
        with pytest.raises(ImageReadError) as info:
            read_image(tmp_path / name)
        message = str(info.value)
        assert words in message and "\n" not in message
    with pytest.raises(ImageReadError, match="No such file"):
        read_image(tmp_path / "missing.png")


def test_write_png_16bit_and_text_chunks(tmp_path: Path) -> None:
    rgb = torch.rand(3, 5, 7)
    write_image(tmp_path / "deep.png", rgb, bits=16)
    back = read_image(tmp_path / "deep.png")
    assert back.bits == 16
    torch.testing.assert_close(back.rgb, torch.round(rgb * 65535) / 65535, atol=0, rtol=0)

    write_image(tmp_path / "lr.png", rgb, text={imageio.SOURCE_SIZE_KEY: "27x19"})
    assert read_image(tmp_path / "lr.png").text[imageio.SOURCE_SIZE_KEY] == "27x19"


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("with_alpha", [False, True])
def test_png_encoder_is_exact_and_valid_with_text(tmp_path: Path, bits: int, with_alpha: bool):
    """Our PNG writer (OpenCV + inserted tEXt chunks) against Pillow's and OpenCV's readers."""
    gen = torch.Generator().manual_seed(bits + with_alpha)
    rgb, alpha = torch.rand(3, 23, 31, generator=gen), torch.rand(1, 23, 31, generator=gen)
    alpha = alpha if with_alpha else None
    text = {imageio.SOURCE_SIZE_KEY: "123x89", imageio.SCALE_KEY: "4", "Comment": "caf\xe9"}
    path = tmp_path / "out.png"
    write_image(path, rgb, alpha, bits=bits, text=text)
    with Image.open(path) as im:
        im.verify()  # chunk CRCs and structure
    with Image.open(path) as im:
        assert im.text == text and im.size == (31, 23)
    expected = to_array(rgb, alpha, bits)
    decoded = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    channels = [2, 1, 0, 3] if with_alpha else [2, 1, 0]
    np.testing.assert_array_equal(decoded[..., channels], expected)
    assert decoded.dtype == (np.uint16 if bits == 16 else np.uint8)
    assert read_image(path).text == text


def test_lossless_webp_is_exact_even_under_transparent_pixels(tmp_path: Path) -> None:
    rgb = torch.round(torch.rand(3, 6, 8) * 255) / 255
    alpha = torch.zeros(1, 6, 8)  # fully transparent: lossy encoders would discard the colour
    write_image(tmp_path / "x.webp", rgb, alpha)
    back = read_image(tmp_path / "x.webp")
    assert torch.equal(back.rgb, rgb) and torch.equal(back.alpha, alpha)


def test_atomic_write_leaves_no_temp_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(ImageWriteError, match="No space left"):
        write_image(tmp_path / "out.png", torch.rand(3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_interrupted_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_image(tmp_path / "out.png", torch.rand(3, 4, 4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
def test_atomic_write_into_a_pipe_writes_through(tmp_path: Path) -> None:
    # `--json /dev/stdout` or a named pipe: the pipe must stay a pipe and get the bytes.
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    payload = os.urandom(100_000)  # more than a pipe buffer, so the reader must drain it
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    imageio.atomic_write_bytes(fifo, payload)
    reader.join(timeout=10)
    assert received == [payload]
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_write_into_a_folder_says_so(tmp_path: Path) -> None:
    (tmp_path / "out.png").mkdir()
    with pytest.raises(ImageWriteError, match="out.png"):
        write_image(tmp_path / "out.png", torch.rand(3, 4, 4))
    assert (tmp_path / "out.png").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_encode_errors_write_nothing(tmp_path: Path) -> None:
    with pytest.raises(ImageWriteError, match="transparency"):
        write_image(tmp_path / "x.jpg", torch.rand(3, 4, 4), torch.rand(1, 4, 4))
    with pytest.raises(ImageWriteError):
        write_image(tmp_path / "x.gif", torch.rand(3, 4, 4))
    assert list(tmp_path.iterdir()) == []


def test_find_images(tmp_path: Path) -> None:
    for rel in ["b.png", "a.JPG", "notes.txt", ".hidden.png", "sub/c.webp", ".git/d.png"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    names = lambda paths: [p.relative_to(tmp_path).as_posix() for p in paths]  # noqa: E731
    assert names(find_images(tmp_path)) == ["a.JPG", "b.png"]
    assert names(find_images(tmp_path, recursive=True)) == ["a.JPG", "b.png", "sub/c.webp"]


def test_picture_from_array_kinds() -> None:
    grey16 = np.array([[0, 65535]], dtype=np.uint16)
    picture = imageio.picture_from_array(grey16)
    assert picture.bits == 16 and picture.grey and picture.rgb.shape == (3, 1, 2)
    assert picture.rgb[:, 0, 1].tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        imageio.picture_from_array(np.zeros((2, 2, 5), np.uint8))
