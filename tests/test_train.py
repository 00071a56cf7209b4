"""Training: the step learns, resuming continues bit for bit, exports load back."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import record_dtypes
from PIL import Image

from carcli.checkpoints import load_checkpoint
from carcli.errors import UsageError
from carcli.models.quantize import quantize, quantize_for_training
from carcli.train.commands import parse_duration
from carcli.train.losses import offset_loss, tv_loss
from carcli.train.trainer import LOG_NAME, TrainConfig, Trainer, lr_at


def _smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Random low-frequency content: learnable in a few steps, unlike white noise."""
    coarse = rng.random((h // 8 + 2, w // 8 + 2, 3))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(img)


# Every test here draws from the global generators (random configs, weights, patches):
# seeded per test and printed (conftest.seed).
pytestmark = pytest.mark.usefixtures("seed")


@pytest.fixture
def train_dir(tmp_path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    folder = tmp_path / "train"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(_smooth_image(rng, 48 + 8 * i, 56)).save(folder / f"{i}.png")
    Image.fromarray(_smooth_image(rng, 16, 16)).save(folder / "small.png")  # below the patch
    return folder


def _config(train_dir: Path, **kw) -> TrainConfig:
    base = dict(
        scale=2, data=[str(train_dir)], val=[], config="tiny", steps=6, batch=4, patch=32,
        lr=2e-3, warmup=0, precision="fp32", val_every=0, log_every=2, ema=0.9,
        seed=int(torch.randint(0, 2**31 - 1, ())),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def test_loss_decreases(train_dir: Path, tmp_path: Path):
    cfg = _config(train_dir, steps=25, lr=3e-3)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    fixed = trainer.sampler.batch(8)
    from carcli.train.trainer import training_losses

    with torch.no_grad():
        before = float(training_losses(trainer.model, fixed, cfg, torch.device("cpu"))["l1"])
    trainer.run()
    with torch.no_grad():
        after = float(training_losses(trainer.model, fixed, cfg, torch.device("cpu"))["l1"])
    assert after < 0.7 * before, (before, after)
    assert len(trainer.sampler.skipped) == 1


def test_mse_loss_optimises_the_squared_error(train_dir: Path, tmp_path: Path):
    """--loss mse: the objective is the mean squared error (what PSNR measures); L1 is still
    reported, and the same forward pass gives both (mean|e|^2 <= mean e^2, Jensen)."""
    from carcli.train.trainer import training_losses

    cfg = _config(train_dir, steps=25, lr=3e-3, loss="mse", offset_weight=0.0, tv_weight=0.0)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    fixed = trainer.sampler.batch(8)
    with torch.no_grad():
        before = training_losses(trainer.model, fixed, cfg, torch.device("cpu"))
    assert before["total"] is before["mse"]
    assert float(before["l1"]) ** 2 <= float(before["mse"]) <= float(before["l1"])  # |e| <= 1
    l1_cfg = _config(train_dir, loss="l1", offset_weight=0.0, tv_weight=0.0)
    with torch.no_grad():
        as_l1 = training_losses(trainer.model, fixed, l1_cfg, torch.device("cpu"))
    assert float(as_l1["total"]) == float(before["l1"]) and "mse" not in as_l1
    trainer.run()
    with torch.no_grad():
        after = training_losses(trainer.model, fixed, cfg, torch.device("cpu"))
    assert float(after["mse"]) < 0.6 * float(before["mse"]), (before, after)
    with pytest.raises(ValueError, match="l1 or mse"):
        training_losses(trainer.model, fixed, _config(train_dir, loss="l2"), torch.device("cpu"))


def test_luma_weight_adds_the_loss_of_bt601_luma(train_dir: Path, tmp_path: Path):
    """--luma-weight W: total = RGB loss + W * the same loss on Y / 255, computed by hand here;
    training with it lowers that luma loss."""
    from carcli.train.trainer import training_losses

    w = float(torch.empty(()).uniform_(0.5, 3.0))
    cfg = _config(
        train_dir, steps=25, lr=3e-3, luma_weight=w, loss="mse", offset_weight=0.0, tv_weight=0.0
    )
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    fixed = trainer.sampler.batch(8)
    cpu = torch.device("cpu")
    with torch.no_grad():
        before = training_losses(trainer.model, fixed, cfg, cpu)
        sr = trainer.model(fixed).float()  # the same round trip: resample, round, upscale
    coeffs = torch.tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1) / 255.0
    luma_by_hand = float((((sr - fixed) * coeffs).sum(dim=1) ** 2).mean())
    assert float(before["luma"]) == pytest.approx(luma_by_hand, rel=1e-4)
    expected_total = float(before["mse"]) + w * luma_by_hand
    assert float(before["total"]) == pytest.approx(expected_total, rel=1e-5)
    plain = _config(train_dir, loss="mse", offset_weight=0.0, tv_weight=0.0)
    with torch.no_grad():
        assert "luma" not in training_losses(trainer.model, fixed, plain, cpu)
    trainer.run()
    with torch.no_grad():
        after = training_losses(trainer.model, fixed, cfg, cpu)
    assert float(after["luma"]) < 0.6 * float(before["luma"]), (before, after)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_identical(train_dir: Path, tmp_path: Path, precision: str):
    cfg = _config(train_dir, steps=6, precision=precision)
    straight = Trainer(cfg, tmp_path / "a", torch.device("cpu"), quiet=True)
    straight.run()

    first = Trainer(cfg, tmp_path / "b", torch.device("cpu"), quiet=True)
    first.run(stop_at=3)  # saves state at the end
    resumed = Trainer(cfg, tmp_path / "b", torch.device("cpu"), quiet=True)
    resumed.load_state()
    assert resumed.step == 3
    resumed.run()

    for name, want in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], want, rtol=0, atol=0)
    for name, want in straight.ema.state_dict().items():
        torch.testing.assert_close(resumed.ema.state_dict()[name], want, rtol=0, atol=0)
    logs = [json.loads(line) for line in (tmp_path / "b" / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in logs if r["event"] == "train"] == [2, 4, 6]


def test_a_run_folder_removed_while_training_is_put_back(train_dir: Path, tmp_path: Path):
    """Deleting RUN under a running trainer lost the state with a traceback (FileNotFoundError
    from torch.save); the trainer now recreates it and the run resumes from what it saved."""
    import shutil

    cfg = _config(train_dir, steps=4)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    trainer.run(stop_at=2)
    shutil.rmtree(tmp_path / "run")
    trainer.run()
    assert (tmp_path / "run" / "state.pt").is_file()
    assert (tmp_path / "run" / "log.jsonl").is_file()
    resumed = Trainer(cfg.resumed(), tmp_path / "run", torch.device("cpu"), quiet=True)
    resumed.load_state()
    assert resumed.step == 4


def test_sr_pretrain_trains_only_edsr_first(train_dir: Path, tmp_path: Path):
    cfg = _config(train_dir, steps=4, sr_pretrain=2)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)

    def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
        return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())

    resampler, sr = snapshot(trainer.model.resampler), snapshot(trainer.model.sr)
    trainer.run(stop_at=2)
    assert not changed(resampler, trainer.model.resampler)
    assert changed(sr, trainer.model.sr)
    trainer.run()  # joint from step 2 on
    assert trainer.step == 4
    assert changed(resampler, trainer.model.resampler)


