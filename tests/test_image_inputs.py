"""Images people have: colour profiles, AVIF, HEIC, standard input/output, the API's save helper."""

from __future__ import annotations

import io
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from iccbuild import DISPLAY_P3, convert_by_hand, convert_float, rgb_profile
from PIL import Image, ImageCms

from carcli import imageio
from carcli.imageio import (
    SCALE_KEY,
    SOURCE_SIZE_KEY,
    ImageReadError,
    decode_image,
    encode_png,
    read_image,
    to_array,
    write_image,
)

P3 = rgb_profile("Display P3 (test)", DISPLAY_P3)
# A few colours inside both gamuts and some outside sRGB (clipped), greys, black and white.
COLOURS = np.array(
    [[[200, 100, 50], [128, 128, 128], [30, 160, 220], [255, 255, 255], [0, 0, 0], [90, 200, 90]]],
    np.uint8,
)


def as_uint8(picture: imageio.Picture) -> np.ndarray:
    return to_array(picture.rgb, picture.alpha, 8)


def test_built_profile_is_read_by_littlecms_as_display_p3() -> None:
    profile = ImageCms.ImageCmsProfile(io.BytesIO(P3))
    assert ImageCms.getProfileDescription(profile).strip() == "Display P3 (test)"
    assert profile.profile.xcolor_space == "RGB "


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "TIFF"])
def test_display_p3_photo_is_converted_to_srgb(tmp_path: Path, fmt: str) -> None:
    array = np.concatenate([np.repeat(COLOURS, 4, axis=0), photo(4, 6)], axis=0)
    path = tmp_path / f"p3.{fmt.lower()}"
    kwargs = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    if fmt == "WEBP":
        kwargs = {"lossless": True}
    Image.fromarray(array).save(path, fmt, icc_profile=P3, **kwargs)
    stored = np.asarray(Image.open(path).convert("RGB"))  # what the file holds (P3 values)

    picture = read_image(path)

    # Independent check: the colour maths by hand (linearise, P3 -> XYZ -> sRGB, encode).
    expected = convert_by_hand(stored)
    got = as_uint8(picture)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    # Real shifts: P3's (200, 100, 50) is sRGB's (215, 93, 31); greys stay put.
    if fmt != "JPEG":
        assert got[0, 0].tolist() == [215, 93, 31]
        assert got[0, 1].tolist() == [128, 128, 128]
    assert picture.notes == [
        "converted from the embedded colour profile 'Display P3 (test)' to sRGB (outputs are sRGB)"
    ]


def test_srgb_profile_changes_nothing(tmp_path: Path) -> None:
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    array = photo(9, 11)
    path = tmp_path / "srgb.png"
    Image.fromarray(array).save(path, icc_profile=srgb)
    picture = read_image(path)
    np.testing.assert_array_equal(as_uint8(picture), array)
    assert picture.notes == []


def test_profile_conversion_keeps_alpha(tmp_path: Path) -> None:
    array = photo(6, 6, channels=4)
    path = tmp_path / "p3a.png"
    Image.fromarray(array, "RGBA").save(path, icc_profile=P3)
    got = as_uint8(read_image(path))
    np.testing.assert_array_equal(got[..., 3], array[..., 3])
    expected = convert_by_hand(np.ascontiguousarray(array[..., :3]))
    assert np.abs(got[..., :3].astype(int) - expected.astype(int)).max() <= 1


def test_unusable_profile_is_ignored_with_a_note(tmp_path: Path) -> None:
    array = photo(5, 7)
    path = tmp_path / "bad.png"
    Image.fromarray(array).save(path, icc_profile=b"not an icc profile at all" * 8)
    picture = read_image(path)
    np.testing.assert_array_equal(as_uint8(picture), array)
    assert len(picture.notes) == 1 and picture.notes[0].startswith("ignored an embedded colour")


def _with_iccp(png: bytes, icc: bytes) -> bytes:
    return png[:33] + imageio._png_chunk(b"iCCP", b"p3\0\0" + zlib.compress(icc)) + png[33:]


