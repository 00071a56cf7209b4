"""A minimal ICC v2 matrix/TRC RGB profile writer, for tests with real non-sRGB photos.

No ICC files ship with this machine's system, so the tests build a Display
P3 profile (Apple's published D50-adapted colorants, the sRGB tone curve) the
way cameras and phones embed it, and check carcli against littleCMS and
against the colour maths done by hand.
"""

from __future__ import annotations

import struct

import numpy as np

D50 = (0.9642, 1.0, 0.8249)
# Display P3 colorants, Bradford-adapted to D50 (rXYZ, gXYZ, bXYZ), as in Apple's profile.
DISPLAY_P3 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))
# sRGB colorants adapted to D50 (littleCMS's built-in sRGB profile).
SRGB = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)


def _srgb_curve() -> bytes:
    """parametricCurveType 3: the sRGB transfer function."""
    g, a, b, c, d = 2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045
    params = b"".join(_s15(v) for v in (g, a, b, c, d))
    return b"para" + b"\0" * 4 + struct.pack(">HH", 3, 0) + params


def _desc(text: str) -> bytes:
    ascii_ = text.encode("ascii") + b"\0"
    return (
        b"desc"
        + b"\0" * 4
        + struct.pack(">I", len(ascii_))
        + ascii_
        + struct.pack(">II", 0, 0)
        + struct.pack(">HB", 0, 0)
        + b"\0" * 67
    )


def rgb_profile(name: str = "Display P3 (test)", colorants=DISPLAY_P3) -> bytes:
    """ICC bytes of a monitor RGB profile with these D50 colorants and the sRGB tone curve."""
    curve = _srgb_curve()
    tags = [
        (b"desc", _desc(name)),
        (b"wtpt", _xyz(*D50)),
        (b"rXYZ", _xyz(*colorants[0])),
        (b"gXYZ", _xyz(*colorants[1])),
        (b"bXYZ", _xyz(*colorants[2])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text" + b"\0" * 4 + b"public domain\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data + b"\0" * (-len(data) % 4)
    size = offset + len(body)
    header = (
        struct.pack(">I", size)
        + b"lcms"
        + bytes([2, 0x10, 0, 0])
        + b"mntr"
        + b"RGB "
        + b"XYZ "
        + struct.pack(">6H", 2026, 1, 1, 0, 0, 0)
        + b"acsp"
        + b"\0" * 4  # platform
        + b"\0" * 4  # flags
        + b"\0" * 8  # manufacturer, model
        + b"\0" * 8  # attributes
        + struct.pack(">I", 0)  # rendering intent
        + _xyz(*D50)[8:]
        + b"\0" * 4  # creator
    )
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + body


def _to_linear(v: np.ndarray) -> np.ndarray:
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def _from_linear(v: np.ndarray) -> np.ndarray:
    v = np.clip(v, 0.0, 1.0)
    return np.where(v <= 0.0031308, v * 12.92, 1.055 * v ** (1 / 2.4) - 0.055)


def convert_float(rgb: np.ndarray, source=DISPLAY_P3, target=SRGB) -> np.ndarray:
    """Colours in [0, 1] from one matrix/TRC profile to another: linearise, matrices, encode."""
    to_xyz = np.array(source, dtype=np.float64).T  # columns are the colorants
    from_xyz = np.linalg.inv(np.array(target, dtype=np.float64).T)
    linear = _to_linear(rgb.astype(np.float64))
    out = linear.reshape(-1, 3) @ (from_xyz @ to_xyz).T
    return _from_linear(out).reshape(rgb.shape)


def convert_by_hand(rgb8: np.ndarray, source=DISPLAY_P3, target=SRGB) -> np.ndarray:
    """uint8 colours from one matrix/TRC profile to another (see :func:`convert_float`)."""
    return np.round(convert_float(rgb8 / 255.0, source, target) * 255).astype(np.uint8)