def test_export_round_trip(train_dir: Path, tmp_path: Path, seed: int):
    cfg = _config(train_dir, steps=2)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    trainer.run()
    out = tmp_path / "x2.safetensors"
    trainer.export(out, {"Set5": {"psnr": 30.5, "ssim": 0.9}})
    model, meta = load_checkpoint(out)
    assert meta["steps"] == 2
    assert meta["validation"]["Set5"]["psnr"] == 30.5
    assert meta["recipe"]["lr"] == cfg.lr
    for name, want in trainer.ema.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], want, rtol=0, atol=0)
    # Same memory format as the EMA (channels-last): contiguous runs other conv kernels,
    # whose rounding exceeded 1e-6 now and then on AVX-512.
    model.to(memory_format=torch.channels_last)
    ema = trainer.ema.eval()
    x = torch.rand(1, 3, 21, 30)  # the seed fixture seeded torch (and printed it)
    with torch.no_grad():
        # Each half on its own: a rounding difference of 1e-7 in the float LR can move one
        # 8-bit level in between (it did, at random, on AVX-512), which is not a difference.
        torch.testing.assert_close(model.downscale(x), ema.downscale(x), rtol=1e-6, atol=1e-6)
        lr = quantize(ema.downscale(x))
        torch.testing.assert_close(model.upscale(lr), ema.upscale(lr), rtol=1e-6, atol=1e-6)


