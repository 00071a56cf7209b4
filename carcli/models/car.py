"""The CAR pair: resampler network + adaptive resampler + 8-bit quantisation + EDSR."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from carcli.models import edsr as _edsr  # noqa: F401  (registers "edsr")
from carcli.models import rep as _rep  # noqa: F401  (registers "rep")
from carcli.models.config import CARConfig
from carcli.models.layers import MeanShift
from carcli.models.precision import autocast
from carcli.models.quantize import quantize
from carcli.models.resampler import SIZE_MULTIPLE, ResamplerNet
from carcli.models.sr import SRNetwork, build_sr
from carcli.ops import resample
from carcli.ops.reference import reflect_pad


def lr_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """Size of the downscaled image: ceil(H/s) x ceil(W/s)."""
    return math.ceil(height / scale), math.ceil(width / scale)


def pad_to_multiple(x: torch.Tensor, multiple: int, min_side: int = 0) -> torch.Tensor:
    """Reflect-pad bottom and right to sides that are multiples of ``multiple``, >= ``min_side``."""
    h, w = x.shape[-2:]
    ph = max(-h % multiple, min_side - h + (-min_side % multiple))
    pw = max(-w % multiple, min_side - w + (-min_side % multiple))
    if ph == 0 and pw == 0:
        return x
    # Reflect needs pad < side; pad symmetrically in steps, then crop the top/left part away.
    padded = reflect_pad(x, max(ph, pw))
    p = max(ph, pw)
    return padded[..., p : p + h + ph, p : p + w + pw]


def op_halo(scale: int) -> int:
    """HR pixels an LR pixel of the resampling op reads beyond its own s x s block.

    Tap centres reach k//2 HR pixels plus s * |offset| < s from the block centre
    (offsets are tanh-bounded), and bilinear sampling adds one more pixel.
    """
    return (3 * scale + 1) // 2 + scale // 2 + 2


class CARModel(nn.Module):
    def __init__(self, config: CARConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        self.resampler = ResamplerNet(config)
        self.sr: SRNetwork = build_sr(config)
        # True for a generic upscaler loaded from its file: the resampler is untrained.
        self.sr_only = False

    def downscale_margin(self) -> int:
        """HR pixels of context a downscale tile needs on each side: a multiple of 8.

        The larger of the resampler network's reach and the resampling op's, rounded
        up to the 8-pixel cells the network sees the image in.
        """
        need = max(self.resampler.reach(), op_halo(self.scale))
        return -(-need // SIZE_MULTIPLE) * SIZE_MULTIPLE

    def downscale_mixed(self, hr: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """:meth:`downscale` under autocast at ``precision`` (the resampling op stays float32)."""
        with autocast(hr.device, precision):
            return self.downscale(hr).float()

    def resample_padded(self, hr: torch.Tensor) -> torch.Tensor:
        """Float LR of an HR batch whose sides are already multiples of 8."""
        kernels, offsets_h, offsets_v = self.resampler(hr)
        return resample(hr, kernels.float(), _float(offsets_h), _float(offsets_v), self.scale)

    def downscale(self, hr: torch.Tensor) -> torch.Tensor:
        """HR in [0, 1], any size -> float LR (not yet quantised), ceil(H/s) x ceil(W/s)."""
        h, w = hr.shape[-2:]
        # Two cells at H/8 at least: the network reflect-pads there, which needs 2 pixels.
        lr = self.resample_padded(pad_to_multiple(hr, SIZE_MULTIPLE, 2 * SIZE_MULTIPLE))
        lh, lw = lr_size(h, w, self.scale)
        return lr[..., :lh, :lw]

    def upscale(self, lr: torch.Tensor) -> torch.Tensor:
        """LR in [0, 1] -> HR (unclamped) at ``scale`` times the size."""
        return self.sr(lr)

    def forward(self, hr: torch.Tensor) -> torch.Tensor:
        """Round trip: downscale, quantise, upscale, crop to the input size."""
        h, w = hr.shape[-2:]
        return self.upscale(quantize(self.downscale(hr)))[..., :h, :w]

    def parameter_counts(self) -> dict[str, int]:
        """Learned weights per network, frozen (EMA) copies included.

        The mean-shift layers are constants stored as 1x1 convs (as in the authors'
        files), so they are not counted: the figures match the quoted ones (docs/results.md).
        """
        names = ("sr",) if self.sr_only else ("resampler", "sr")
        return {name: _learned_parameters(getattr(self, name)) for name in names}


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _learned_parameters(module: nn.Module) -> int:
    fixed = {id(p) for m in module.modules() if isinstance(m, MeanShift) for p in m.parameters()}
    return sum(p.numel() for p in module.parameters() if id(p) not in fixed)


def deepened(model: CARModel, blocks: int, name: str | None = None) -> CARModel:
    """A copy whose SR network has ``blocks`` blocks, computing exactly the same function.

    Growing a trained pair is cheaper than training a deeper one from scratch: the
    added blocks go last in the body and start as identities, and training then puts
    the new capacity to use. EDSR: a residual block whose second conv is zero (``x + 0``).
    ``rep``: a layer whose 3x3 and 1x1 branches are zero (its identity branch remains)
    followed by a PReLU of slope 1.
    """
    arch = model.config.sr.arch
    if arch not in ("edsr", "rep"):
        raise ValueError(f"only EDSR and rep can be deepened, not {arch!r}")
    old = model.config.sr.blocks
    if blocks < old:
        raise ValueError(f"cannot deepen the SR network from {old} to {blocks} blocks")
    config = replace(
        model.config, sr=replace(model.config.sr, blocks=blocks), name=name or model.config.name
    )
    grown = CARModel(config).to(next(model.parameters()).device)
    state = grown.state_dict()
    if arch == "rep":
        state.update(model.state_dict())
        for i in range(old, blocks):
            for branch in ("conv3", "conv1"):
                state[f"sr.body.{2 * i}.{branch}.weight"].zero_()
                state[f"sr.body.{2 * i}.{branch}.bias"].zero_()
            state[f"sr.body.{2 * i + 1}.weight"].fill_(1.0)  # PReLU slope 1: the identity
        grown.load_state_dict(state)
        return grown.train(model.training)
    tail_conv = f"sr.body.{old}."  # the body's closing conv moves behind the new blocks
    for key, value in model.state_dict().items():
        if key.startswith(tail_conv):
            key = f"sr.body.{blocks}." + key[len(tail_conv) :]
        state[key] = value
    for i in range(old, blocks):
        state[f"sr.body.{i}.body.2.weight"].zero_()
        state[f"sr.body.{i}.body.2.bias"].zero_()
    grown.load_state_dict(state)
    return grown.train(model.training)


def without_offsets(model: CARModel, name: str | None = None) -> CARModel:
    """A copy whose resampler makes kernels only (``offsets: false``): the pair as it runs
    with every offset at zero, every other weight kept.

    The shipped 4x pair's offsets stay below 1e-3 LR pixels on any image (its training
    regularisers flatten them), so dropping their trunk and heads gives the same images
    (a rounding tie apart) through the op's fixed-tap path at well under half the
    downscale's cost. At 2x the offsets matter (3 dB): check before using this there.
    """
    if not model.config.resampler.offsets:
        raise ValueError("the resampler already has no offsets")
    config = replace(
        model.config,
        resampler=replace(model.config.resampler, offsets=False),
        name=name or f"{model.config.name}-no-offsets",
    )
    lean = CARModel(config).to(next(model.parameters()).device)
    want = lean.state_dict()
    # A shared head's last conv makes the kernels first, then both offsets: keep the kernels.
    lean.load_state_dict({k: v[: len(want[k])] for k, v in model.state_dict().items() if k in want})
    return lean.train(model.training)


def with_offsets(model: CARModel, name: str | None = None) -> CARModel:
    """A copy whose resampler also makes offsets, all zero at first: the same function.

    The inverse of :func:`without_offsets`, for training a pair without offsets in a design
    with them (as :func:`deepened` adds blocks): the offset trunk and heads start as copies
    of the kernel ones, except the heads' last convs (or a shared head's offset rows),
    which start at zero, so every offset is tanh(0) = 0 until training moves it.
    """
    if model.config.resampler.offsets:
        raise ValueError("the resampler already has offsets")
    config = replace(
        model.config,
        resampler=replace(model.config.resampler, offsets=True),
        name=name or model.config.name.removesuffix("-no-offsets"),
    )
    grown = CARModel(config).to(next(model.parameters()).device)
    state = grown.state_dict()
    old = model.state_dict()
    for key, value in old.items():
        state[key][: len(value)] = value  # a shared head's last conv: the kernel rows first
    r = grown.resampler
    if r.shared:
        state["resampler.head." + f"{len(r.head) - 1}.weight"][r.taps :] = 0.0
        state["resampler.head." + f"{len(r.head) - 1}.bias"][r.taps :] = 0.0
    else:
        for branch in ("offsets_h_generation", "offsets_v_generation"):
            for key in state:
                if key.startswith(f"resampler.{branch}."):
                    kernel_key = key.replace(branch, "kernels_weight")
                    state[key].copy_(old[kernel_key])
            last = len(getattr(r, branch)) - 2  # the conv before the tanh
            state[f"resampler.{branch}.{last}.weight"].zero_()
            state[f"resampler.{branch}.{last}.bias"].zero_()
        for key in state:
            if key.startswith("resampler.offsets_trunk."):
                state[key].copy_(old[key.replace("offsets_trunk", "kernels_trunk")])
    grown.load_state_dict(state)
    return grown.train(model.training)
