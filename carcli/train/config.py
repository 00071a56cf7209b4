"""Training settings: one dataclass with the defaults, checks and resume rules.

``car train`` shows these defaults and builds its config from what was given
(torch-free, so ``car train --help`` answers at once); the trainer resolves the
device-dependent ones (:meth:`TrainConfig.resolved`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from carcli.defaults import QUANT_GRADIENTS, SCALES
from carcli.errors import ConfigError, PrecisionError, UsageError, param

if TYPE_CHECKING:
    import torch

# Reconstruction losses: the paper's L1, or the squared error that PSNR measures
# (for final fine-tunes).
LOSSES = ("l1", "mse")
# Where the SR network's LR inputs come from: the pair's own resampler, or bicubic (generic).
LR_SOURCES = ("resampler", "bicubic")
# What may change when a run resumes: when to stop and how often to report or save.
RESUMABLE = ("steps", "time_budget", "threads", "val_every", "log_every", "checkpoint_minutes")


@dataclass
class TrainConfig:
    scale: int
    data: list[str]
    val: list[str]
    config: str = "compact"
    steps: int | None = None  # total optimisation steps (cosine schedule length)
    time_budget: float | None = None  # training seconds in all, counted across resumes
    batch: int = 16
    patch: int = 96  # HR crop side
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup: int = 200
    adam_eps: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    offset_weight: float = 0.001
    tv_weight: float = 0.005
    loss: str = "l1"  # reconstruction loss: "l1" (the paper's) or "mse" (PSNR's own, to fine-tune)
    luma_weight: float = 0.0  # extra weight on the loss of BT.601 luma, the channel PSNR_Y reads
    quant_grad: str = "ste"  # "ste" or "soft"
    soft_alpha: float = 0.5
    ema: float = 0.999  # 0 disables
    bicubic_init: bool = True
    sr_pretrain: int = 0  # first steps train the SR network alone on the initial resampler's LR
    reset_heads: bool = False  # with init: fresh kernel/offset heads, started as bicubic
    init: str | None = None  # start from an inference checkpoint (absolute path)
    init_sha256: str | None = None  # of that file, so the record names it after it is replaced
    init_sr: str | None = None  # SR weights from this checkpoint (a generic upscaler, say)
    init_sr_sha256: str | None = None
    teacher: str | None = None  # a trained pair whose outputs are targets too (absolute path)
    teacher_sha256: str | None = None
    teacher_weight: float = 1.0  # weight of the loss against the teacher's output
    lr_weight: float = 0.0  # weight of the loss between the student's LR and the teacher's
    freeze_resampler: bool = False  # train the SR network alone (with a teacher: cached targets)
    cache_dir: str | None = None  # where teacher targets are cached (default: RUN/cache)
    lr_source: str = "resampler"  # "bicubic": train the SR network alone on bicubic LR (generic)
    precision: str = "auto"  # bf16 autocast, fp32, or auto: per device (see resolved)
    channels_last: bool | None = None  # None: with bf16 only (see resolved)
    threads: int | None = None
    val_every: int = 1000
    log_every: int = 50
    checkpoint_minutes: float = 5.0
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Refuse settings that would otherwise fail, or mislead, after minutes of decoding data.

        Raises :class:`ConfigError` naming the first bad field (the CLI reports it as its option).
        """
        losses, gradients = " or ".join(LOSSES), " or ".join(QUANT_GRADIENTS)
        rules = (
            ("scale", self.scale in SCALES, "must be 2 or 4"),
            ("patch", self.patch > 0 and self.patch % 8 == 0, "must be a positive multiple of 8"),
            ("batch", self.batch >= 1, "must be 1 or more"),
            ("steps", self.steps is None or self.steps >= 1, "must be 1 or more"),
            ("time_budget", self.time_budget is None or self.time_budget > 0, "must be positive"),
            ("lr", self.lr > 0, "must be positive"),
            ("min_lr", 0 <= self.min_lr <= self.lr, f"must be between 0 and {param('lr')}"),
            ("warmup", self.warmup >= 0, "must be 0 or more"),
            ("grad_clip", self.grad_clip >= 0, "must be 0 (off) or more"),
            ("offset_weight", self.offset_weight >= 0, "must be 0 or more"),
            ("tv_weight", self.tv_weight >= 0, "must be 0 or more"),
            ("loss", self.loss in LOSSES, f"must be {losses}"),
            ("luma_weight", self.luma_weight >= 0, "must be 0 or more"),
            ("quant_grad", self.quant_grad in QUANT_GRADIENTS, f"must be {gradients}"),
            ("soft_alpha", 0 <= self.soft_alpha <= 1, "must be between 0 and 1"),
            ("ema", 0 <= self.ema < 1, "must be at least 0 (off) and below 1"),
            ("sr_pretrain", self.sr_pretrain >= 0, "must be 0 or more"),
            ("teacher_weight", self.teacher_weight >= 0, "must be 0 or more"),
            ("lr_weight", self.lr_weight >= 0, "must be 0 or more"),
            (
                "lr_weight",
                self.lr_weight == 0 or (self.teacher is not None and not self.freeze_resampler),
                "needs --teacher and a resampler that trains (not --freeze-resampler)",
            ),
            ("lr_source", self.lr_source in LR_SOURCES, f"must be {' or '.join(LR_SOURCES)}"),
            ("precision", self.precision in ("auto", "bf16", "fp32"), "must be auto, bf16 or fp32"),
            ("val_every", self.val_every >= 0, "must be 0 (never) or more"),
            ("log_every", self.log_every >= 1, "must be 1 or more"),
            ("checkpoint_minutes", self.checkpoint_minutes > 0, "must be positive"),
            ("threads", self.threads is None or self.threads >= 1, "must be 1 or more"),
        )
        for name, ok, reason in rules:
            if not ok:
                raise ConfigError(name, reason)

    def to_dict(self) -> dict:
        return asdict(self)

    def resolved(self, device: torch.device) -> TrainConfig:
        """This config with ``auto`` precision and channels-last decided for ``device``.

        The run policy picks per device (:func:`carcli.runpolicy.training_precision`):
        bf16 only where it is native, channels-last with bf16. The saved state records
        the resolved values, so a resumed run keeps them.
        """
        from carcli.runpolicy import training_channels_last, training_precision  # torch

        try:
            precision = training_precision(self.precision, device)
        except PrecisionError:
            raise ConfigError("precision", "must be auto, bf16 or fp32") from None
        channels_last = self.channels_last
        if channels_last is None:
            channels_last = training_channels_last(precision)
        return replace(self, precision=precision, channels_last=channels_last)

    def resumed(self, **changes: Any) -> TrainConfig:
        """This saved config, continued with ``changes`` (the settings given again).

        Only :data:`RESUMABLE` settings may change; any other given setting must
        equal the saved one (UsageError naming it), since it shaped the model or
        its schedule. ``precision="auto"`` and ``channels_last=None`` mean "as saved".
        """
        as_saved = {"precision": "auto", "channels_last": None}
        changes = {k: v for k, v in changes.items() if as_saved.get(k, ...) != v}
        fixed = sorted(
            k for k, v in changes.items() if k not in RESUMABLE and getattr(self, k) != v
        )
        if fixed:
            names = ", ".join(param(k) for k in fixed)
            raise UsageError(
                f"{names}: fixed by the run being resumed (it has "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in fixed)
                + "); leave them out, or start a new run"
            )
        return replace(self, **changes)
