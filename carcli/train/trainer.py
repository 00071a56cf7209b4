"""The training loop: joint resampler + SR optimisation, EMA, validation, resumable state."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from carcli.checkpoints import GENERIC_ROLE
from carcli.errors import UsageError, ValidationError, param
from carcli.metrics import PEAK, rgb_to_y
from carcli.models import CARConfig, CARModel, deepened, preset, with_offsets
from carcli.models.graft import can_graft_shared_head, graft_shared_head
from carcli.models.precision import autocast
from carcli.models.quantize import quantize, quantize_for_training
from carcli.ops import resample
from carcli.train import ddp
from carcli.train.config import LOSSES, TrainConfig
from carcli.train.data import PatchSampler
from carcli.train.losses import offset_loss, tv_loss
from carcli.train.progress import TrainDisplay, status_line

STATE_NAME = "state.pt"
BEST_NAME = "best.safetensors"
LOG_NAME = "log.jsonl"
RECONSTRUCTION_LOSSES = {"l1": F.l1_loss, "mse": F.mse_loss}  # by TrainConfig.loss
assert tuple(RECONSTRUCTION_LOSSES) == LOSSES


_ARCH_NAMES = {"edsr": "EDSR", "rep": "the rep SR network"}

# LR pixels a graft fits the shared head on (its conv has at most 577 inputs per output)
_GRAFT_PIXELS = 400_000

# What a state.pt must hold, and of which type, before any of it is used.
_STATE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "config": dict,
    "model": dict,
    "optimizer": dict,
    "step": int,
    "elapsed": (int, float),
    "best_psnr": (int, float),
    "history": list,
    "sampler": dict,
    "rng": torch.Tensor,
}


def read_state(path: Path) -> dict:
    """A training state file, checked before use; UsageError (one line) if it is not one.

    The file is loaded with ``weights_only=True`` (no code from it ever runs),
    and its fields and its recorded settings are checked, so a damaged or
    foreign file is refused with its name instead of failing halfway through.
    """
    from carcli.checkpoints import load_torch_file

    state = load_torch_file(path, "training state")  # WeightsError: a usage error too
    if not isinstance(state, dict):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a carcli training state")
    for name, kind in _STATE_FIELDS.items():
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            raise UsageError(f"{path} is not a carcli training state (no valid {name!r})")
    state["train_config"] = train_config_from(state["config"], path)
    return state


def train_config_from(saved: dict, path: Path) -> TrainConfig:
    """The TrainConfig a state recorded; UsageError naming ``path`` if it is not one."""
    known = {f for f in TrainConfig.__dataclass_fields__}
    unknown = sorted(set(saved) - known)
    if unknown or not {"scale", "data", "val"} <= set(saved):
        raise UsageError(f"{path} is not a carcli training state (its settings are not carcli's)")
    try:
        cfg = TrainConfig(**saved)
        cfg.check()
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{path} holds invalid training settings ({exc})") from None
    return cfg


def config_for_run(run_dir: Path, resume: bool = False, **given: Any) -> TrainConfig:
    """The settings of a new run in ``run_dir``, or of the run there continued with ``given``.

    A new run needs ``scale``, ``data`` and ``val`` and refuses a folder that holds
    a state already; resuming needs that state and keeps its settings except the
    :data:`~carcli.train.config.RESUMABLE` ones (:meth:`TrainConfig.resumed`).
    Either way the result is checked and has a stopping rule (UsageError otherwise).
    """
    state = run_dir / STATE_NAME
    if resume:
        if not state.exists():
            raise UsageError(f"{state}: nothing to resume")
        cfg = read_state(state)["train_config"].resumed(**given)
    else:
        if state.exists():
            raise UsageError(
                f"{state} exists: pass {param('resume')}, or choose another {param('run')}"
            )
        missing = [name for name in ("data", "val") if name not in given]
        if missing:
            names = " and ".join(param(name) for name in missing)
            raise UsageError(f"a new run needs {names}")
        cfg = TrainConfig(**given)
    cfg.check()
    if cfg.steps is None and cfg.time_budget is None:
        raise UsageError(f"give {param('steps')} or {param('time_budget')}")
    return cfg


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up then cosine decay over ``progress`` in [0, 1]."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(max(progress, 0.0), 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def run_metadata(
    cfg: TrainConfig, step: int, elapsed: float, model: CARModel, report: dict | None
) -> dict:
    """What an exported checkpoint records about how it was made."""
    return {
        # generic-sr: an SR network for ordinary (bicubic) LR images, its resampler only a
        # stand-in; pair: a resampler and the SR network trained for its output.
        "role": GENERIC_ROLE if cfg.lr_source == "bicubic" else "pair",
        "recipe": cfg.to_dict(),
        "training_data": cfg.data,
        "steps": step,
        "train_seconds": round(elapsed, 1),
        "parameters": model.parameter_counts(),
        "validation": report or {},
    }


def training_losses(
    model: CARModel,
    hr: torch.Tensor,
    cfg: TrainConfig,
    device: torch.device,
    freeze_resampler: bool = False,
    teacher: CARModel | None = None,
) -> dict[str, torch.Tensor]:
    """One forward pass of the CAR pair on a batch of HR patches (sides multiples of 8).

    With ``freeze_resampler`` no gradient reaches the resampler (SR pre-training), so its
    regularisers, constants then, are left out. With ``teacher`` its round trip of the
    same patches is a second target (distillation).
    """
    grad = contextlib.nullcontext() if not freeze_resampler else torch.no_grad()
    # The networks keep the same float32 islands as in inference: the kernel head's
    # normalisation, and EDSR's first and last convs (SRNetwork.forward_mixed).
    with grad, autocast(device, cfg.precision):
        kernels, offsets_h, offsets_v = model.resampler(hr)
    kernels = kernels.float()
    has_offsets = offsets_h is not None and offsets_v is not None
    if has_offsets:
        offsets_h, offsets_v = offsets_h.float(), offsets_v.float()
    lr = resample(hr, kernels, offsets_h, offsets_v, model.scale)
    lr_q = quantize_for_training(lr, cfg.quant_grad, cfg.soft_alpha)
    if cfg.channels_last:
        lr_q = lr_q.contiguous(memory_format=torch.channels_last)
    sr = model.sr.forward_mixed(lr_q, cfg.precision)
    target = teacher_lr = None
    if teacher is not None:
        with torch.no_grad():
            # Patches are multiples of 8 (at least 16): the teacher's downscale needs no pad.
            teacher_lr = teacher.resample_padded(hr)
            if cfg.teacher_weight > 0:
                target = teacher.upscale(quantize(teacher_lr)).float().clamp(0.0, 1.0)
    losses = reconstruction_losses(sr, hr, cfg, target)
    total = losses["total"]
    if freeze_resampler:
        losses["total"] = total
        return losses
    if teacher_lr is not None and cfg.lr_weight > 0:
        # The LR image itself as a target: a dense signal for a new resampler, which the
        # SR-output losses reach only through the SR network and the 8-bit rounding.
        losses["lr"] = F.l1_loss(lr, teacher_lr)
        total = total + cfg.lr_weight * losses["lr"]
    if not has_offsets:  # a resampler without offsets: their regularisers have nothing to do
        losses["total"] = total
        return losses
    if cfg.offset_weight > 0:
        losses["offset"] = offset_loss(offsets_h, offsets_v)
        total = total + cfg.offset_weight * losses["offset"]
    if cfg.tv_weight > 0:
        losses["tv"] = tv_loss(kernels, offsets_h, offsets_v)
        total = total + cfg.tv_weight * losses["tv"]
    losses["total"] = total
    return losses


def reconstruction_losses(
    sr: torch.Tensor, hr: torch.Tensor, cfg: TrainConfig, target: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The loss against the ground truth, plus ``teacher_weight`` times that against ``target``."""
    if cfg.loss not in RECONSTRUCTION_LOSSES:
        names = " or ".join(RECONSTRUCTION_LOSSES)
        raise ValueError(f"reconstruction loss must be {names}, got {cfg.loss!r}")
    fn = RECONSTRUCTION_LOSSES[cfg.loss]
    losses = {"l1": F.l1_loss(sr, hr)}  # logged whatever the loss, so runs stay comparable
    if cfg.loss != "l1":
        losses[cfg.loss] = fn(sr, hr)
    total = losses[cfg.loss]
    if cfg.luma_weight > 0:
        # Y / 255 is on the RGB loss's [0, 1] scale (its offset cancels in the difference).
        y_sr, y_hr = rgb_to_y(sr) / PEAK, rgb_to_y(hr) / PEAK
        losses["luma"] = fn(y_sr, y_hr)
        total = total + cfg.luma_weight * losses["luma"]
    if target is not None and cfg.teacher_weight > 0:
        losses["teacher"] = fn(sr, target)
        total = total + cfg.teacher_weight * losses["teacher"]
        if cfg.luma_weight > 0:
            y_t = rgb_to_y(target) / PEAK
            losses["teacher_luma"] = fn(rgb_to_y(sr) / PEAK, y_t)
            total = total + cfg.teacher_weight * cfg.luma_weight * losses["teacher_luma"]
    losses["total"] = total
    return losses