def test_validation_keeps_best(train_dir: Path, tmp_path: Path):
    scores = iter([20.0, 25.0, 22.0])

    def fake_eval(model):
        return {"Set": {"psnr": next(scores), "ssim": 0.5}}

    cfg = _config(train_dir, steps=3, val_every=1)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), evaluate=fake_eval, quiet=True)
    trainer.run()
    assert trainer.best_psnr == 25.0
    _, meta = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert meta["steps"] == 2 and meta["validation"]["Set"]["psnr"] == 25.0


def test_quantisation_rounds_forward_and_passes_gradients():
    lr = (torch.rand(2, 3, 5, 5) * 1.2 - 0.1).requires_grad_()
    for gradient, alpha in (("ste", 0.0), ("soft", 0.5)):
        q = quantize_for_training(lr, gradient, alpha=0.5)
        torch.testing.assert_close(q, torch.round(lr.clamp(0, 1) * 255) / 255)
        (grad,) = torch.autograd.grad(q.sum(), lr)
        z = lr.detach().clamp(0, 1) * 255
        torch.testing.assert_close(grad, 1 - alpha * torch.cos(2 * math.pi * z))


def test_regularisers_match_their_definitions():
    b, k, h, w = 2, 3, 4, 5
    torch.manual_seed(0)
    dx, dy = torch.randn(b, k * k, h, w), torch.randn(b, k * k, h, w)
    kern = torch.rand(b, k * k, h, w)
    # Python floats throughout: pytest.approx (9.2+) refuses a 0-d tensor as the expected value.
    dx, dy, kern = dx.double().numpy(), dy.double().numpy(), kern.double().numpy()
    expected_offset = 0.0
    expected_tv = 0.0
    for n in range(b):
        for t in range(k * k):
            u, v = divmod(t, k)
            dist = math.hypot(u - k // 2, v - k // 2) / k
            for i in range(h):
                for j in range(w):
                    expected_offset += math.hypot(dx[n, t, i, j], dy[n, t, i, j]) * dist
                    if j + 1 < w:
                        expected_tv += abs(dy[n, t, i, j + 1] - dy[n, t, i, j]) * kern[n, t, i, j]
                    if i + 1 < h:
                        expected_tv += abs(dx[n, t, i + 1, j] - dx[n, t, i, j]) * kern[n, t, i, j]
    dx, dy, kern = (torch.from_numpy(a).float() for a in (dx, dy, kern))
    expected_offset, expected_tv = float(expected_offset), float(expected_tv)
    assert float(offset_loss(dx, dy)) == pytest.approx(expected_offset / (b * h * w), rel=1e-4)
    assert float(tv_loss(kern, dx, dy)) == pytest.approx(expected_tv / (b * h * w), rel=1e-4)


def test_schedule_and_durations():
    cfg = TrainConfig(scale=4, data=[], val=[], lr=1e-3, min_lr=0.0, warmup=10, steps=110)
    assert lr_at(cfg, 0, 0.0) == pytest.approx(1e-4)
    assert lr_at(cfg, 10, 0.0) == pytest.approx(1e-3)
    assert lr_at(cfg, 60, 0.5) == pytest.approx(5e-4)
    assert lr_at(cfg, 110, 1.0) == pytest.approx(0.0)
    assert parse_duration("2h30m") == 9000
    assert parse_duration("45m") == 2700
    assert parse_duration("90") == 90


def test_export_run_from_state_and_best(train_dir: Path, tmp_path: Path):
    from carcli.train.export import export_run

    scores = iter([21.0, 20.0])
    cfg = _config(train_dir, steps=2, val_every=1)
    trainer = Trainer(
        cfg, tmp_path / "run", torch.device("cpu"),
        evaluate=lambda m: {"Set": {"psnr": next(scores), "ssim": 0.5}}, quiet=True,
    )  # fmt: skip
    trainer.run()
    last = export_run(tmp_path / "run", tmp_path / "last.safetensors", "last", timing=False)
    best = export_run(tmp_path / "run", tmp_path / "best.safetensors", "best", timing=False)
    assert (last["steps"], last["validation"]["Set"]["psnr"]) == (2, 20.0)
    assert (best["steps"], best["validation"]["Set"]["psnr"]) == (1, 21.0)
    total = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    for name in ("best", "last"):  # "last" stays in `model` for the check below
        model, meta = load_checkpoint(tmp_path / f"{name}.safetensors")
        assert meta["parameters"] == model.parameter_counts() == trainer.ema.parameter_counts()
        assert sum(meta["parameters"].values()) == total > 0  # trained weights, EMA's too
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trainer.ema.eval()(x), rtol=1e-6, atol=1e-6)


