"""Network configurations: the paper's, and the compact ones carcli ships."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from carcli.defaults import SCALES
from carcli.errors import UsageError, param

RGB_MEAN = (0.4488, 0.4371, 0.4040)


def check_scale(scale: int) -> int:
    """``scale`` if CAR supports it; UsageError otherwise (the one place this is checked)."""
    if scale not in SCALES:
        raise UsageError(f"{param('scale')} must be 2 or 4, got {scale}")
    return scale


@dataclass(frozen=True)
class ResamplerConfig:
    """Widths of the kernel generation network, stage by stage (HR/1, /2, /4, /8)."""

    c1: int = 64  # 5x5 conv at full resolution
    c2: int = 128  # after the first pixel-unshuffle
    c4: int = 128  # after the second, and inside the residual blocks
    blocks: int = 5  # residual blocks at H/4
    c8: int = 256  # after the third, in both trunks and heads
    trunk_convs: int = 3  # 3x3 convs at H/8 in each trunk
    # "separate": the paper's kernel and offset trunks and three heads; "shared": one trunk
    # and one head whose last conv makes kernels and both offsets (about 40 % of the work at
    # H/s, where most of the resampler's time goes at 2x).
    head: str = "separate"
    # Side of the heads' last conv: 3 (the paper's) or 1. That conv makes k*k (or 3*k*k)
    # channels at H/s, the largest conv of a light resampler at 4x; 1 cuts it ninefold.
    head_kernel: int = 3
    # False: kernels only, every tap at its fixed place (offsets zero). The shipped 4x pair's
    # offsets are zero to 1e-3 px (its regularisers flattened them), so at 4x they cost the
    # offsets' convs, tail and bilinear sampling for nothing; the op then takes a cheaper path.
    offsets: bool = True


@dataclass(frozen=True)
class SRConfig:
    """The SR network: an architecture name from the registry and its size.

    ``edsr``: ``blocks`` residual blocks of ``features`` channels (two convs each).
    ``rep``: ``blocks`` re-parameterisable 3x3 convs of ``features`` channels (:mod:`.rep`).
    """

    features: int = 256
    blocks: int = 32
    res_scale: float = 0.1  # EDSR only
    arch: str = "edsr"


@dataclass(frozen=True)
class CARConfig:
    scale: int
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    sr: SRConfig = field(default_factory=SRConfig)
    name: str = "custom"

    def __post_init__(self) -> None:
        check_scale(self.scale)

    @property
    def kernel_size(self) -> int:
        return 3 * self.scale + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CARConfig:
        """The config a dict describes; ValueError naming the first bad field.

        The dict comes from a file (checkpoint metadata, a training state), so
        every value is checked for type and range before anything is built from
        it: a negative width or a string would otherwise fail deep inside torch,
        and an absurd width would allocate until the machine runs out of memory.
        """
        if not isinstance(data, dict):
            raise ValueError(f"the config is a {type(data).__name__}, not a mapping")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        if "scale" not in data:
            raise ValueError("the config has no scale")
        name = data.get("name", "custom")
        if not isinstance(name, str):
            raise ValueError(f"name must be a string, got {name!r}")
        sr = _sub_config(SRConfig, data.get("sr", {}))
        from carcli.models.sr import sr_architectures  # registered when carcli.models loads

        arch = sr.get("arch", "edsr")
        if arch not in sr_architectures():
            raise ValueError(f"unknown SR architecture {arch!r}; known: {sr_architectures()}")
        return cls(
            scale=_int_field("scale", data["scale"], 2, 4),
            resampler=ResamplerConfig(**_sub_config(ResamplerConfig, data.get("resampler", {}))),
            sr=SRConfig(**sr),
            name=name,
        )


RESAMPLER_HEADS = ("separate", "shared")
RESAMPLER_HEAD_KERNELS = (1, 3)

# Ranges from_dict accepts: far beyond any sensible network (the paper's widest
# layer has 256 channels and EDSR 32 blocks), yet small enough that building the
# modules is quick and a mismatch with the tensors is caught before allocation.
MAX_WIDTH = 4096
MAX_BLOCKS = 1024
_MINIMUM = {"blocks": 0, "trunk_convs": 0}  # widths need at least 1


def _int_field(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _sub_config(kind: type, data: object) -> dict:
    """The keyword arguments of a ResamplerConfig/SRConfig, checked for type and range."""
    label = "resampler" if kind is ResamplerConfig else "sr"
    if not isinstance(data, dict):
        raise ValueError(f"{label} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(kind)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {label} config fields: {sorted(unknown)}")
    out: dict = {}
    for key, value in data.items():
        if key == "arch":
            if not isinstance(value, str):
                raise ValueError(f"{label}.arch must be a name, got {value!r}")
            out[key] = value
        elif key == "head":
            if value not in RESAMPLER_HEADS:
                raise ValueError(f"{label}.head must be one of {RESAMPLER_HEADS}, got {value!r}")
            out[key] = value
        elif key == "head_kernel":
            if isinstance(value, bool) or value not in RESAMPLER_HEAD_KERNELS:
                raise ValueError(
                    f"{label}.head_kernel must be one of {RESAMPLER_HEAD_KERNELS}, got {value!r}"
                )
            out[key] = value
        elif key == "offsets":
            if not isinstance(value, bool):
                raise ValueError(f"{label}.offsets must be true or false, got {value!r}")
            out[key] = value
        elif key == "res_scale":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{label}.res_scale must be a number, got {value!r}")
            if not (math.isfinite(value) and 0 < value <= 10):
                raise ValueError(f"{label}.res_scale must be in (0, 10], got {value}")
            out[key] = float(value)
        else:
            high = MAX_BLOCKS if key in ("blocks", "trunk_convs") else MAX_WIDTH
            out[key] = _int_field(f"{label}.{key}", value, _MINIMUM.get(key, 1), high)
    return out


# What carcli ships: a light resampler and an EDSR-baseline-sized SR network.
_COMPACT_RESAMPLER = ResamplerConfig(c1=16, c2=32, c4=64, blocks=2, c8=64, trunk_convs=2)
_COMPACT_SR = SRConfig(features=64, blocks=16, res_scale=1.0)

# The efficient SR networks: plain re-parameterisable convs with a sub-pixel tail.
_FAST_SR = {
    2: SRConfig(arch="rep", features=64, blocks=12, res_scale=1.0),
    4: SRConfig(arch="rep", features=64, blocks=16, res_scale=1.0),
}

# name -> (resampler, sr). "paper" is the authors' configuration (their checkpoints load into it).
PRESETS: dict[str, tuple[ResamplerConfig, SRConfig]] = {
    "paper": (ResamplerConfig(), SRConfig()),
    "compact": (_COMPACT_RESAMPLER, _COMPACT_SR),
    # compact with a deeper EDSR (24 blocks): grown from a trained compact pair with
    # `car train --init ... --config compact-deep` (see models.car.deepened).
    "compact-deep": (_COMPACT_RESAMPLER, replace(_COMPACT_SR, blocks=24)),
    "tiny": (
        ResamplerConfig(c1=8, c2=16, c4=16, blocks=1, c8=16, trunk_convs=1),
        SRConfig(features=16, blocks=2, res_scale=1.0),
    ),
}


# Presets whose SR network depends on the scale: name -> (resampler, {scale: sr}).
SCALED_PRESETS: dict[str, tuple[ResamplerConfig, dict[int, SRConfig]]] = {
    "fast": (_COMPACT_RESAMPLER, _FAST_SR),
    # the resampler at twice and four times the compact widths, with the fast SR network
    "fast-r2": (replace(_COMPACT_RESAMPLER, c1=32, c2=64, c4=128, c8=128), _FAST_SR),
    "fast-r4": (replace(_COMPACT_RESAMPLER, c1=64, c2=128, c4=256, c8=256), _FAST_SR),
    # the compact widths with one shared trunk and head: the cheaper resampler
    "fast-lite": (replace(_COMPACT_RESAMPLER, head="shared"), _FAST_SR),
    # ... whose head ends in a 1x1 conv: the cheaper still, for 4x
    "fast-lite-1x1": (replace(_COMPACT_RESAMPLER, head="shared", head_kernel=1), _FAST_SR),
    # ... making kernels only (no offsets): what the 4x pairs learn anyway, at less cost
    "fast-lite-no-offsets": (replace(_COMPACT_RESAMPLER, head="shared", offsets=False), _FAST_SR),
    # ... with a deeper rep network (24 / 16 convs): the 4x speed room spent on the SR network;
    # grown from a trained fast-lite-no-offsets pair with --init (see models.car.deepened)
    "fast-lite-no-offsets-deep": (
        replace(_COMPACT_RESAMPLER, head="shared", offsets=False),
        {2: replace(_FAST_SR[2], blocks=16), 4: replace(_FAST_SR[4], blocks=24)},
    ),
}


def describe(config: CARConfig, sr_only: bool = False) -> str:
    """One line naming both networks and their sizes, for `car info` and logs.

    ``sr_only``: a generic upscaler, whose file holds no resampler.
    """
    r, sr = config.resampler, config.sr
    net = (
        f"EDSR {sr.blocks} blocks x {sr.features}"
        if sr.arch == "edsr"
        else f"{sr.arch} {sr.blocks} convs x {sr.features}"
    )
    if sr_only:
        return f"{net} (SR only: generic upscaler)"
    head = ", shared head" if r.head == "shared" else ""
    head += ", 1x1 head" if r.head_kernel == 1 else ""
    head += ", no offsets" if not r.offsets else ""
    return f"resampler {r.c1}/{r.c2}/{r.c4}/{r.c8} ({r.blocks} res. blocks{head}); {net}"


def preset_names() -> list[str]:
    return sorted([*PRESETS, *SCALED_PRESETS])


def preset(name: str, scale: int) -> CARConfig:
    if name in SCALED_PRESETS:
        resampler, by_scale = SCALED_PRESETS[name]
        if scale not in by_scale:
            raise ValueError(f"config {name!r} has no {scale}x variant")
        return CARConfig(scale=scale, resampler=resampler, sr=by_scale[scale], name=name)
    try:
        resampler, sr = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose from {preset_names()}") from None
    return CARConfig(scale=scale, resampler=resampler, sr=sr, name=name)