def sr_losses(
    model: CARModel,
    lr: torch.Tensor,
    hr: torch.Tensor,
    target: torch.Tensor | None,
    cfg: TrainConfig,
) -> dict[str, torch.Tensor]:
    """The SR network alone on fixed 8-bit LR crops (frozen resampler, cached targets)."""
    if cfg.channels_last:
        lr = lr.contiguous(memory_format=torch.channels_last)
    sr = model.sr.forward_mixed(lr, cfg.precision)
    return reconstruction_losses(sr, hr, cfg, target)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        device: torch.device,
        evaluate: Callable[[CARModel], dict] | None = None,
        quiet: bool = False,
        display: TrainDisplay | None = None,
        ranks: ddp.Ranks | None = None,
        resuming: bool = False,
    ) -> None:
        """``resuming``: :meth:`load_state` follows, so starting points that cost time to
        compute (the graft's fit) are skipped: the saved weights replace them."""
        cfg.check()
        self.resuming = resuming
        cfg = cfg.resolved(device)
        self.cfg = cfg
        self.ranks = ranks or ddp.Ranks()  # torchrun: see carcli.train.ddp for the rules
        self.run_dir = run_dir
        self.device = device
        self.evaluate = evaluate
        self.quiet = quiet
        self.display = display or TrainDisplay(quiet)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self._crops: PatchSampler | None = None  # loaded by the first to need them
        if cfg.init:
            from carcli.checkpoints import load_model

            # A generic upscaler can start another one, never a pair (it has no resampler).
            generic = cfg.lr_source == "bicubic"
            self.model, _ = load_model(Path(cfg.init), cfg.scale, "cpu", upscale_only=generic)
            self._grow_to_preset(cfg.config)
            if cfg.reset_heads:
                self.model.resampler.reset_heads()
        else:
            self.model = CARModel(preset(cfg.config, cfg.scale))
            if cfg.bicubic_init:
                self.model.resampler.init_as_bicubic()
        self.teacher: CARModel | None = None
        if cfg.teacher:
            from carcli.checkpoints import load_model

            self.teacher, _ = load_model(Path(cfg.teacher), cfg.scale, device="cpu")
            self.teacher.eval().requires_grad_(False)
            same = self.teacher.config.resampler == self.model.config.resampler
            if not cfg.init and same:
                self.model.resampler.load_state_dict(self.teacher.resampler.state_dict())
                self._say("note: the student's resampler starts as the teacher's")
        if cfg.init_sr:
            self._load_sr(Path(cfg.init_sr))
        if cfg.freeze_resampler or cfg.lr_source == "bicubic":
            self.model.resampler.requires_grad_(False)
        self.model.to(device).train()
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval() if cfg.ema > 0 else None
        if self.ema is not None:
            for p in self.ema.parameters():
                p.requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            params, lr=cfg.lr, betas=(0.9, 0.999), eps=cfg.adam_eps, weight_decay=cfg.weight_decay
        )
        self.sampler = self._training_crops()
        # The SR network alone on fixed LR crops: cached teacher targets, or bicubic LR.
        generic = cfg.lr_source == "bicubic"
        self.cached = generic or (self.teacher is not None and cfg.freeze_resampler)
        if self.cached:
            from carcli.train.distill import BicubicCache, DistillCache, DistillSampler

            if generic:
                cache = BicubicCache(cfg.scale)
            else:
                folder = Path(cfg.cache_dir) if cfg.cache_dir else run_dir / "cache"
                student = copy.deepcopy(self.model).eval()
                cache = DistillCache(folder, student, self.teacher, device)
            self.sampler = DistillSampler(self.sampler, cache, cfg.scale, quiet=quiet)
        if self.teacher is not None:
            self.teacher.to(device)
        self.next_batch: Callable[[int], Any] = self.sampler.batch  # tests feed patches
        self.losses = ddp.wrap(
            self._batch_losses,
            self.model,
            self.ranks,
            device,
            unused_parameters=cfg.sr_pretrain > 0,
        )
        self.step = 0
        self.elapsed = 0.0  # training seconds over all invocations
        self.best_psnr = -math.inf
        self.history: list[dict] = []
        self.stop_requested = False

    def _training_crops(self) -> PatchSampler:
        """The training images, loaded once: a graft fits on them before training starts."""
        if self._crops is None:
            self._crops = PatchSampler(
                [Path(d) for d in self.cfg.data],
                self.cfg.patch,
                seed=ddp.rank_seed(self.cfg.seed, self.ranks.rank),
                quiet=self.quiet,
            )
        return self._crops

    def _load_sr(self, path: Path) -> None:
        """Start the SR network from another file's: a generic upscaler has learned natural
        images on bicubic LR, a far better start for a student than random weights."""
        from carcli.checkpoints import load_model

        donor, _ = load_model(path, self.cfg.scale, "cpu", upscale_only=True)
        have, want = donor.config.sr, self.model.config.sr
        if have != want:
            raise UsageError(
                f"--init-sr: {path.name} has a {have.arch} SR network "
                f"({have.blocks} x {have.features}), this run's is {want.arch} "
                f"({want.blocks} x {want.features})",
            )
        self.model.sr.load_state_dict(donor.sr.state_dict())
        self._say(f"note: the SR network starts from {path.name}'s")

    def _grow_to_preset(self, name: str) -> None:
        """With --init and a --config that only has more SR blocks: deepen the pair to it."""
        have = self.model.config
        if name in ("from-init", have.name):
            return
        want = preset(name, have.scale)
        grow = replace(have.resampler, offsets=True)
        if want.resampler == grow != have.resampler and want.sr != have.sr:
            # A student design with offsets from a pair without them (the shipped 4x one):
            # offsets added at zero, then the SR network as below. With the SR network kept
            # (the default config), the pair is continued as it is, without offsets.
            self.model = with_offsets(self.model)
            have = self.model.config
            self._say(
                f"note: offsets added to the init checkpoint's resampler for config {name}; "
                "they start at zero (the same images until training moves them)"
            )
        same_widths = replace(want.sr, blocks=have.sr.blocks) == have.sr
        if want.resampler == have.resampler and same_widths and want.sr.blocks > have.sr.blocks:
            self.model = deepened(self.model, want.sr.blocks, name=name)
            self._say(
                f"note: {_ARCH_NAMES.get(have.sr.arch, have.sr.arch)} deepened from "
                f"{have.sr.blocks} to {want.sr.blocks} blocks "
                f"for config {name}; the new blocks start as identities"
            )
        elif want.resampler == have.resampler and want.sr != have.sr:
            student = CARModel(want)
            student.resampler.load_state_dict(self.model.resampler.state_dict())
            self.model = student
            self._say(
                f"note: resampler from the init checkpoint, a new {want.sr.arch} SR network "
                f"({want.sr.blocks} x {want.sr.features}) for the {name} config"
            )
        elif can_graft_shared_head(have.resampler, want.resampler):
            self._graft(want)
        else:
            self._say(f"note: the init checkpoint uses config {have.name!r}, kept as it is")

    def _graft(self, want: CARConfig) -> None:
        """Start a shared-head resampler as the init pair's two-branch one (models.graft)."""
        student = CARModel(want)
        if self.resuming:
            self.model = student  # the saved state fills it
            return
        keep_sr = want.sr == self.model.config.sr
        if keep_sr:
            student.sr.load_state_dict(self.model.sr.state_dict())
        # the training crops with a stream of their own: training's is untouched
        probe = copy.copy(self._training_crops())
        probe.generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        lr_side = self.cfg.patch // self.cfg.scale
        batches = min(64, math.ceil(_GRAFT_PIXELS / (16 * lr_side * lr_side)))
        fit = graft_shared_head(
            self.model.resampler, student.resampler, (probe.batch(16) for _ in range(batches))
        )
        sr = "its SR network kept" if keep_sr else "a new SR network"
        if fit.pixels == 0:
            how = "the kernel head copied, no offsets"
        else:
            how = f"fitted on {fit.pixels} LR pixels: R^2 kernels {fit.kernels_r2:.3f}"
            how += (
                f", offsets {fit.offsets_r2:.3f}" if fit.offsets_r2 is not None else ", no offsets"
            )
        self._say(
            f"note: resampler grafted onto one shared head for config {want.name} ({how}); {sr}"
        )
        self.model = student

    def close(self) -> None:
        """Drop the DDP wrapper (it holds the process group) before the ranks leave it."""
        self.losses = self._batch_losses

    def request_stop(self) -> None:
        """Ask :meth:`run` to stop after the current step (and save); safe from a signal handler."""
        self.stop_requested = True

    # ---- persistence -------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "model_config": self.model.config.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "elapsed": self.elapsed,
            "best_psnr": self.best_psnr,
            "history": self.history,
            "sampler": self.sampler.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def save_state(self, gather: bool = True) -> None:
        """Rank 0 writes. With ``gather``, every rank must call it (the ranks' samplers are
        collected); without, rank 0 saves alone (after a failure) and a resume re-seeds."""
        if gather:
            samplers = ddp.gather(self.sampler.state_dict(), self.ranks)
        else:  # rank 0's own stream, when it is the only one
            samplers = [self.sampler.state_dict()] if self.ranks.world == 1 else []
        if not self.ranks.main:
            return
        state = self.state_dict()
        state["samplers"], state["ranks"] = samplers, self.ranks.world
        path = self.run_dir / STATE_NAME
        tmp = path.with_suffix(".tmp")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # removed while running: put back
            torch.save(state, tmp)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # never a half-written state next to the good one
            raise

    def load_state(self) -> None:
        """Continue from RUN/state.pt; UsageError (one line) if it does not fit this run."""
        path = self.run_dir / STATE_NAME
        state = read_state(path)
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            self.optimizer.load_state_dict(state["optimizer"])
            samplers = state.get("samplers") or [state["sampler"]]
            if len(samplers) == self.ranks.world:  # each rank continues its own patch stream
                self.sampler.load_state_dict(samplers[self.ranks.rank])
            else:  # another number of ranks: fresh streams, reproducible from (seed, rank, step)
                seed = ddp.rank_seed(self.cfg.seed, self.ranks.rank, int(state["step"]))
                self.sampler.generator.manual_seed(seed)
            torch.set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UsageError(f"{path} does not fit this run ({first})") from None
        self.step = state["step"]
        self.elapsed = float(state["elapsed"])
        self.best_psnr = float(state["best_psnr"])
        self.history = state["history"]

    # ---- logging -----------------------------------------------------
    def _say(self, msg: str) -> None:
        self.display.say(msg)

    def _log(self, record: dict) -> None:
        if not self.ranks.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / LOG_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")

    # ---- training ----------------------------------------------------
    def progress(self) -> float:
        """Schedule position: by steps, else by training time (both count across resumes)."""
        if self.cfg.steps:
            return self.step / self.cfg.steps
        if self.cfg.time_budget:
            return self.elapsed / self.cfg.time_budget
        return 0.0

    def _batch_losses(self, batch: Any, freeze: bool) -> dict[str, torch.Tensor]:
        """Losses of one batch: HR patches, or (LR, HR, teacher) crops in the cached modes."""
        cfg, device = self.cfg, self.device
        if self.cached:
            lr, hr, target = batch
            return sr_losses(self.model, lr, hr, target, cfg)
        return training_losses(self.model, batch, cfg, device, freeze, teacher=self.teacher)

    def _next_batch(self) -> Any:
        batch = self.next_batch(self.cfg.batch)
        if self.cached:
            lr, hr, target = batch
            return lr.to(self.device), hr.to(self.device), _to(target, self.device)
        hr = batch.to(self.device)
        if self.cfg.channels_last:
            hr = hr.contiguous(memory_format=torch.channels_last)
        return hr

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        batch = self._next_batch()
        lr = lr_at(cfg, self.step, self.progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Adam skips the resampler while it gets no gradients
        frozen = cfg.freeze_resampler or self.step < cfg.sr_pretrain
        losses = self.losses(batch, frozen)  # through DDP under torchrun
        self.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            decay = min(cfg.ema, (1 + self.step) / (10 + self.step))
            with torch.no_grad():
                for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        self.step += 1
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["lr"] = lr
        return out

    def eval_model(self) -> CARModel:
        return self.ema if self.ema is not None else self.model

    def validate(self) -> dict | None:
        if self.evaluate is None or not self.ranks.main:
            return None
        model = self.eval_model()
        was_training = model.training
        model.eval()
        try:
            report = self.evaluate(model)
        finally:
            model.train(was_training)
        unmeasured = [name for name, r in report.items() if r.get("psnr") is None]
        if unmeasured:
            raise ValidationError(
                f"validation at step {self.step} measured no image in "
                + ", ".join(unmeasured)
                + " (every image failed, or is too small)"
            )
        mean_psnr = float(np.mean([r["psnr"] for r in report.values()]))
        record = {"event": "val", "step": self.step, "elapsed": round(self.elapsed, 1)}
        record.update({f"{name}_psnr": round(r["psnr"], 4) for name, r in report.items()})
        record.update({f"{name}_ssim": round(r["ssim"], 5) for name, r in report.items()})
        record["mean_psnr"] = round(mean_psnr, 4)
        record["sets"] = report
        self.history.append(record)
        self._log(record)
        if mean_psnr > self.best_psnr:
            self.best_psnr = mean_psnr
            record["best"] = True
            self.export(self.run_dir / BEST_NAME, report)
        self._say(
            f"step {self.step}: "
            + ", ".join(f"{n} {r['psnr']:.3f} dB / {r['ssim']:.4f}" for n, r in report.items())
            + (" (best)" if record.get("best") else "")
        )
        return record

    def export(self, path: Path, report: dict | None = None) -> None:
        """Inference checkpoint (EMA weights if any) with the recipe and metrics (rank 0)."""
        from carcli.checkpoints import save_checkpoint

        if not self.ranks.main:
            return
        model = copy.deepcopy(self.eval_model()).to("cpu").to(memory_format=torch.contiguous_format)
        save_checkpoint(model, path, run_metadata(self.cfg, self.step, self.elapsed, model, report))

    def run(self, stop_at: int | None = None) -> None:
        """Train until the schedule ends, the time budget is spent, or step ``stop_at``."""
        cfg = self.cfg
        if cfg.steps is None and cfg.time_budget is None:
            raise UsageError(f"give {param('steps')} or {param('time_budget')}")
        self._say(
            f"training {cfg.config} {cfg.scale}x from step {self.step}: "
            f"{len(self.sampler.images)} images ({self.sampler.pixels / 1e6:.1f} MP), "
            f"batch {cfg.batch} x {cfg.patch}px, {cfg.precision}"
            + (
                f"; {self.ranks.world} ranks: effective batch {cfg.batch * self.ranks.world}, "
                f"lr {cfg.lr:g} as given"
                if self.ranks.distributed
                else ""
            )
        )
        self.display.start(f"{cfg.scale}x {cfg.config}", total=1.0, completed=self.progress())
        first_step = self.step
        try:
            self._train_until(stop_at)
        except BaseException:
            if self.step == first_step:
                raise
            # A failed validation, a full disk, any surprise: the steps trained so far
            # are saved first (when that is possible), so --resume can continue.
            with contextlib.suppress(Exception):
                self.save_state(gather=False)  # the other ranks may be gone: no collective
            raise
        finally:
            self.display.stop()
        self.save_state()
        self._say(f"stopped at step {self.step} ({self.elapsed / 60:.1f} min of training)")

    def _finished(self, stop_at: int | None) -> bool:
        return (
            self._schedule_done()
            or (stop_at is not None and self.step >= stop_at)
            or self.stop_requested
        )

    def _train_until(self, stop_at: int | None) -> None:
        cfg = self.cfg
        last_save = window_t = time.monotonic()
        window: list[float] = []
        smooth_l1 = smooth_rate = math.nan  # for the live display
        while not self._finished(stop_at):
            t0 = time.monotonic()
            losses = self.train_step()
            seconds = time.monotonic() - t0
            save_due = time.monotonic() - last_save >= cfg.checkpoint_minutes * 60
            # One all-reduce under torchrun: every rank takes the same clock (the slowest
            # rank's), stops and saves together.
            self.elapsed, stop, save_due = ddp.agree(
                [self.elapsed + seconds, self.stop_requested, save_due], self.ranks, self.device
            )
            self.stop_requested = bool(stop)
            window.append(losses["l1"])
            smooth_l1 = _smooth(smooth_l1, losses["l1"], 0.02)
            patches = cfg.batch * self.ranks.world  # the effective batch
            smooth_rate = _smooth(smooth_rate, patches / max(seconds, 1e-9), 0.1)
            if self.step % cfg.log_every == 0:
                now = time.monotonic()
                rate = cfg.log_every * patches / max(now - window_t, 1e-9)
                record = {"event": "train", "step": self.step, "elapsed": round(self.elapsed, 1)}
                record.update({k: round(v, 6) for k, v in losses.items()})
                record["l1_avg"] = round(float(np.mean(window)), 6)
                record["patches_per_s"] = round(rate, 2)
                self._log(record)
                window, window_t = [], now
            if cfg.val_every and self.step % cfg.val_every == 0:
                self.validate()
            self.display.update(
                self.progress(),
                status_line(self.step, smooth_l1, losses["lr"], smooth_rate, self.best_psnr),
            )
            if save_due:
                self.save_state()
                last_save = time.monotonic()
        unscored = validation_at(self.history, self.step) is None
        if self._schedule_done() and cfg.val_every and unscored:
            self.validate()  # the final weights are often the best: never leave them unscored

    def _schedule_done(self) -> bool:
        cfg = self.cfg
        return (cfg.steps is not None and self.step >= cfg.steps) or (
            cfg.time_budget is not None and self.elapsed >= cfg.time_budget
        )


def _to(x: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return x.to(device) if x is not None else None


def validation_at(history: list[dict], step: int) -> dict | None:
    """The per-set report of the validation run at ``step``, if the latest one ran there."""
    vals = [h for h in history if h.get("event") == "val" and "sets" in h]
    return vals[-1]["sets"] if vals and vals[-1]["step"] == step else None


def _smooth(average: float, value: float, weight: float) -> float:
    """Exponential moving average that starts at the first value."""
    return value if math.isnan(average) else (1 - weight) * average + weight * value
