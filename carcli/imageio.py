"""Reading, writing and finding images.

Everything the rest of carcli sees of an image is a :class:`Picture`: a
3 x H x W float32 RGB tensor in [0, 1], an optional alpha plane, the source
bit depth and the PNG text chunks. This module is the only place that knows
about file formats, EXIF orientation, colour modes, colour profiles, 16-bit
decoding and standard input/output (``-``).

Colour: the networks were trained on sRGB images, so an embedded ICC profile
that is not sRGB (Display P3, Adobe RGB, a CMYK press profile) is converted to
sRGB on reading, and every output is written as sRGB (untagged, which viewers
take as sRGB). Colours outside sRGB's gamut are clipped; ``Picture.notes``
says which profile was converted, so the command can tell the user.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import secrets
import stat
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import PIL
import torch
from PIL import Image, UnidentifiedImageError, features

from carcli.formats import (  # noqa: F401  (re-exported: the light part of this module)
    FORMATS,
    HEIF_EXTRA_HINT,
    IMAGE_SUFFIXES,
    SCALE_KEY,
    SOURCE_SIZE_KEY,
    STDIO,
    ImageReadError,
    ImageWriteError,
    find_images,
    format_for_suffix,
    is_image_path,
    is_stdio,
    note_xmp,
    output_name,
    parse_note_xmp,
    read_note,
    read_png_text,
    read_stdin,
)

# Decoded formats: Pillow's names (AVIF natively in Pillow >= 11.2; HEIF via pillow-heif).
_READ_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF", "MPO", "DIB", "AVIF", "HEIF"})
# ISO-BMFF brands (bytes 8..12 of the file) of HEIF images that need pillow-heif.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})

_TEMP_MARKER = ".carcli-tmp-"
_EXIF_ORIENTATION = 0x0112
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


@dataclass
class Picture:
    """An image as carcli processes it: float RGB (+ alpha) and what is needed to write it back."""

    rgb: torch.Tensor  # 3 x H x W float32 in [0, 1]
    alpha: torch.Tensor | None = None  # 1 x H x W float32 in [0, 1]
    bits: int = 8  # precision of the source samples: 8 or 16
    grey: bool = False  # the source had a single colour channel
    text: dict[str, str] = field(default_factory=dict)  # PNG text chunks
    notes: list[str] = field(default_factory=list)  # what reading changed (colour profile)
    # What reading could not keep (frames after the first, clipped float samples):
    # printed as warnings naming the file, even with --quiet.
    warnings: list[str] = field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.rgb.shape[-2])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[-1])


# --------------------------------------------------------------------------- reading


def read_image(path: Path | str) -> Picture:
    """Decode an image file, upright (EXIF orientation applied), as RGB float.

    Raises :class:`ImageReadError` with a one-line reason for anything that is
    not a complete, supported image.
    """
    if is_stdio(path):
        return decode_image(read_stdin())
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # stat never blocks; opening a FIFO would, forever
    except OSError as exc:
        raise ImageReadError(exc.strerror or str(exc)) from None
    if stat.S_ISDIR(mode):
        raise ImageReadError("is a directory")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise ImageReadError(
            f"is {kind}, not a regular file (use - to read an image from standard input)"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageReadError(exc.strerror or str(exc)) from None
    return decode_image(data)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _damage(data: bytes) -> str | None:
    """Why a file that starts like a PNG/JPEG/WebP cannot be opened (None: not one of those).

    Pillow only says "cannot identify image file" for a PNG whose header is cut
    or fails its checksum; the user needs to hear that the file is a damaged
    image, not that it is not one.
    """
    if data.startswith(_PNG_SIGNATURE):
        if len(data) < 33:
            return f"damaged PNG: the file ends inside its header ({len(data)} bytes)"
        length, kind = struct.unpack(">I4s", data[8:16])
        if kind != b"IHDR" or length != 13:
            return "damaged PNG: the header chunk (IHDR) is missing or malformed"
        if zlib.crc32(data[12:29]) & 0xFFFFFFFF != struct.unpack(">I", data[29:33])[0]:
            return "damaged PNG: the header chunk (IHDR) fails its checksum"
        return f"damaged PNG: cut short or malformed after its header ({len(data)} bytes)"
    if data.startswith(b"\xff\xd8\xff"):
        return "damaged JPEG: its header cannot be read"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "damaged WebP: its header cannot be read"
    return None


def _is_heif(data: bytes) -> bool:
    return data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def _register_heif() -> bool:
    """Let Pillow open HEIC/HEIF through pillow-heif (the ``heif`` extra); False if missing."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def decode_image(data: bytes) -> Picture:
    """Decode encoded image bytes (see :func:`read_image`)."""
    if not data:
        raise ImageReadError("empty file")
    if _is_heif(data) and not _register_heif():
        raise ImageReadError(f"HEIC/HEIF image: {HEIF_EXTRA_HINT}")
    if data[4:12] in (b"ftypavif", b"ftypavis") and not features.check("avif"):
        raise ImageReadError(
            f"AVIF image: this Pillow {PIL.__version__} cannot decode AVIF (newer Pillow "
            "wheels can: pip install -U pillow)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            im.load()  # decode everything now so truncation shows up here
    except UnidentifiedImageError:
        raise ImageReadError(_damage(data) or "not an image, or not a supported format") from None
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"image too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = str(exc).strip().rstrip(".") or type(exc).__name__
        if "truncated" in reason.lower():
            reason = "truncated image data"
        raise ImageReadError(f"corrupt image: {reason}") from None
    if im.format not in _READ_FORMATS:
        raise ImageReadError(f"unsupported format {im.format}")

    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    text = {str(k): str(v) for k, v in getattr(im, "text", {}).items()}
    if isinstance(im.info.get("xmp"), (bytes, str)):
        text.update(parse_note_xmp(im.info["xmp"]))
    if _is_16bit_colour(data, im):
        # Pillow reduces 16-bit colour to 8 bits; OpenCV keeps every bit.
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if array is None or array.dtype != np.uint16:
            raise ImageReadError("corrupt 16-bit image data")
        if array.ndim == 3:
            order = [2, 1, 0, 3] if array.shape[2] == 4 else [2, 1, 0]
            array = array[..., order]
        grey = array.ndim == 2
        notes = []
    else:
        im, notes = to_srgb(im)
        array, grey = _pil_to_array(im)
    array = apply_orientation(array, orientation)
    picture = picture_from_array(array)
    if picture.bits == 16 and not grey:
        notes = _to_srgb_16bit(picture, im.info.get("icc_profile"))
    picture.grey = grey
    picture.text = text
    picture.notes = notes
    picture.warnings = _lost_on_reading(im)
    return picture


def _lost_on_reading(im: Image.Image) -> list[str]:
    """What of the file carcli does not process: frames after the first, clipped samples."""
    lost = []
    frames = getattr(im, "n_frames", 1)
    if isinstance(frames, int) and frames > 1:
        kind = "pages" if im.format == "TIFF" else "frames"
        lost.append(f"has {frames} {kind}; only the first is processed")
    if im.mode == "F":
        low, high = im.getextrema()
        if low < 0.0 or high > 1.0:
            lost.append(
                f"float samples span [{low:.4g}, {high:.4g}]; carcli reads float images as "
                "[0, 1] and clips the rest (scale the image to [0, 1] first)"
            )
    return lost


# --------------------------------------------------------------------------- colour profiles


@functools.lru_cache(maxsize=1)
def _srgb_profile() -> Any:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _profile_name(profile: Any) -> str:
    from PIL import ImageCms

    try:
        name = ImageCms.getProfileDescription(profile).strip()
    except ImageCms.PyCMSError:
        name = ""
    return name or "an unnamed profile"


@functools.lru_cache(maxsize=16)
def _srgb_transform(icc: bytes, mode: str) -> tuple[Any, str] | None:
    """(transform to sRGB, profile name) for an embedded profile, None if it is sRGB already.

    A profile counts as sRGB when it maps a 16^3 grid of colours to within one
    level of itself: then converting would only add rounding. Cached by the
    profile's bytes, since a batch of photos from one camera shares it.
    """
    from PIL import ImageCms

    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    transform = ImageCms.buildTransform(
        profile, _srgb_profile(), mode, "RGB", ImageCms.Intent.RELATIVE_COLORIMETRIC
    )
    if mode == "RGB":
        levels = np.linspace(0, 255, 16).round().astype(np.uint8)
        grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(64, 64, 3)
        probe = Image.fromarray(np.ascontiguousarray(grid), "RGB")
        mapped = np.asarray(ImageCms.applyTransform(probe, transform), dtype=np.int16)
        if np.abs(mapped - grid.astype(np.int16)).max() <= 1:
            return None
    return transform, _profile_name(profile)


def to_srgb(im: Image.Image) -> tuple[Image.Image, list[str]]:
    """The image converted from its embedded ICC profile to sRGB, and a note saying so.

    RGB(A), palette and CMYK images with a profile of their own colour space
    are converted (alpha is kept); sRGB profiles, grey images and images
    without a profile come back unchanged with no note.
    """
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "P", "PA", "CMYK", "RGBX"):
        return im, []
    from PIL import ImageCms

    alpha = None
    if im.mode in ("RGBA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha, im = rgba.getchannel("A"), rgba.convert("RGB")
    elif im.mode in ("P", "RGBX"):
        im = im.convert("RGB")
    try:
        found = _srgb_transform(bytes(icc), im.mode)
    except (ImageCms.PyCMSError, OSError, ValueError) as exc:
        reason = str(exc).strip().rstrip(".") or type(exc).__name__
        return im if alpha is None else _with_alpha(im, alpha), [
            f"ignored an embedded colour profile that cannot be used ({reason}); read as sRGB"
        ]
    if found is None:
        out = im if im.mode == "RGB" else im.convert("RGB")
        return (out if alpha is None else _with_alpha(out, alpha)), []
    transform, name = found
    out = ImageCms.applyTransform(im, transform)
    note = f"converted from the embedded colour profile '{name}' to sRGB (outputs are sRGB)"
    return (out if alpha is None else _with_alpha(out, alpha)), [note]


def _with_alpha(rgb: Image.Image, alpha: Image.Image) -> Image.Image:
    out = rgb.convert("RGBA")
    out.putalpha(alpha)
    return out


def _to_srgb_16bit(picture: Picture, icc: bytes | None) -> list[str]:
    """Convert a 16-bit picture's colours to sRGB in place, at full precision.

    Pillow's littleCMS binding is 8-bit only, so matrix/TRC profiles (Display
    P3, Adobe RGB, ProPhoto: what cameras and editors embed) are applied here in
    float: tone curves, the profile's D50 colorant matrix, sRGB's inverse
    matrix and curve, clipped to sRGB's gamut (as relative colorimetric).
    Other profiles (lookup tables) leave the values as they are, with a note.
    """
    if not icc:
        return []
    try:
        found = _srgb_transform(bytes(icc), "RGB")
    except Exception:
        return []
    if found is None:
        return []
    name = found[1]
    source, target = _matrix_trc(bytes(icc)), _matrix_trc(_srgb_icc())
    if source is None or target is None:
        return [
            f"16-bit image with the colour profile '{name}' (not a matrix/TRC profile): its "
            "values are used as sRGB (not converted), so colours may shift"
        ]
    matrix = torch.linalg.inv(target[0]) @ source[0]
    rgb = picture.rgb
    for top in range(0, rgb.shape[1], 256):  # bands: bounded memory for large photos
        band = rgb[:, top : top + 256]
        linear = torch.stack([curve(band[c]) for c, curve in enumerate(source[1])])
        mixed = torch.einsum("ij,jhw->ihw", matrix, linear.double()).float()
        band.copy_(_srgb_encode(mixed.clamp_(0.0, 1.0)))
    return [f"converted from the embedded colour profile '{name}' to sRGB (outputs are sRGB)"]


@functools.lru_cache(maxsize=1)
def _srgb_icc() -> bytes:
    return _srgb_profile().tobytes()


def _srgb_encode(linear: torch.Tensor) -> torch.Tensor:
    curved = 1.055 * linear.clamp(min=0.0031308) ** (1 / 2.4) - 0.055
    return torch.where(linear <= 0.0031308, linear * 12.92, curved)


Curve = Any  # torch.Tensor -> torch.Tensor


@functools.lru_cache(maxsize=16)
def _matrix_trc(icc: bytes) -> tuple[torch.Tensor, tuple[Curve, Curve, Curve]] | None:
    """(D50 colorant matrix, three tone curves) of an RGB matrix/TRC ICC profile, else None."""
    if len(icc) < 132 or icc[16:20] != b"RGB " or icc[20:24] != b"XYZ ":
        return None
    tags: dict[bytes, bytes] = {}
    (count,) = struct.unpack(">I", icc[128:132])
    for i in range(min(count, 100)):
        sig, offset, size = struct.unpack(">4sII", icc[132 + 12 * i : 144 + 12 * i])
        tags[sig] = icc[offset : offset + size]
    try:
        columns = [_xyz_tag(tags[k]) for k in (b"rXYZ", b"gXYZ", b"bXYZ")]
        curves = tuple(_curve_tag(tags[k]) for k in (b"rTRC", b"gTRC", b"bTRC"))
    except (KeyError, ValueError, struct.error):
        return None
    if any(c is None for c in curves):
        return None
    return torch.tensor(columns, dtype=torch.float64).T, curves  # type: ignore[return-value]


def _s15(data: bytes) -> list[float]:
    return [v / 65536.0 for v in struct.unpack(f">{len(data) // 4}i", data)]


def _xyz_tag(data: bytes) -> list[float]:
    if data[:4] != b"XYZ ":
        raise ValueError("not an XYZ tag")
    return _s15(data[8:20])


def _curve_tag(data: bytes) -> Curve | None:
    """A tone curve (curv: identity, gamma or table; para: ICC function types 0-4)."""
    if data[:4] == b"curv":
        (n,) = struct.unpack(">I", data[8:12])
        if n == 0:
            return lambda x: x
        if n == 1:
            gamma = struct.unpack(">H", data[12:14])[0] / 256.0
            return lambda x: x.clamp(0.0, 1.0) ** gamma
        table = torch.tensor(struct.unpack(f">{n}H", data[12 : 12 + 2 * n]), dtype=torch.float32)
        table = table / 65535.0

        def lookup(x: torch.Tensor) -> torch.Tensor:
            pos = x.clamp(0.0, 1.0) * (n - 1)
            low = pos.floor().long().clamp(max=n - 2)
            frac = pos - low
            return table[low] * (1 - frac) + table[low + 1] * frac

        return lookup
    if data[:4] == b"para":
        kind = struct.unpack(">H", data[8:10])[0]
        counts = {0: 1, 1: 3, 2: 4, 3: 5, 4: 7}
        if kind not in counts:
            return None
        p = _s15(data[12 : 12 + 4 * counts[kind]]) + [0.0] * 7
        g, a, b, c, d, e, f = p[:7]
        if kind == 0:
            return lambda x: x.clamp(0.0, 1.0) ** g
        if kind == 1:  # (ax + b)^g for x >= -b/a, else 0
            return lambda x: (a * x + b).clamp(min=0.0) ** g
        if kind == 2:  # (ax + b)^g + c for x >= -b/a, else c
            return lambda x: (a * x + b).clamp(min=0.0) ** g + c
        if kind == 3:  # (ax + b)^g for x >= d, else cx
            return lambda x: torch.where(x >= d, (a * x + b).clamp(min=0.0) ** g, c * x)
        return lambda x: torch.where(x >= d, (a * x + b).clamp(min=0.0) ** g + e, c * x + f)
    return None


def _is_16bit_colour(data: bytes, im: Image.Image) -> bool:
    """Whether the file has 16-bit colour samples (which Pillow would truncate)."""
    if im.format == "PNG":
        # IHDR: bit depth at byte 24, colour type at 25 (2 RGB, 4 grey+alpha, 6 RGBA).
        return len(data) > 25 and data[24] == 16 and data[25] in (2, 4, 6)
    if im.format == "TIFF":
        bits = im.tag_v2.get(258, (8,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        return 16 in bits and im.mode not in _GREY_MODES
    return False


def _pil_to_array(im: Image.Image) -> tuple[np.ndarray, bool]:
    """Pixels of a decoded PIL image as HxW (grey), HxWx2 (grey+alpha), HxWx3 or HxWx4."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        return np.clip(np.asarray(im, dtype=np.int64), 0, 65535).astype(np.uint16), True
    if mode == "F":  # float TIFF: assumed to be in [0, 1] like everything else here
        return np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0), True
    if mode in ("1", "L"):
        return np.asarray(im.convert("L")), True
    if mode in ("LA", "La"):
        return np.asarray(im.convert("LA")), True
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        return np.asarray(im.convert("RGBA" if has_alpha else "RGB")), False
    if mode in ("RGBA", "RGBa"):
        return np.asarray(im.convert("RGBA")), False
    return np.asarray(im.convert("RGB")), False  # RGB, CMYK, YCbCr, LAB, HSV, RGBX


def apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an HxW[xC] array upright according to its EXIF orientation tag (1-8)."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.swapaxes(0, 1),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
        8: lambda a: np.rot90(a, 1),
    }
    op = ops.get(orientation) if isinstance(orientation, int) else None
    return np.ascontiguousarray(op(array)) if op else array


def picture_from_array(array: np.ndarray) -> Picture:
    """A :class:`Picture` from an HxW, HxWx1, HxWx2, HxWx3 or HxWx4 uint8/uint16/float array."""
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"expected an HxW or HxWxC image with C in 1..4, got {array.shape}")
    # Planar first, in the narrow integer type, then one float copy: a 24 MP photo
    # then peaks at about 1.5x its float size instead of 3x.
    if array.dtype == np.uint8:
        bits, peak = 8, 255.0
    elif array.dtype == np.uint16:
        bits, peak = 16, 65535.0
        array = array.astype(np.int32)  # torch has no uint16 arithmetic everywhere
    elif np.issubdtype(array.dtype, np.floating):
        bits, peak = 16, 1.0
        array = np.clip(array, 0.0, 1.0).astype(np.float32)
    else:
        raise ValueError(f"unsupported pixel type {array.dtype}")
    with warnings.catch_warnings():  # read-only decoder buffers: only ever copied from here
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        planar = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).contiguous()
    del array
    tensor = planar.to(torch.float32)
    del planar
    if peak != 1.0:
        tensor.div_(peak)
    channels = tensor.shape[0]
    colour = tensor[:3] if channels >= 3 else tensor[:1].expand(3, -1, -1).contiguous()
    alpha = tensor[channels - 1 :] if channels in (2, 4) else None
    return Picture(rgb=colour, alpha=alpha, bits=bits, grey=channels <= 2)


def picture_from_pil(im: Image.Image) -> Picture:
    """A :class:`Picture` from an in-memory PIL image (colour modes and profiles as in
    :func:`read_image`)."""
    text = {str(k): str(v) for k, v in getattr(im, "text", {}).items()}
    if isinstance(im.info.get("xmp"), (bytes, str)):  # a WebP/JPEG that carcli wrote
        text.update(parse_note_xmp(im.info["xmp"]))
    im, notes = to_srgb(im)
    array, grey = _pil_to_array(im)
    picture = picture_from_array(array)
    picture.grey = grey
    picture.text = text
    picture.notes = notes
    return picture


# --------------------------------------------------------------------------- writing


def to_array(rgb: torch.Tensor, alpha: torch.Tensor | None = None, bits: int = 8) -> np.ndarray:
    """HxWx3 (or HxWx4 with alpha) uint8/uint16 array, rounded from [0, 1] floats."""
    planes = rgb if alpha is None else torch.cat([rgb, alpha.to(rgb.dtype)], dim=0)
    peak, dtype = (65535.0, np.uint16) if bits == 16 else (255.0, np.uint8)
    values = torch.round(planes.detach().float().cpu().clamp(0.0, 1.0) * peak)
    return values.permute(1, 2, 0).numpy().astype(dtype)


def encode_image(
    rgb: torch.Tensor,
    alpha: torch.Tensor | None = None,
    *,
    fmt: str = "png",
    bits: int = 8,
    text: dict[str, str] | None = None,
    quality: int = 95,
) -> bytes:
    """Encode to PNG (8 or 16 bit), lossless WebP or JPEG; formats without 16 bits get 8."""
    if fmt not in FORMATS:
        raise ImageWriteError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not FORMATS[fmt][2]:
        bits = 8
    if fmt == "jpg" and alpha is not None:
        raise ImageWriteError("JPEG cannot store transparency; choose PNG or WebP")
    array = to_array(rgb, alpha, bits)
    if fmt == "png":
        return encode_png(array, text)
    im = Image.fromarray(array, "RGBA" if array.shape[2] == 4 else "RGB")
    # WebP and JPEG have no text chunks: carcli's note goes into XMP metadata there.
    note = {k: v for k, v in (text or {}).items() if k.startswith("carcli:")}
    xmp = {"xmp": note_xmp(note)} if note else {}
    buf = io.BytesIO()
    if fmt == "webp":
        # exact=True keeps the colour of fully transparent pixels; lossless keeps every value.
        im.save(buf, "WEBP", lossless=True, quality=100, method=4, exact=True, **xmp)
    else:
        im.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, **xmp)
    return buf.getvalue()


def encode_png(array: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """PNG of an HxWx3/4 uint8 or uint16 array, with ``text`` as tEXt chunks.

    OpenCV's default setting (zlib level 1, filtered) encodes a 2 MP photo
    about 10x faster than Pillow's level 6 for files about 6 % larger, which
    is what lets a background thread keep up with the networks on two cores
    (``bench/throughput.py``). It also writes 16-bit colour, which Pillow cannot.
    """
    bgr = array[..., [2, 1, 0, 3] if array.shape[2] == 4 else [2, 1, 0]]
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise ImageWriteError("could not encode the PNG")
    data = encoded.tobytes()
    if not text:
        return data
    chunks = b"".join(_png_chunk(b"tEXt", _text_payload(k, v)) for k, v in text.items())
    header_end = 8 + 8 + 13 + 4  # signature, then IHDR (length, type, 13 data bytes, CRC)
    return data[:header_end] + chunks + data[header_end:]


def _text_payload(key: str, value: str) -> bytes:
    keyword = key.encode("latin-1")
    if not 1 <= len(keyword) <= 79 or b"\0" in keyword:
        raise ImageWriteError(f"invalid PNG text key {key!r}")
    return keyword + b"\0" + value.encode("latin-1")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def write_image(
    path: Path | str,
    rgb: torch.Tensor,
    alpha: torch.Tensor | None = None,
    *,
    fmt: str | None = None,
    bits: int = 8,
    text: dict[str, str] | None = None,
    quality: int = 95,
) -> None:
    """Encode and write atomically; the format follows the suffix unless ``fmt`` is given."""
    path = Path(path)
    fmt = fmt or ("png" if is_stdio(path) else format_for_suffix(path.suffix))
    data = encode_image(rgb, alpha, fmt=fmt, bits=bits, text=text, quality=quality)
    atomic_write_bytes(path, data)


def save(
    image: Any,
    path: Path | str,
    *,
    source_size: tuple[int, int] | None = None,
    scale: int | None = None,
    quality: int = 95,
) -> None:
    """Save an image from carcli's Python API, keeping the note that restores its size.

    ``carcli.downscale`` returns a PIL image whose ``info`` holds the original
    size; ``Image.save`` drops it, and a later upscale of a 227x341 photo then
    gives 228x344. This writes it as the PNG text chunks ``car downscale``
    writes, so ``car upscale`` and :func:`carcli.upscale` restore 227x341::

        >>> small = carcli.downscale(Image.open("photo.jpg"), scale=4)
        >>> carcli.save(small, "small.png")          # keeps carcli:source-size
        >>> restored = carcli.upscale(Image.open("small.png"), scale=4)  # 227x341 again

    ``image`` is a PIL image, an HxW[xC] uint8/uint16/float array or a 3xHxW
    float tensor; for arrays and tensors (which carry no note) pass
    ``source_size=(height, width)`` and ``scale``. The format follows the
    suffix (PNG, lossless WebP or JPEG; the note goes into PNG text chunks or
    WebP/JPEG XMP). Written atomically; ``"-"`` writes PNG to standard output.
    """
    text: dict[str, str] = {}
    if isinstance(image, Image.Image):
        text = {str(k): str(v) for k, v in image.info.items() if str(k).startswith("carcli:")}
        picture = picture_from_pil(image)
    elif isinstance(image, np.ndarray):
        picture = picture_from_array(image)
    elif isinstance(image, torch.Tensor):
        if not image.is_floating_point() or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError("tensors must be float 3xHxW in [0, 1]")
        picture = Picture(rgb=image.detach().float().clamp(0, 1).cpu(), bits=8)
    else:
        raise TypeError(f"expected a PIL image, a numpy array or a tensor, got {type(image)}")
    if source_size is not None:
        height, width = source_size
        text[SOURCE_SIZE_KEY] = f"{int(width)}x{int(height)}"
    if scale is not None:
        text[SCALE_KEY] = str(int(scale))
    write_image(
        path, picture.rgb, picture.alpha, bits=picture.bits, text=text or None, quality=quality
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a hidden temp file in the same folder and rename, so no partial file is left.

    An interrupted batch therefore never leaves a half-written output that a
    resumed run would skip as done. A target that exists but is not a regular
    file (``/dev/stdout``, a FIFO, ``/dev/null``) is written into instead: a
    rename would swap the device or pipe itself out for a plain file.
    """
    if is_stdio(path):
        write_stdout(data)
        return
    path = Path(path)
    if path.is_dir():
        raise ImageWriteError(f"cannot write {path}: a folder of that name is in the way")
    if path.exists() and not path.is_file():
        try:
            with open(path, "wb") as handle:
                handle.write(data)
        except OSError as exc:
            raise ImageWriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        return
    blocker = blocked_parent(path)
    if blocker is not None:
        raise ImageWriteError(f"cannot write {path}: {blocker} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageWriteError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
    temp = path.with_name(f"{_temp_prefix(path)}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        # The cleanup must not raise in its turn (on a read-only file system, unlink
        # fails too) and hide the reason, nor name the temp file instead of PATH.
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ImageWriteError(f"cannot write {path}: {exc.strerror or exc}") from None
        raise


def _temp_prefix(path: Path) -> str:
    """The start of ``path``'s temp file names: ``.NAME.carcli-tmp-`` (then pid and a tag).

    A name near the file system's 255-byte limit has no room for the additions,
    so its temp files are named by a digest of it instead: the output itself
    would fit, and must not fail only because its temp file does not.
    """
    prefix = f".{path.name}{_TEMP_MARKER}"
    if len(os.fsencode(prefix)) > 200:
        prefix = f".{hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]}{_TEMP_MARKER}"
    return prefix


def remove_stale_temps(path: Path) -> int:
    """Delete temp files of ``path`` that interrupted runs left; how many were removed.

    A temp file names the process that wrote it; one whose process is gone
    (killed in the middle of a write, say) is a leftover. Temp files of live
    processes, another run writing the same output, are left alone.
    """
    path = Path(path)
    prefix = _temp_prefix(path)
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix)]
    except OSError:
        return 0
    removed = 0
    for name in names:
        owner = name[len(prefix) :].split("-", 1)[0]
        if owner.isdigit() and _process_alive(int(owner)):
            continue
        with contextlib.suppress(OSError):
            (path.parent / name).unlink()
            removed += 1
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def write_stdout(data: bytes) -> None:
    """Write encoded bytes to standard output (binary) and flush."""
    stream = sys.stdout.buffer if sys.stdout is not None else None
    if stream is None:
        raise ImageWriteError("cannot write to standard output: there is none")
    try:
        stream.write(data)
        stream.flush()
    except BrokenPipeError:
        raise ImageWriteError("cannot write to standard output: the pipe was closed") from None
    except OSError as exc:
        raise ImageWriteError(f"cannot write to standard output: {exc.strerror or exc}") from None


def blocked_parent(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a folder (so nothing fits below)."""
    for parent in Path(path).parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def is_temp_file(path: Path) -> bool:
    """Whether ``path`` is one of our in-progress temp files."""
    return _TEMP_MARKER in path.name
