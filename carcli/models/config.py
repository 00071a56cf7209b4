"""Network configurations: the paper's, and the compact ones carcli ships."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

RGB_MEAN = (0.4488, 0.4371, 0.4040)


@dataclass(frozen=True)
class ResamplerConfig:
    """Widths of the kernel generation network, stage by stage (HR/1, /2, /4, /8)."""

    c1: int = 64  # 5x5 conv at full resolution
    c2: int = 128  # after the first pixel-unshuffle
    c4: int = 128  # after the second, and inside the residual blocks
    blocks: int = 5  # residual blocks at H/4
    c8: int = 256  # after the third, in both trunks and heads
    trunk_convs: int = 3  # 3x3 convs at H/8 in each trunk


@dataclass(frozen=True)
class SRConfig:
    """The SR network: EDSR with ``blocks`` residual blocks of ``features`` channels.

    ``arch`` names the architecture (:func:`carcli.models.sr.build_sr`); configs
    saved before it existed are EDSR.
    """

    features: int = 256
    blocks: int = 32
    res_scale: float = 0.1
    arch: str = "edsr"


@dataclass(frozen=True)
class CARConfig:
    scale: int
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    sr: SRConfig = field(default_factory=SRConfig)
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.scale not in (2, 4):
            raise ValueError(f"scale must be 2 or 4, got {self.scale}")

    @property
    def kernel_size(self) -> int:
        return 3 * self.scale + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CARConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        from carcli.models.sr import sr_architectures  # registered when carcli.models loads

        arch = data.get("sr", {}).get("arch", "edsr")
        if arch not in sr_architectures():
            raise ValueError(f"unknown SR architecture {arch!r}; known: {sr_architectures()}")
        return cls(
            scale=int(data["scale"]),
            resampler=ResamplerConfig(**data.get("resampler", {})),
            sr=SRConfig(**data.get("sr", {})),
            name=data.get("name", "custom"),
        )


# What carcli ships: a light resampler and an EDSR-baseline-sized SR network.
_COMPACT_RESAMPLER = ResamplerConfig(c1=16, c2=32, c4=64, blocks=2, c8=64, trunk_convs=2)
_COMPACT_SR = SRConfig(features=64, blocks=16, res_scale=1.0)

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


def preset(name: str, scale: int) -> CARConfig:
    try:
        resampler, sr = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown config {name!r}; choose from {sorted(PRESETS)}") from None
    return CARConfig(scale=scale, resampler=resampler, sr=sr, name=name)