def test_the_end_of_the_schedule_is_always_validated(train_dir: Path, tmp_path: Path):
    """A run that ends between validations still scores, and can keep, its final weights."""
    scores = iter([20.0, 21.0, 19.0])
    steps_seen = []

    def fake_eval(model):  # noqa: ANN001, ANN202
        steps_seen.append(trainer.step)
        return {"Set": {"psnr": next(scores), "ssim": 0.5}}

    cfg = _config(train_dir, steps=5, val_every=2)
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), evaluate=fake_eval, quiet=True)
    trainer.run()
    assert steps_seen == [2, 4, 5]
    _, meta = load_checkpoint(tmp_path / "run" / "best.safetensors")
    assert meta["steps"] == 4 and trainer.best_psnr == 21.0

    trainer.cfg.steps = 6  # extended schedule, resumed: validated once at its end (step 6)
    scores = iter([22.0])
    trainer.run()
    assert steps_seen == [2, 4, 5, 6] and trainer.best_psnr == 22.0
    trainer.run()  # nothing left to train: no second validation of step 6
    assert steps_seen == [2, 4, 5, 6]


def test_export_last_validates_weights_that_never_were(train_dir: Path, tmp_path: Path):
    from carcli.train.export import export_run

    cfg = _config(train_dir, steps=6, val_every=2)
    trainer = Trainer(
        cfg, tmp_path / "run", torch.device("cpu"),
        evaluate=lambda m: {"Set": {"psnr": 20.0, "ssim": 0.5}}, quiet=True,
    )  # fmt: skip
    trainer.run(stop_at=3)  # validated at step 2, interrupted at step 3
    seen = []

    def evaluate(model):  # noqa: ANN001, ANN202
        seen.append(model)
        return {"Set": {"psnr": 23.0, "ssim": 0.6}}

    meta = export_run(tmp_path / "run", tmp_path / "a.safetensors", "last", False, evaluate)
    assert meta["steps"] == 3 and meta["validation"]["Set"]["psnr"] == 23.0 and len(seen) == 1
    meta = export_run(tmp_path / "run", tmp_path / "b.safetensors", "last", False)
    assert meta["validation"] == {}  # nothing measured for these weights: nothing claimed


def test_progress_display_on_a_terminal(train_dir: Path, tmp_path: Path):
    """On a terminal `car train` shows a live bar with step, loss, speed and best validation."""
    import io

    from rich.console import Console

    from carcli.train.progress import RichTrainDisplay, TrainDisplay, make_display

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    display = make_display(quiet=False, console=console)
    assert isinstance(display, RichTrainDisplay)
    cfg = _config(train_dir, steps=4, val_every=2)
    scores = iter([20.5, 21.25])
    trainer = Trainer(
        cfg, tmp_path / "run", torch.device("cpu"),
        evaluate=lambda m: {"Set": {"psnr": next(scores), "ssim": 0.5}}, display=display,
    )  # fmt: skip
    trainer.run()
    text = out.getvalue()
    assert "training tiny 2x from step 0" in text
    assert "step 2: Set 20.500 dB / 0.5000 (best)" in text  # validation lines above the bar
    assert "step 4 · L1 " in text and "patches/s · best 21.250 dB" in text
    assert "100%" in text and "stopped at step 4" in text
    # Not a terminal (a log file under nohup) or --quiet: no live display.
    plain = Console(file=io.StringIO(), force_terminal=False)
    assert type(make_display(quiet=False, console=plain)) is TrainDisplay
    assert make_display(quiet=True, console=console).quiet