def test_16bit_image_is_converted_at_full_precision() -> None:
    """littleCMS in Pillow is 8-bit only; 16-bit matrix/TRC profiles are applied in float."""
    array = (photo(9, 7).astype(np.uint16) * 257) + 3
    array[0, :6] = (np.repeat(COLOURS[0], 1, axis=0).astype(np.uint16) * 257)[:6]
    picture = decode_image(_with_iccp(encode_png(array), P3))
    assert picture.bits == 16
    assert picture.notes == [
        "converted from the embedded colour profile 'Display P3 (test)' to sRGB (outputs are sRGB)"
    ]
    got = picture.rgb.permute(1, 2, 0).numpy()
    expected = convert_float(array / 65535.0)  # the maths by hand, in float
    assert np.abs(got - expected).max() < 1e-3  # (colorants differ in the 4th decimal)
    assert np.abs(got - expected).mean() < 2e-4
    # And littleCMS on the 8-bit version of the same image agrees within one level.
    im8 = Image.fromarray((array // 257).astype(np.uint8))
    im8.info["icc_profile"] = P3
    via_lcms = np.asarray(imageio.to_srgb(im8)[0], dtype=int)
    assert np.abs(np.round(got * 255).astype(int) - via_lcms).max() <= 1
    assert (np.round(got[0, 0] * 255)).tolist() == [215, 93, 31]


def test_only_matrix_trc_profiles_are_applied_in_float() -> None:
    lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    assert imageio._matrix_trc(P3) is not None
    assert imageio._matrix_trc(lab) is None  # not RGB
    assert imageio._matrix_trc(P3.replace(b"rTRC", b"xTRC")) is None  # a curve missing
    assert imageio._matrix_trc(P3[:120]) is None  # truncated


def test_pil_images_from_the_api_are_converted_too() -> None:
    from carcli.imageio import picture_from_pil

    im = Image.fromarray(np.repeat(COLOURS, 2, axis=0))
    im.info["icc_profile"] = P3
    picture = picture_from_pil(im)
    assert as_uint8(picture)[0, 0].tolist() == [215, 93, 31]


# --------------------------------------------------------------------------- AVIF and HEIC


def test_avif_is_read(tmp_path: Path) -> None:
    Image.init()
    if "AVIF" not in Image.SAVE:
        pytest.skip("this Pillow has no AVIF encoder")
    path = tmp_path / "photo.avif"
    Image.fromarray(photo(13, 17)).save(path, "AVIF", quality=95)
    picture = read_image(path)
    assert (picture.height, picture.width) == (13, 17)
    np.testing.assert_array_equal(as_uint8(picture), np.asarray(Image.open(path).convert("RGB")))
    assert path in imageio.find_images(tmp_path)


def test_heic_is_read_with_the_extra(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    path = tmp_path / "photo.heic"
    pillow_heif.from_pillow(Image.fromarray(photo(16, 24))).save(path, quality=95)
    picture = read_image(path)
    assert (picture.height, picture.width) == (16, 24)
    np.testing.assert_array_equal(as_uint8(picture), np.asarray(Image.open(path).convert("RGB")))
    assert path in imageio.find_images(tmp_path)


def test_heic_without_the_extra_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import fails as if not installed
    fake_heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64
    with pytest.raises(ImageReadError) as info:
        decode_image(fake_heic)
    assert str(info.value) == (
        "HEIC/HEIF image: reading HEIC/HEIF needs the optional extra: pip install 'carcli[heif]'"
    )


# --------------------------------------------------------------------------- stdin and stdout


@pytest.fixture(autouse=True)
def _fresh_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Standard input is read once per process; each test starts unread."""
    from carcli import formats

    monkeypatch.setattr(formats, "_stdin_data", None)


class _Stream:
    def __init__(self, data: bytes = b"", tty: bool = False) -> None:
        self.buffer = io.BytesIO(data)
        self.buffer.isatty = lambda: tty  # type: ignore[method-assign]


def test_dash_reads_standard_input(monkeypatch: pytest.MonkeyPatch) -> None:
    array = photo(7, 9)
    monkeypatch.setattr(sys, "stdin", _Stream(encode_png(array)))
    np.testing.assert_array_equal(as_uint8(read_image("-")), array)


def test_dash_refuses_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", _Stream(tty=True))
    with pytest.raises(ImageReadError, match="no image on standard input"):
        read_image("-")


def test_dash_writes_png_to_standard_output(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    out = _Stream()
    monkeypatch.setattr(sys, "stdout", out)
    array = photo(6, 8)
    rgb = torch.from_numpy(array).permute(2, 0, 1).float() / 255
    write_image("-", rgb, text={SOURCE_SIZE_KEY: "31x23", SCALE_KEY: "4"})
    data = out.buffer.getvalue()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data))
    assert im.text[SOURCE_SIZE_KEY] == "31x23"
    np.testing.assert_array_equal(np.asarray(im), array)


# --------------------------------------------------------------------------- API save helper


def test_save_keeps_the_source_size_note(tmp_path: Path, tiny_weights: Path) -> None:
    import carcli

    original = Image.fromarray(photo(341, 227, seed=3))  # 227 wide, 341 high
    small = carcli.downscale(original, scale=4, weights=tiny_weights, device="cpu")
    assert small.size == (57, 86)

    plain, kept = tmp_path / "plain.png", tmp_path / "kept.png"
    small.save(plain)  # plain PIL: the note is lost
    carcli.save(small, kept)
    assert Image.open(kept).text == {SOURCE_SIZE_KEY: "227x341", SCALE_KEY: "4"}
    np.testing.assert_array_equal(np.asarray(Image.open(kept)), np.asarray(small))

    lost = carcli.upscale(Image.open(plain), scale=4, weights=tiny_weights, device="cpu")
    restored = carcli.upscale(Image.open(kept), scale=4, weights=tiny_weights, device="cpu")
    assert lost.size == (228, 344)
    assert restored.size == (227, 341)
    carcli.save(small, tmp_path / "kept.webp")  # lossless WebP: the note goes into XMP
    webp = carcli.upscale(Image.open(tmp_path / "kept.webp"), 4, tiny_weights, device="cpu")
    assert webp.size == (227, 341)


@pytest.mark.parametrize("fmt", ["png", "webp", "jpg"])
def test_note_survives_every_output_format(tmp_path: Path, fmt: str) -> None:
    """PNG keeps carcli's note in text chunks; WebP and JPEG in XMP (they have no text chunks),
    so an LR saved as lossless WebP still upscales to its exact original size."""
    import torch

    from carcli.formats import read_note

    note = {SOURCE_SIZE_KEY: "199x157", SCALE_KEY: "4"}
    path = tmp_path / f"small.{fmt}"
    write_image(path, torch.from_numpy(photo(40, 50)).permute(2, 0, 1) / 255.0, text=note)
    assert read_note(path) == note  # without decoding (car upscale picks scale and model)
    assert read_image(path).text == note
    assert read_note(tmp_path / "missing.png") == {}


def test_save_of_an_array_takes_the_size_explicitly(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    imageio.save(photo(86, 57), path, source_size=(341, 227), scale=4)
    assert Image.open(path).text == {SOURCE_SIZE_KEY: "227x341", SCALE_KEY: "4"}
    assert read_image(path).text[SOURCE_SIZE_KEY] == "227x341"
