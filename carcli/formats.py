"""File names, formats and PNG notes: the part of image I/O that needs no decoder.

Kept free of torch, OpenCV and numpy so that the command line can check its
arguments, list its inputs and plan its outputs (and refuse a bad command) in
a fraction of a second, before it loads any model. :mod:`carcli.imageio`
re-exports everything here.
"""

from __future__ import annotations

import io
import os
import re
import struct
import sys
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from carcli.defaults import SCALES
from carcli.errors import ImageReadError, ImageWriteError

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".avif", ".heic", ".heif"}
)
HEIF_EXTRA_HINT = "reading HEIC/HEIF needs the optional extra: pip install 'carcli[heif]'"

# ``-`` as INPUT or OUTPUT: standard input or output, as image tools allow.
STDIO = "-"
STDIN_NAME = "<stdin>"  # how messages and reports name that image (its outputs: stdin.png)

# PNG text chunks that ``car downscale`` writes so ``car upscale`` can restore the exact size.
SOURCE_SIZE_KEY = "carcli:source-size"  # "WxH" of the image that was downscaled
SCALE_KEY = "carcli:scale"  # the factor it was downscaled by

# Output formats: name -> (file suffix, lossless, can hold 16 bits per sample).
FORMATS: dict[str, tuple[str, bool, bool]] = {
    "png": (".png", True, True),
    "webp": (".webp", True, False),
    "jpg": (".jpg", False, False),
}
_SUFFIX_FORMATS = {".png": "png", ".webp": "webp", ".jpg": "jpg", ".jpeg": "jpg"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_stdio(path: Path | str | None) -> bool:
    """Whether a command-line path is ``-`` (standard input or output)."""
    return path is not None and str(path) == STDIO


def format_for_suffix(suffix: str) -> str:
    """Output format name for a file suffix (``.png`` -> ``png``)."""
    try:
        return _SUFFIX_FORMATS[suffix.lower()]
    except KeyError:
        names = ", ".join(sorted(_SUFFIX_FORMATS))
        raise ImageWriteError(
            f"cannot write {suffix or 'files without a suffix'}; use one of {names}"
        ) from None


def output_name(rel: Path, extension: str, suffix: str = "") -> Path:
    """``rel`` renamed for an output: ``photo.jpg`` -> ``photo{suffix}.png``.

    ``{ext}`` in ``suffix`` stands for the input's extension, so ``x.png`` and
    ``x.jpg`` in one folder can get distinct outputs (``--suffix _{ext}``).
    """
    tail = suffix.replace("{ext}", rel.suffix.lstrip(".").lower())
    stem = "stdin" if rel.name == STDIN_NAME else rel.stem
    return rel.with_name(stem + tail + extension)


_XMP_NS = "https://carcli.invalid/ns/note/1/"  # an identifier only; nothing is fetched
_XMP_JPEG_PREFIX = b"http://ns.adobe.com/xap/1.0/\0"
_NOTE_ATTR = re.compile(r'carcli:([A-Za-z0-9-]+)="([^"<>&]*)"')


def note_xmp(note: dict[str, str]) -> bytes:
    """carcli's note (``carcli:*`` keys) as an XMP packet, for WebP and JPEG outputs."""
    attrs = " ".join(
        f'{key}="{value}"'
        for key, value in note.items()
        if key.startswith("carcli:") and _NOTE_ATTR.fullmatch(f'{key}="{value}"')
    )
    return (
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        f'<rdf:Description rdf:about="" xmlns:carcli="{_XMP_NS}" {attrs}/>'
        "</rdf:RDF></x:xmpmeta>"
    ).encode()


def parse_note_xmp(xmp: bytes | str) -> dict[str, str]:
    """The ``carcli:*`` attributes of an XMP packet written by :func:`note_xmp`."""
    text = xmp.decode("utf-8", "replace") if isinstance(xmp, bytes) else xmp
    if _XMP_NS not in text:
        return {}
    return {f"carcli:{key}": value for key, value in _NOTE_ATTR.findall(text)}


def _open(source: Path | str | bytes) -> io.IOBase:
    """A binary handle on a file, standard input (``-``) or bytes already fetched."""
    if isinstance(source, bytes):
        return io.BytesIO(source)
    return io.BytesIO(read_stdin()) if is_stdio(source) else open(source, "rb")  # noqa: SIM115


def read_note(path: Path | str | bytes) -> dict[str, str]:
    """carcli's note of an image file without decoding it: PNG text chunks, or the XMP of a
    WebP or JPEG that ``car downscale`` wrote ({} when there is none).

    ``path`` may be the file's bytes: ``car batch`` fetches a remote file once, for its note
    and for decoding.
    """
    try:
        with _open(path) as handle:
            head = handle.read(12)
            if head[:8] == _PNG_SIGNATURE:
                text = read_png_text(path)
                return {k: v for k, v in text.items() if k.startswith("carcli:")}
            if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
                return _webp_note(handle)
            if head[:2] == b"\xff\xd8":
                handle.seek(2)
                return _jpeg_note(handle)
    except (OSError, ImageReadError, struct.error):
        return {}
    return {}


def made_by_car(note: Mapping[str, str]) -> bool:
    """Whether a file's note says ``car downscale`` made it (its source size is recorded)."""
    return SOURCE_SIZE_KEY in note


def note_scale(note: Mapping[str, str], scale: int | None = None) -> int:
    """The scale to upscale a file with this note at: ``scale`` when given, else the one
    ``car downscale`` recorded, else 4 (the default of every command)."""
    recorded = {str(s): s for s in SCALES}.get(note.get(SCALE_KEY, ""), 4)
    return scale or recorded


def _webp_note(handle: io.IOBase) -> dict[str, str]:
    """The XMP chunk of a WebP file (it follows the image data: chunks are skipped by seek)."""
    while True:
        header = handle.read(8)
        if len(header) < 8:
            return {}
        kind, size = header[:4], struct.unpack("<I", header[4:])[0]
        if kind == b"XMP ":
            return parse_note_xmp(handle.read(min(size, 1 << 20)))
        handle.seek(size + (size & 1), os.SEEK_CUR)


def _jpeg_note(handle: io.IOBase) -> dict[str, str]:
    """The XMP APP1 segment of a JPEG file (segments before the first scan)."""
    while True:
        header = handle.read(4)
        if len(header) < 4 or header[0] != 0xFF or header[1] == 0xDA:
            return {}
        size = struct.unpack(">H", header[2:])[0]
        payload = handle.read(size - 2)
        if header[1] == 0xE1 and payload.startswith(_XMP_JPEG_PREFIX):
            return parse_note_xmp(payload[len(_XMP_JPEG_PREFIX) :])


def read_png_text(path: Path | str | bytes, limit: int = 1 << 20) -> dict[str, str]:
    """The tEXt/zTXt chunks before a PNG's image data, without decoding it ({} if not a PNG).

    ``car upscale`` reads carcli's note (source size, scale) this way for every
    input before loading a model, so it can pick the scale and the network.
    """
    text: dict[str, str] = {}
    try:
        with _open(path) as handle:
            if handle.read(8) != _PNG_SIGNATURE:
                return text
            read = 8
            while read < limit:
                header = handle.read(8)
                if len(header) < 8:
                    break
                length, kind = struct.unpack(">I4s", header)
                if kind in (b"IDAT", b"IEND") or length > limit:
                    break
                payload = handle.read(length)
                handle.read(4)  # CRC (the decoder checks it later)
                read += 12 + length
                if kind == b"tEXt" and b"\0" in payload:
                    key, value = payload.split(b"\0", 1)
                    text[key.decode("latin-1")] = value.decode("latin-1")
                elif kind == b"zTXt" and b"\0" in payload:
                    key, rest = payload.split(b"\0", 1)
                    try:
                        text[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
                    except zlib.error:
                        continue
    except (OSError, ImageReadError):
        return {}
    return text


_stdin_data: bytes | None = None


def read_stdin() -> bytes:
    """All of standard input as bytes, read once (later calls get the same bytes).

    Refuses a terminal: nobody types an image.
    """
    global _stdin_data
    if _stdin_data is None:
        stream = getattr(sys.stdin, "buffer", None)
        if stream is None or stream.isatty():
            raise ImageReadError("no image on standard input (pipe one in, or name a file)")
        _stdin_data = stream.read()
    return _stdin_data


# --------------------------------------------------------------------------- finding


def is_image_path(path: Path) -> bool:
    """Whether the name looks like an image we read (decoding decides whether it is one)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def find_images(root: Path, recursive: bool = False) -> list[Path]:
    """Image files under ``root`` in a stable order; hidden files and folders are skipped."""
    root = Path(root)
    return sorted(_walk(root, recursive), key=lambda p: p.relative_to(root).as_posix())


def _walk(root: Path, recursive: bool) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in filenames:
            path = Path(dirpath) / name
            if is_image_path(path) and path.is_file():
                yield path
