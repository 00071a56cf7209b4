"""SR architectures by name, the re-parameterisable network, distillation and the generic mode."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carcli.checkpoints import load_model, save_checkpoint
from carcli.models import (
    CARConfig,
    CARModel,
    preset,
    quantize,
    with_offsets,
    without_offsets,
)
from carcli.models.config import SRConfig, describe, preset_names
from carcli.models.precision import autocast
from carcli.models.rep import RepConv3, RepSR
from carcli.tiler import TiledModel
from carcli.train.distill import DistillSampler
from carcli.train.trainer import TrainConfig, Trainer

SEED = 20261206


def tiny_rep(scale: int, blocks: int = 3) -> CARConfig:
    tiny = preset("tiny", scale)
    return replace(tiny, sr=SRConfig(arch="rep", features=8, blocks=blocks, res_scale=1.0))


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights far from the near-identity start, so every branch matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize("cin,cout", [(8, 8), (3, 8), (8, 12)])
def test_fused_repconv_equals_its_branches(cin: int, cout: int) -> None:
    print(f"seed {SEED}")
    torch.manual_seed(SEED)
    conv = randomised(RepConv3(cin, cout), SEED)
    x = torch.randn(2, cin, 11, 13, dtype=torch.float64)
    conv = conv.double()
    branches = conv.train()(x)
    with torch.no_grad():
        fused = conv.eval()(x)
    torch.testing.assert_close(fused, branches, rtol=1e-10, atol=1e-10)
    # the cache follows the weights: a change is seen at the next call
    with torch.no_grad():
        conv.conv1.weight.add_(0.5)
        expected = conv.train()(x)
        torch.testing.assert_close(conv.eval()(x), expected, rtol=1e-10, atol=1e-10)


def test_fused_forward_still_passes_gradients_to_the_input() -> None:
    """Refinement (``--refine``) differentiates the SR network in eval mode w.r.t. its input."""
    torch.manual_seed(SEED)
    sr = randomised(RepSR(8, 2, 2), SEED).double()
    x = torch.rand(1, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    sr.train()
    (g_train,) = torch.autograd.grad(sr(x).square().sum(), x)
    sr.eval()
    (g_eval,) = torch.autograd.grad(sr(x).square().sum(), x)
    torch.testing.assert_close(g_eval, g_train)


@pytest.mark.parametrize("scale", [2, 4])
def test_rep_margins_cover_the_receptive_field(scale: int) -> None:
    config = tiny_rep(scale, blocks=4)
    model = randomised(CARModel(config), SEED)
    body, up = model.sr.stage_margins()
    lr = torch.rand(1, 3, 32, 12, requires_grad=True)
    model.sr(lr)[0, :, 16 * scale].sum().backward()
    rows = torch.nonzero(lr.grad.abs().sum(dim=(0, 1, 3))).flatten()
    assert max(16 - int(rows.min()), int(rows.max()) - 16) == body + up == 4 + 2


@pytest.mark.parametrize("scale", [2, 4])
def test_rep_model_tiled_matches_untiled(scale: int) -> None:
    model = randomised(CARModel(tiny_rep(scale)), SEED + scale).eval()
    gen = torch.Generator().manual_seed(SEED)
    lr = quantize(torch.rand(1, 3, 37, 29, generator=gen))
    with torch.inference_mode():
        whole = model.upscale(lr).clamp(0, 1)
        tiled = TiledModel(model).upscale(lr, size=None, tile=8 * scale)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=2e-6)


def test_checkpoint_records_the_architecture_and_loads_it(tmp_path: Path) -> None:
    model = randomised(CARModel(tiny_rep(2)), SEED).eval()
    path = tmp_path / "rep.safetensors"
    save_checkpoint(model, path, {})
    loaded, meta = load_model(path, 2)
    assert loaded.config.sr.arch == "rep" and isinstance(loaded.sr, RepSR)
    x = torch.rand(1, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))
    assert "rep 3 convs x 8" in describe(loaded.config)


def test_configs_without_an_architecture_are_edsr() -> None:
    data = preset("compact", 4).to_dict()
    del data["sr"]["arch"]
    assert CARConfig.from_dict(json.loads(json.dumps(data))).sr.arch == "edsr"
    with pytest.raises(ValueError, match="unknown SR architecture 'nope'"):
        CARModel(replace(preset("tiny", 2), sr=SRConfig(arch="nope")))


def test_fast_presets_are_cheaper_than_the_shipped_edsr() -> None:
    assert {"fast", "fast-r2", "fast-r4"} <= set(preset_names())
    for scale in (2, 4):
        fast, compact = CARModel(preset("fast", scale)), CARModel(preset("compact", scale))
        assert fast.parameter_counts()["sr"] < 0.55 * compact.parameter_counts()["sr"]
        wide = CARModel(preset("fast-r2", scale)).parameter_counts()["resampler"]
        assert wide > 3 * fast.parameter_counts()["resampler"]


def shared_head(scale: int) -> CARConfig:
    tiny = preset("tiny", scale)
    return replace(tiny, resampler=replace(tiny.resampler, head="shared"))


@pytest.mark.parametrize("scale", [2, 4])
def test_shared_head_resampler_tiles_exactly_and_starts_as_bicubic(scale: int) -> None:
    print(f"seed {SEED}")
    torch.manual_seed(SEED)
    model = randomised(CARModel(shared_head(scale)), SEED + scale).eval()
    hr = torch.rand(1, 3, 61, 45, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        whole = model.downscale(hr)
        tiled = TiledModel(model).downscale(hr, tile=16 // scale)
    # float32 summation order only: the paper's head layout differs by 3.6e-6 here too
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    # From its bicubic start it downscales as the paper's head layout does from its own.
    torch.manual_seed(SEED)
    shared = CARModel(shared_head(scale)).eval()
    torch.manual_seed(SEED)
    separate = CARModel(preset("tiny", scale)).eval()
    shared.resampler.init_as_bicubic()
    separate.resampler.init_as_bicubic()
    with torch.inference_mode():
        kernels, offsets_h, offsets_v = shared.resampler(hr[..., :56, :40])
        assert float(offsets_h.abs().max()) < 0.05 and float(offsets_v.abs().max()) < 0.05
        torch.testing.assert_close(shared.downscale(hr), separate.downscale(hr), rtol=0, atol=0.02)


def test_shared_head_is_cheaper_and_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    for scale in (2, 4):
        lite, fast = CARModel(preset("fast-lite", scale)), CARModel(preset("fast", scale))
        lite_n, fast_n = (m.parameter_counts()["resampler"] for m in (lite, fast))
        assert lite_n < 0.8 * fast_n  # 0.65 at 2x, 0.76 at 4x
    model = randomised(CARModel(shared_head(2)), SEED).eval()
    save_checkpoint(model, tmp_path / "lite.safetensors", {})
    loaded, _ = load_model(tmp_path / "lite.safetensors", 2)
    assert loaded.config.resampler.head == "shared"
    assert "shared head" in describe(loaded.config)
    x = torch.rand(1, 3, 24, 16)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.downscale(x), model.downscale(x))
    data = shared_head(2).to_dict()
    data["resampler"]["head"] = "bogus"
    with pytest.raises(ValueError, match="resampler.head must be one of"):
        CARConfig.from_dict(data)


@pytest.mark.parametrize("scale", [2, 4])
def test_one_by_one_head_tiles_exactly_loads_and_is_cheaper(scale: int, tmp_path: Path) -> None:
    """head_kernel=1: the heads' last conv is 1x1, so the resampler reaches less far."""
    print(f"seed {SEED}")
    tiny = shared_head(scale)
    config = replace(tiny, resampler=replace(tiny.resampler, head_kernel=1))
    torch.manual_seed(SEED)
    model = randomised(CARModel(config), SEED + scale).eval()
    three = CARModel(tiny).resampler
    assert model.resampler.reach() < three.reach()
    assert model.downscale_margin() <= CARModel(tiny).downscale_margin()
    hr = torch.rand(1, 3, 61, 45, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        whole = model.downscale(hr)
        tiled = TiledModel(model).downscale(hr, tile=16 // scale)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    # The last conv has 1/9 of the 3x3 one's weights; the rest of the network is the same.
    one_conv, three_conv = model.resampler.head[-1], three.head[-1]
    assert one_conv.weight.numel() * 9 == three_conv.weight.numel()
    assert one_conv.kernel_size == (1, 1) and three_conv.kernel_size == (3, 3)
    # It starts as bicubic, like the 3x3 head, and round-trips through a checkpoint.
    fresh = CARModel(config).eval()
    fresh.resampler.init_as_bicubic()
    with torch.inference_mode():
        _, offsets_h, _ = fresh.resampler(hr[..., :56, :40])
    assert float(offsets_h.abs().max()) < 0.05
    save_checkpoint(model, tmp_path / "one.safetensors", {})
    loaded, _ = load_model(tmp_path / "one.safetensors", scale)
    assert loaded.config.resampler.head_kernel == 1 and "1x1 head" in describe(loaded.config)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.downscale(hr), whole)
    data = config.to_dict()
    for bad in (2, 5, True, "1"):
        data["resampler"]["head_kernel"] = bad
        with pytest.raises(ValueError, match="resampler.head_kernel must be one of"):
            CARConfig.from_dict(data)


def test_configs_written_before_head_kernel_load_as_3x3() -> None:
    data = preset("fast-lite", 4).to_dict()
    del data["resampler"]["head_kernel"]
    del data["resampler"]["offsets"]
    config = CARConfig.from_dict(data)
    assert config.resampler.head_kernel == 3 and config.resampler.offsets


@pytest.mark.parametrize("head", ["shared", "separate"])
@pytest.mark.parametrize("scale", [2, 4])
def test_resampler_without_offsets_tiles_exactly_loads_and_is_what_zero_offsets_give(
    scale: int, head: str, tmp_path: Path
) -> None:
    """offsets=False: kernels only, the op's fixed-tap path; the same LR as the design with
    offsets whose offsets are zero."""
    print(f"seed {SEED}")
    tiny = preset("tiny", scale)
    with_offsets = replace(tiny, resampler=replace(tiny.resampler, head=head))
    config = replace(tiny, resampler=replace(tiny.resampler, head=head, offsets=False))
    torch.manual_seed(SEED)
    model = randomised(CARModel(config), SEED + scale).eval()
    hr = torch.rand(1, 3, 61, 45, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        kernels, offsets_h, offsets_v = model.resampler(hr[..., :56, :40])
        assert offsets_h is None and offsets_v is None
        whole = model.downscale(hr)
        tiled = TiledModel(model).downscale(hr, tile=16 // scale)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-5)
    # The design with offsets, its kernel part the same and its offsets zeroed.
    other = CARModel(with_offsets).eval()
    state = other.state_dict()
    for key, value in model.state_dict().items():
        if state[key].shape != value.shape:  # the shared head's last conv: kernels first
            state[key][: value.shape[0]] = value
            state[key][value.shape[0] :] = 0.0
        else:
            state[key] = value
    for key in state:  # the separate heads' offsets: tanh(0)
        if key.startswith(("resampler.offsets_h_generation.4", "resampler.offsets_v_generation.4")):
            state[key].zero_()
    other.load_state_dict(state)
    with torch.inference_mode():
        torch.testing.assert_close(other.downscale(hr), whole, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in model.resampler.parameters()) < sum(
        p.numel() for p in other.resampler.parameters()
    )
    # A checkpoint keeps it; describe says so; a bicubic start works without offsets.
    save_checkpoint(model, tmp_path / "k.safetensors", {})
    loaded, _ = load_model(tmp_path / "k.safetensors", scale)
    assert not loaded.config.resampler.offsets and "no offsets" in describe(loaded.config)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.downscale(hr), whole)
    loaded.resampler.reset_heads()
    data = config.to_dict()
    for bad in (0, "no", None):
        data["resampler"]["offsets"] = bad
        with pytest.raises(ValueError, match="resampler.offsets must be true or false"):
            CARConfig.from_dict(data)


@pytest.mark.parametrize("head", ["shared", "separate"])
@pytest.mark.parametrize("scale", [2, 4])
def test_without_offsets_is_the_pair_with_its_offsets_at_zero(scale: int, head: str) -> None:
    """without_offsets keeps every weight but the offsets' and runs the fixed-tap path: the
    same LR as the full pair whose offset heads give zero (tanh(0))."""
    print(f"seed {SEED}")
    tiny = preset("tiny", scale)
    config = replace(tiny, resampler=replace(tiny.resampler, head=head))
    model = randomised(CARModel(config), SEED + 7).eval()
    taps = model.resampler.taps
    with torch.no_grad():
        if head == "shared":  # the last conv's offset rows
            last = model.resampler.head[-1]
            last.weight[taps:] = 0.0
            last.bias[taps:] = 0.0
        else:
            for branch in (
                model.resampler.offsets_h_generation,
                model.resampler.offsets_v_generation,
            ):
                branch[-2].weight.zero_()
                branch[-2].bias.zero_()
    lean = without_offsets(model)
    assert not lean.config.resampler.offsets and lean.config.name == f"{tiny.name}-no-offsets"
    assert set(lean.state_dict()) <= set(model.state_dict())  # separate heads: fewer keys
    assert lean.parameter_counts()["resampler"] < model.parameter_counts()["resampler"]
    hr = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        torch.testing.assert_close(lean.downscale(hr), model.downscale(hr), rtol=0, atol=1e-5)
        lr = quantize(model.downscale(hr))
        assert torch.equal(lean.upscale(lr), model.upscale(lr))
    with pytest.raises(ValueError, match="already has no offsets"):
        without_offsets(lean)


@pytest.mark.parametrize("head", ["shared", "separate"])
@pytest.mark.parametrize("scale", [2, 4])
def test_with_offsets_adds_them_at_zero(scale: int, head: str) -> None:
    """with_offsets(without_offsets(pair)): the design with offsets again, all of them zero,
    so the same LR as the lean pair; the kernel branch's weights are kept."""
    print(f"seed {SEED}")
    tiny = preset("tiny", scale)
    config = replace(tiny, resampler=replace(tiny.resampler, head=head))
    lean = without_offsets(randomised(CARModel(config), SEED + 8).eval())
    grown = with_offsets(lean).eval()
    assert grown.config.resampler == config.resampler and grown.config.name == tiny.name
    hr = torch.rand(1, 3, 40, 48, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        _, offsets_h, offsets_v = grown.resampler(hr)
        assert offsets_h.abs().max() == 0 and offsets_v.abs().max() == 0
        torch.testing.assert_close(grown.downscale(hr), lean.downscale(hr), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="already has offsets"):
        with_offsets(grown)


@pytest.mark.parametrize("head", ["shared", "separate"])
def test_kernels_without_offsets_come_one_plane_per_tap(head: str) -> None:
    """The fixed-tap op weights an image phase by one tap's plane at a time: a channels-last
    model (the CPU default) must still hand it float32 planes, not a k*k-strided gather,
    under bf16 autocast and in float32, and the LR is what the plain layout gives."""
    print(f"seed {SEED}")
    tiny = preset("tiny", 4)
    config = replace(tiny, resampler=replace(tiny.resampler, head=head, offsets=False))
    model = randomised(CARModel(config), SEED).eval()
    hr = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        plain = model.downscale(hr)
        model.to(memory_format=torch.channels_last)
        for precision in ("fp32", "bf16"):
            with autocast(hr.device, precision):
                kernels, _, _ = model.resampler(hr)
            assert kernels.dtype == torch.float32 and kernels.is_contiguous(), precision
        torch.testing.assert_close(model.downscale(hr), plain, rtol=0, atol=1e-6)


def test_training_without_offsets_skips_their_regularisers(train_dir: Path, tmp_path: Path) -> None:
    cfg = _cfg(train_dir, config="fast-lite-no-offsets", scale=4, patch=32, steps=2,
               offset_weight=1e-3, tv_weight=1e-3, log_every=1)  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    before = trainer.model.resampler.head[-1].weight.detach().clone()
    trainer.run()
    assert not torch.equal(trainer.model.resampler.head[-1].weight, before)  # kernels trained
    logged = [
        json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    ]
    steps = [r for r in logged if r.get("event") == "train"]
    assert steps and all("offset" not in r and "tv" not in r for r in steps)


# --------------------------------------------------------------------------- training


@pytest.fixture
def train_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(SEED)
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(3):
        coarse = (rng.random((10, 12, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(coarse).resize((72 + 8 * i, 64), Image.BICUBIC)
        img.save(folder / f"{i}.png")
    return folder


def _cfg(train_dir: Path, **kw) -> TrainConfig:
    base = dict(
        scale=2, data=[str(train_dir)], val=[], config="tiny", steps=4, batch=2, patch=32,
        lr=1e-3, warmup=0, precision="fp32", channels_last=False, val_every=0, ema=0, seed=SEED,
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def teacher_file(tmp_path: Path) -> Path:
    torch.manual_seed(SEED + 1)  # not the student's seed: its SR network must differ
    teacher = CARModel(preset("tiny", 2)).eval()
    path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher, path, {})
    return path


class _Fake:
    """A PatchSampler stand-in holding given images, for checking crop alignment."""

    def __init__(self, images: list[torch.Tensor], patch: int) -> None:
        self.images, self.patch = images, patch
        self.kept = [Path(f"{i}.png") for i in range(len(images))]
        self.weights = torch.ones(len(images)) / len(images)
        self.generator = torch.Generator().manual_seed(SEED)
        self.pixels = sum(i.shape[1] * i.shape[2] for i in images)


class _BoxCache:
    """LR = s x s box average of the HR image, teacher = HR + 1 (easy to check)."""

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def entry(self, path: Path, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lr = torch.nn.functional.avg_pool2d(hr.float()[None], self.scale)[0]
        return lr.round().to(torch.uint8), (hr.float() / 255 + 1).half()


@pytest.mark.parametrize("scale", [2, 4])
def test_distill_crops_are_aligned_under_every_flip(scale: int) -> None:
    gen = torch.Generator().manual_seed(SEED)
    # Piecewise constant on s x s blocks: the box average is exact, so alignment is checkable.
    blocks = torch.randint(0, 256, (3, 3, 13, 11), generator=gen, dtype=torch.uint8)
    images = [b.repeat_interleave(scale, 1).repeat_interleave(scale, 2) for b in blocks]
    sampler = DistillSampler(_Fake(images, 8 * scale), _BoxCache(scale), scale, quiet=True)
    for _ in range(5):
        lr, hr, teacher = sampler.batch(8)
        assert lr.shape[-1] * scale == hr.shape[-1] == 8 * scale
        torch.testing.assert_close(torch.nn.functional.avg_pool2d(hr, scale), lr)
        torch.testing.assert_close(teacher, hr + 1, atol=2e-3, rtol=0)


def test_distillation_with_a_frozen_resampler_caches_targets(
    train_dir: Path, teacher_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cfg = _cfg(train_dir, teacher=str(teacher_file), freeze_resampler=True, cache_dir=str(cache))
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    teacher, _ = load_model(teacher_file, 2)
    # the student's resampler starts as the teacher's and does not move
    before = {k: v.clone() for k, v in trainer.model.resampler.state_dict().items()}
    for key, value in teacher.resampler.state_dict().items():
        torch.testing.assert_close(before[key], value)
    first = trainer.train_step()
    assert first["teacher"] > 0 and first["total"] > first["l1"]
    trainer.run()
    for key, value in trainer.model.resampler.state_dict().items():
        torch.testing.assert_close(value, before[key])
    files = sorted(cache.iterdir())
    assert len(files) == 3
    stamps = [f.stat().st_mtime_ns for f in files]
    # a second run with the same networks reuses the cache, and draws the same batches
    again = Trainer(cfg, tmp_path / "run2", torch.device("cpu"), quiet=True)
    assert sorted(cache.iterdir()) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert again.train_step()["total"] == pytest.approx(first["total"], rel=1e-5)


def test_distillation_targets_are_the_teachers_round_trip(
    train_dir: Path, teacher_file: Path, tmp_path: Path
) -> None:
    """Joint training with a teacher: the second loss is against the teacher's output."""
    cfg = _cfg(train_dir, teacher=str(teacher_file), teacher_weight=0.5)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    hr = trainer.sampler.batch(2)
    from carcli.train.trainer import training_losses

    losses = training_losses(trainer.model, hr, cfg, torch.device("cpu"), teacher=trainer.teacher)
    with torch.no_grad():
        target = trainer.teacher(hr).clamp(0, 1)
    assert losses["teacher"] > 0
    total = losses["l1"] + 0.5 * losses["teacher"] + cfg.offset_weight * losses["offset"]
    total = total + cfg.tv_weight * losses["tv"]
    torch.testing.assert_close(losses["total"], total)
    assert target.shape == hr.shape


def test_lr_weight_makes_the_teachers_lr_image_a_target(
    train_dir: Path, teacher_file: Path, tmp_path: Path
) -> None:
    """--lr-weight: L1 between the student's float LR and the teacher's, into the resampler."""
    from carcli.errors import ConfigError
    from carcli.train.trainer import training_losses

    print(f"seed {SEED}")
    cfg = _cfg(
        train_dir, teacher=str(teacher_file), teacher_weight=0.0, lr_weight=10.0,
        offset_weight=0.0, tv_weight=0.0, steps=40,
    )  # fmt: skip
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    trainer.model.resampler.init_as_bicubic()  # not the teacher's: a new resampler
    hr = trainer.sampler.batch(2)
    cpu = torch.device("cpu")
    losses = training_losses(trainer.model, hr, cfg, cpu, teacher=trainer.teacher)
    with torch.no_grad():
        own = trainer.model.resample_padded(hr)
        theirs = trainer.teacher.resample_padded(hr)
    torch.testing.assert_close(losses["lr"], torch.nn.functional.l1_loss(own, theirs))
    assert "teacher" not in losses  # teacher_weight 0: its SR network is not even run
    torch.testing.assert_close(losses["total"], losses["l1"] + 10.0 * losses["lr"])
    learned = [p for p in trainer.model.resampler.parameters() if p.requires_grad]
    grads = torch.autograd.grad(losses["lr"], learned)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    first = losses["lr"].item()
    trainer.run()
    after = training_losses(trainer.model, hr, cfg, cpu, teacher=trainer.teacher)["lr"].item()
    assert after < 0.7 * first, (first, after)
    # A student identical to its teacher has nothing to learn from it.
    same = Trainer(replace(cfg, steps=1), tmp_path / "run2", cpu, quiet=True)
    assert training_losses(same.model, hr, cfg, cpu, teacher=same.teacher)["lr"].item() == 0.0
    for bad in (replace(cfg, teacher=None), replace(cfg, freeze_resampler=True)):
        with pytest.raises(ConfigError, match="lr_weight|lr-weight"):
            bad.check()


def test_init_with_another_sr_architecture_keeps_the_resampler(
    train_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(SEED)
    pair = tmp_path / "compact.safetensors"
    save_checkpoint(CARModel(preset("compact", 2)).eval(), pair, {})
    cfg = _cfg(train_dir, init=str(pair), config="fast", steps=1)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    teacher, _ = load_model(pair, 2)
    assert trainer.model.config.sr.arch == "rep"
    for key, value in teacher.resampler.state_dict().items():
        torch.testing.assert_close(trainer.model.resampler.state_dict()[key], value)


def test_init_sr_starts_the_student_from_a_generic_upscaler(
    train_dir: Path, tmp_path: Path
) -> None:
    from carcli.errors import UsageError

    print(f"seed {SEED}")
    torch.manual_seed(SEED)
    pair = randomised(CARModel(tiny_rep(2)), SEED + 7).eval()
    save_checkpoint(pair, tmp_path / "pair.safetensors", {})
    generic = _generic_file(tmp_path / "car_generic_x2.safetensors")
    cfg = _cfg(
        train_dir,
        init=str(tmp_path / "pair.safetensors"),
        init_sr=str(tmp_path / "car_generic_x2.safetensors"),
        config="from-init",
        steps=1,
    )
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    # SR from the generic file, resampler from the pair: neither from the other.
    for key, value in generic.sr.state_dict().items():
        torch.testing.assert_close(trainer.model.sr.state_dict()[key], value, rtol=0, atol=0)
    for key, value in pair.resampler.state_dict().items():
        torch.testing.assert_close(trainer.model.resampler.state_dict()[key], value)
    key = next(name for name, p in pair.sr.named_parameters() if p.requires_grad)
    assert not torch.equal(trainer.model.sr.state_dict()[key], pair.sr.state_dict()[key])
    # Another SR design is refused with one line naming both.
    save_checkpoint(
        CARModel(tiny_rep(2, blocks=2)).eval(),
        tmp_path / "other.safetensors",
        {"role": "generic-sr"},
    )
    bad = replace(cfg, init_sr=str(tmp_path / "other.safetensors"))
    with pytest.raises(
        UsageError, match=r"--init-sr: other.safetensors has a rep SR network \(2 x 8\)"
    ):
        Trainer(bad, tmp_path / "run2", torch.device("cpu"), quiet=True)


def test_generic_mode_trains_on_bicubic_lr_and_says_so(train_dir: Path, tmp_path: Path) -> None:
    from carcli.train.distill import evaluate_on_bicubic

    cfg = _cfg(train_dir, lr_source="bicubic", steps=3)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    frozen = {k: v.clone() for k, v in trainer.model.resampler.state_dict().items()}
    trainer.run()
    for key, value in trainer.model.resampler.state_dict().items():
        torch.testing.assert_close(value, frozen[key])
    trainer.export(tmp_path / "g.safetensors")
    _, meta = load_model(tmp_path / "g.safetensors", 2, upscale_only=True)
    assert meta["role"] == "generic-sr"
    from carcli.checkpoints import load_generic

    assert load_generic(tmp_path / "g.safetensors", 2).config.sr == trainer.model.config.sr
    report = evaluate_on_bicubic(trainer.model.eval(), train_dir, torch.device("cpu"))
    assert 5 < report["psnr"] < 60 and 0 < report["ssim"] <= 1


# --------------------------------------------------------------------------- generic files


def _generic_file(path: Path, scale: int = 2, with_resampler: bool = False) -> CARModel:
    """A generic upscaler file; ``with_resampler``: as files written before SR-only ones."""
    from safetensors.torch import save_file

    torch.manual_seed(SEED + scale)
    model = randomised(CARModel(tiny_rep(scale)), SEED).eval()
    save_checkpoint(model, path, {"role": "generic-sr"})
    if with_resampler:  # rewrite it with the untrained resampler's tensors added
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
        for key, value in model.resampler.state_dict().items():
            tensors[f"resampler.{key}"] = value.contiguous()
        save_file(tensors, str(path), metadata=meta)
    return model


@pytest.mark.parametrize("legacy", [False, True])
def test_generic_file_holds_the_sr_network_only_and_upscales_the_same(
    tmp_path: Path, legacy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors import safe_open

    print(f"seed {SEED}")
    path = tmp_path / "car_generic_x2.safetensors"
    model = _generic_file(path, with_resampler=legacy)
    with safe_open(str(path), framework="pt") as handle:
        prefixes = {k.split(".")[0] for k in handle.keys()}  # noqa: SIM118
    assert prefixes == ({"sr", "resampler"} if legacy else {"sr"})
    loaded, meta = load_model(path, 2, upscale_only=True)
    assert loaded.sr_only and meta["role"] == "generic-sr"
    assert set(loaded.parameter_counts()) == {"sr"}
    monkeypatch.setenv("CARCLI_WEIGHTS", str(tmp_path))
    from carcli.info import gather

    (listed,) = gather()["weights"]
    assert listed["role"] == "generic" and listed["parameters"].startswith("sr ")
    assert listed["architecture"] == "rep 3 convs x 8 (SR only: generic upscaler)"
    lr = torch.rand(1, 3, 13, 17, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        torch.testing.assert_close(loaded.upscale(lr), model.upscale(lr), rtol=0, atol=0)
    from carcli.train.export import cpu_timing

    timing = cpu_timing(loaded, threads=1, repeats=1)  # its upscale alone: no resampler
    assert set(timing["fp32"]) == {"upscale_s"} and timing["fp32"]["upscale_s"] > 0
    # Written again (car average, car export), it stays an SR-only file.
    save_checkpoint(loaded, tmp_path / "again.safetensors", {})
    with safe_open(str(tmp_path / "again.safetensors"), framework="pt") as handle:
        assert {k.split(".")[0] for k in handle.keys()} == {"sr"}  # noqa: SIM118
        assert json.loads(handle.metadata()["role"]) == "generic-sr"


def test_a_generic_upscaler_never_downscales(tmp_path: Path) -> None:
    import carcli
    from carcli.checkpoints import WeightsError

    path = tmp_path / "car_generic_x2.safetensors"
    _generic_file(path)
    with pytest.raises(
        WeightsError, match="is a generic upscaler .* cannot downscale|not downscale"
    ):
        load_model(path, 2)
    picture = np.random.default_rng(SEED).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    with pytest.raises(WeightsError, match="not downscale"):
        carcli.downscale(picture, scale=2, weights=path)
    with pytest.raises(WeightsError, match="not downscale"):
        carcli.roundtrip(picture, scale=2, weights=path)
    assert carcli.upscale(picture, scale=2, weights=path).shape == (48, 40, 3)
    # A pair cannot start from it; another generic upscaler can.
    with pytest.raises(WeightsError, match="not downscale"):
        Trainer(
            TrainConfig(data=[str(tmp_path)], val=[], scale=2, init=str(path), steps=1),
            tmp_path / "run",
            torch.device("cpu"),
            quiet=True,
        )


def test_car_commands_use_a_generic_file_for_upscaling_only(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from carcli.cli import app

    path = tmp_path / "car_generic_x2.safetensors"
    _generic_file(path)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(np.full((24, 20, 3), 90, np.uint8)).save(src / "a.png")
    runner = CliRunner()
    down = runner.invoke(
        app, ["downscale", str(src), str(tmp_path / "lr"), "-s", "2", "-w", str(path)]
    )
    assert down.exit_code != 0
    lines = [x for x in down.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "generic upscaler" in lines[0] and "Traceback" not in down.output
    assert not (tmp_path / "lr").exists()
    up = runner.invoke(
        app,
        [
            "upscale",
            str(src),
            str(tmp_path / "up"),
            "-s",
            "2",
            "-w",
            str(path),
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert up.exit_code == 0, up.output
    # The weights given are themselves the generic upscaler: said, not warned against.
    assert f"using the generic upscaler {path} for them" in up.stderr
    assert Image.open(tmp_path / "up" / "a.png").size == (40, 48)
    assert json.loads((tmp_path / "r.json").read_text())["models"][0]["role"] == "generic"


def test_half_storage_halves_the_file_and_loads_as_float32(tmp_path: Path) -> None:
    from safetensors import safe_open
    from typer.testing import CliRunner

    from carcli.checkpoints import WeightsError, load_checkpoint
    from carcli.cli import app

    print(f"seed {SEED}")
    torch.manual_seed(SEED)
    model = randomised(CARModel(tiny_rep(4)), SEED).eval()
    full, half = tmp_path / "full.safetensors", tmp_path / "half.safetensors"
    save_checkpoint(model, full, {})
    save_checkpoint(model, half, {}, storage="fp16")
    with safe_open(str(half), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}  # noqa: SIM118
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(half)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    lr = torch.rand(1, 3, 9, 11, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        torch.testing.assert_close(loaded.upscale(lr), model.upscale(lr), rtol=0, atol=1e-2)
    with torch.no_grad():  # a weight beyond float16's range: refused, nothing written
        model.sr.head[0].conv3.weight[0, 0, 0, 0] = 1e6
    with pytest.raises(WeightsError, match="does not fit in fp16"):
        save_checkpoint(model, tmp_path / "big.safetensors", {}, storage="fp16")
    assert not list(tmp_path.glob("*big*"))
    # `car export --half` from a run folder
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(loaded, run / "best.safetensors", {})
    out = tmp_path / "exported.safetensors"
    result = CliRunner().invoke(app, ["export", str(run), str(out), "--half", "--no-timing"])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}  # noqa: SIM118