def test_car_train_and_export_commands(train_dir: Path, tmp_path: Path):
    """The `car train` / `car export` wrappers: a run, its resume, and the exported file."""
    from typer.testing import CliRunner

    from carcli.cli import app

    val = tmp_path / "val"
    val.mkdir()
    Image.fromarray(_smooth_image(np.random.default_rng(1), 24, 40)).save(val / "v.png")
    run = tmp_path / "run"
    common = ["--data", str(train_dir), "--val", str(val), "--run", str(run), "--quiet"]
    options = ["--scale", "2", "--config", "tiny", "--patch", "32", "--batch", "2"]
    first = [*options, "--steps", "3", "--val-every", "2", "--precision", "fp32"]
    invoke = CliRunner().invoke
    result = invoke(app, ["train", *common, *first])
    assert result.exit_code == 0, result.output
    again = invoke(app, ["train", *common, *first])
    assert again.exit_code == 2 and "pass --resume" in again.stderr
    # A resumed run keeps what shaped it: a different --lr is refused, before any work.
    bad = invoke(app, ["train", *common, *options, "--resume", "--steps", "5", "--lr", "0.01"])
    assert bad.exit_code == 2 and "--lr: fixed by the run being resumed" in bad.stderr
    # The same settings again, auto precision ("as saved") and a new stopping rule: fine.
    resumed = ["--resume", "--steps", "5", "--precision", "auto"]
    result = invoke(app, ["train", *common, *options, *resumed])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (run / LOG_NAME).read_text().splitlines()]
    # Every 2 steps, and where each schedule ended (3, then 5 after --resume).
    assert [r["step"] for r in log if r["event"] == "val"] == [2, 3, 4, 5]
    # The last weights: export reuses their validation at step 5.
    out = tmp_path / "x2.safetensors"
    result = invoke(app, ["export", str(run), str(out), "--which", "last", "--no-timing"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    model, meta = load_checkpoint(out)
    assert summary["steps"] == meta["steps"] == 5 and model.scale == 2
    assert meta["validation"]["val"]["psnr"] == summary["validation"]["val"]["psnr"] > 10
    assert meta["recipe"]["steps"] == 5 and meta["training_data"] == [str(train_dir)]
    # An existing output is kept unless --overwrite says otherwise.
    before = out.read_bytes()
    result = invoke(app, ["export", str(run), str(out), "--no-timing"])
    assert result.exit_code == 2 and "use --overwrite" in result.stderr  # a usage error
    assert out.read_bytes() == before
    result = invoke(app, ["export", str(run), str(out), "--no-timing", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == load_checkpoint(out)[1]["steps"]


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_trains_in_bf16_only_where_native(
    train_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool
):
    """Emulated bfloat16 is many times slower than fp32: `auto` must not pick it."""
    from typer.testing import CliRunner

    from carcli import runpolicy
    from carcli.cli import app

    monkeypatch.setattr(runpolicy, "cpu_has_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert runpolicy.training_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert runpolicy.training_precision("FP32", cpu) == "fp32"
    assert runpolicy.training_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        runpolicy.training_precision("fp16", cpu)

    run = tmp_path / "run"
    args = ["train", "--scale", "2", "--config", "tiny", "--patch", "32", "--batch", "2"]
    args += ["--data", str(train_dir), "--val", str(train_dir), "--val-every", "0"]
    args += ["--run", str(run), "--steps", "1", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    saved = torch.load(run / "state.pt", map_location="cpu", weights_only=True)["config"]
    assert saved["precision"] == ("bf16" if native else "fp32")  # the resolved one is recorded
    assert saved["channels_last"] is native  # channels-last goes with bf16 unless asked for
    bad = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "bad"), "--precision", "fp16"])
    assert bad.exit_code == 2 and "--precision" in bad.output
    bad = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "bad"), "--loss", "l2"])
    assert bad.exit_code == 2 and "--loss" in bad.output
    bad = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "bad"), "--config", "huge"])
    assert bad.exit_code == 2 and "--config" in bad.output and "compact-deep" in bad.output
    bad = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "bad"), "--luma-weight", "-1"])
    assert bad.exit_code == 2 and "--luma-weight" in bad.output
    result = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "y"), "--luma-weight", "2"])
    assert result.exit_code == 0, result.output
    saved = torch.load(tmp_path / "y" / "state.pt", map_location="cpu", weights_only=True)
    assert saved["config"]["luma_weight"] == 2.0


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--quant-grad", "round"),
        ("--soft-alpha", "1.5"),
        ("--ema", "1"),
        ("--batch", "0"),
        ("--patch", "36"),
        ("--min-lr", "0.1"),
        ("--scale", "3"),
        ("--val-every", "-1"),
        ("--tv-weight", "-0.5"),
    ],
)
def test_bad_settings_are_refused_before_any_data_is_read(
    train_dir: Path, tmp_path: Path, option: str, value: str
):
    from typer.testing import CliRunner

    from carcli.cli import app

    run = tmp_path / "run"
    args = ["train", "--scale", "2", "--config", "tiny", "--patch", "32", "--batch", "2"]
    args += ["--data", str(train_dir), "--val", str(train_dir), "--run", str(run), "--steps", "1"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--quiet", option, value])
    assert result.exit_code == 2
    assert option in result.output
    assert not run.exists()  # refused before the trainer made the run folder or read an image


def test_a_resume_with_a_bad_setting_is_refused_and_the_state_kept(train_dir: Path, tmp_path: Path):
    from typer.testing import CliRunner

    from carcli.cli import app

    run = tmp_path / "run"
    args = ["train", "--scale", "2", "--config", "tiny", "--patch", "32", "--batch", "2"]
    args += ["--data", str(train_dir), "--val", str(train_dir), "--val-every", "0"]
    args += ["--run", str(run), "--steps", "2", "--device", "cpu", "--quiet"]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = (run / "state.pt").read_bytes()
    bad = CliRunner().invoke(app, [*args, "--resume", "--steps", "3", "--threads", "0"])
    assert bad.exit_code == 2 and "--threads" in bad.output
    assert (run / "state.pt").read_bytes() == before


def test_the_trainer_itself_refuses_bad_settings(train_dir: Path, tmp_path: Path):
    from carcli.errors import ConfigError

    with pytest.raises(ConfigError, match="ema") as info:
        Trainer(_config(train_dir, ema=1.5), tmp_path / "run", torch.device("cpu"), quiet=True)
    assert info.value.option == "--ema"
    assert not (tmp_path / "run").exists()


def test_init_with_a_deeper_preset_grows_edsr(
    train_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """--init a trained pair with --config naming the same widths and more EDSR blocks: the
    pair is deepened (same outputs at first), trains, resumes and exports at the new depth."""
    from carcli.models import config as model_config

    tiny_resampler, tiny_sr = model_config.PRESETS["tiny"]
    deeper = (tiny_resampler, replace(tiny_sr, blocks=4))
    monkeypatch.setitem(model_config.PRESETS, "tiny-deep", deeper)
    base = Trainer(_config(train_dir, steps=2), tmp_path / "base", torch.device("cpu"), quiet=True)
    base.run()
    init = tmp_path / "base.safetensors"
    base.export(init)

    cfg = _config(train_dir, steps=4, init=str(init), config="tiny-deep")
    grown = Trainer(cfg, tmp_path / "grown", torch.device("cpu"), quiet=True)
    assert grown.model.config.sr.blocks == 4 and grown.ema.config.sr.blocks == 4
    x = torch.rand(1, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(grown.ema.eval()(x), base.ema.eval()(x), rtol=0, atol=0)
    grown.run(stop_at=2)
    resumed = Trainer(cfg, tmp_path / "grown", torch.device("cpu"), quiet=True)
    resumed.load_state()
    resumed.run()
    out = tmp_path / "grown.safetensors"
    resumed.export(out)
    model, meta = load_checkpoint(out)
    assert model.config.sr.blocks == 4 and model.config.name == "tiny-deep"
    assert meta["recipe"]["config"] == "tiny-deep" and meta["steps"] == 4
    assert not torch.equal(
        model.sr.body[3].body[2].weight, torch.zeros_like(model.sr.body[3].body[2].weight)
    )

    other = _config(train_dir, steps=1, init=str(init), config="compact")  # other widths: kept
    kept = Trainer(other, tmp_path / "kept", torch.device("cpu"), quiet=True)
    assert kept.model.config == base.model.config


def test_export_without_timing_keeps_the_init_measurement(
    train_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A fine-tune costs what its --init did; a deeper network does not inherit the figure."""
    from carcli.checkpoints import save_checkpoint
    from carcli.models import config as model_config
    from carcli.train.export import export_run

    base = Trainer(_config(train_dir, steps=1), tmp_path / "base", torch.device("cpu"), quiet=True)
    base.run()
    init = tmp_path / "init.safetensors"
    timing = {"image": "1632x1224", "threads": 2, "fp32": {"roundtrip_s": 4.2}}
    save_checkpoint(base.ema, init, {"cpu_timing": timing})

    tiny_resampler, tiny_sr = model_config.PRESETS["tiny"]
    deeper = (tiny_resampler, replace(tiny_sr, blocks=4))
    monkeypatch.setitem(model_config.PRESETS, "tiny-deep", deeper)
    for name, config, expected in (("same", "tiny", timing), ("deeper", "tiny-deep", None)):
        cfg = _config(train_dir, steps=1, init=str(init), config=config)
        Trainer(cfg, tmp_path / name, torch.device("cpu"), quiet=True).run()
        meta = export_run(tmp_path / name, tmp_path / f"{name}.safetensors", "last", timing=False)
        assert meta.get("cpu_timing") == expected
        assert load_checkpoint(tmp_path / f"{name}.safetensors")[1].get("cpu_timing") == expected
    init.unlink()  # the starting point is gone: nothing to keep, nothing invented
    meta = export_run(tmp_path / "same", tmp_path / "gone.safetensors", "last", timing=False)
    assert "cpu_timing" not in meta


def test_a_relative_init_is_recorded_absolute_with_its_digest(
    train_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`car train --init weights/x` then `car export` from elsewhere, after the file was replaced
    by the export (as when shipping): the record still names exactly the file it started from."""
    from typer.testing import CliRunner

    from carcli.checkpoints import file_digest, save_checkpoint
    from carcli.cli import app

    base = Trainer(_config(train_dir, steps=1), tmp_path / "base", torch.device("cpu"), quiet=True)
    base.run()
    project = tmp_path / "project"
    (project / "weights").mkdir(parents=True)
    init = project / "weights" / "init.safetensors"
    timing = {"image": "1632x1224", "threads": 2, "fp32": {"roundtrip_s": 4.2}}
    save_checkpoint(base.ema, init, {"cpu_timing": timing})
    digest = file_digest(init)

    monkeypatch.chdir(project)
    args = ["train", "--scale", "2", "--config", "tiny", "--patch", "32", "--batch", "2"]
    args += ["--data", str(train_dir), "--val", str(train_dir), "--val-every", "0"]
    args += ["--steps", "1", "--device", "cpu"]
    args += ["--init", "weights/init.safetensors", "--run", "runs/a", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    shipped = project / "weights" / "init.safetensors"  # the fine-tune replaces its starting point
    export = ["export", str(project / "runs" / "a"), str(shipped), "--which", "last"]
    result = CliRunner().invoke(app, [*export, "--no-timing", "--overwrite"])
    assert result.exit_code == 0, result.output
    _, meta = load_checkpoint(shipped)
    assert meta["recipe"]["init"] == str(init.resolve())
    assert meta["recipe"]["init_sha256"] == digest != file_digest(shipped)
    assert meta["cpu_timing"] == timing  # found from another folder; same network, same cost


def test_bf16_training_uses_the_float32_islands_of_inference(
    train_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Kernels normalised in float32, EDSR's first and last convs in float32, as in inference.

    Without them bf16 fine-tunes validated 0.03-0.05 dB below fp32 ones from the same start
    (docs/training.md).
    """
    from carcli.train import trainer as trainer_module

    cfg = _config(train_dir, precision="bf16")
    trainer = Trainer(cfg, tmp_path / "run", torch.device("cpu"), quiet=True)
    model = trainer.model
    seen = record_dtypes({"head": model.sr.head[0], "last": model.sr.tail[-1]})
    real_resample = trainer_module.resample

    def spy(hr, kernels, *rest):  # noqa: ANN001, ANN202
        seen["kernels"] = kernels.detach()
        return real_resample(hr, kernels, *rest)

    monkeypatch.setattr(trainer_module, "resample", spy)
    losses = trainer_module.training_losses(model, trainer.sampler.batch(2), cfg, trainer.device)
    losses["total"].backward()
    assert seen["head"] == (torch.float32, torch.float32)
    assert seen["last"] == (torch.float32, torch.float32)
    sums = seen["kernels"].sum(dim=1)
    assert float((sums - 1).abs().max()) < 1e-5  # bf16 normalisation: off by ~1e-3
    assert all(p.grad is not None for p in model.sr.head.parameters())


def test_resumed_config_changes_only_the_resumable_settings() -> None:
    saved = TrainConfig(scale=2, data=["d"], val=[], steps=10, lr=1e-3, precision="bf16")
    later = saved.resumed(steps=20, val_every=5, lr=1e-3, precision="auto", channels_last=None)
    assert (later.steps, later.val_every, later.lr, later.precision) == (20, 5, 1e-3, "bf16")
    with pytest.raises(UsageError, match="lr, patch: fixed by the run") as caught:
        saved.resumed(lr=2e-3, patch=64, steps=20)
    assert "--lr, --patch: fixed" in caught.value.cli_message()
