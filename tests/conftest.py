"""Shared fixtures: tiny random checkpoints, synthetic photos, the optional data sets."""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
SEED_ENV = "CARCLI_TEST_SEED"


@pytest.fixture
def seed() -> int:
    """A fresh seed for torch, numpy and random, printed so a failure can be replayed.

    pytest shows the printed line with a failing test; ``CARCLI_TEST_SEED=N``
    reruns with that seed.
    """
    value = int(os.environ.get(SEED_ENV) or secrets.randbelow(2**31))
    print(f"seed {value} (replay: {SEED_ENV}={value})")
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)
    return value


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that read the shared data sets carry the ``datasets`` marker."""
    for item in items:
        if "datasets_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.datasets)


def photo(height: int, width: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A smooth random HxWxC uint8 image: gradients and blobs, more photo-like than noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    planes = []
    for _ in range(channels):
        fx, fy, phase = rng.uniform(0.02, 0.3, 2).tolist() + [rng.uniform(0, 6.28)]
        plane = (
            0.5
            + 0.3 * np.sin(fx * xx + phase) * np.cos(fy * yy)
            + 0.1 * rng.random((height, width))
        )
        planes.append(plane)
    return np.clip(np.stack(planes, axis=-1) * 255, 0, 255).round().astype(np.uint8)


def assert_one_error(result, code: int, *needles: str) -> str:  # noqa: ANN001
    """Exactly one ``error:`` line, no traceback, the exit code; returns the line."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def record_dtypes(modules: dict[str, torch.nn.Module]) -> dict[str, tuple]:
    """Input and output dtypes of each module's latest call, filled in as they run."""
    seen: dict[str, tuple] = {}

    def hook(name: str) -> Callable:
        def record(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            seen[name] = (args[0].dtype, out.dtype)

        return record

    for name, module in modules.items():
        module.register_forward_hook(hook(name))
    return seen


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with randomly initialised tiny checkpoints ``car_x2`` and ``car_x4``."""
    from carcli.checkpoints import save_checkpoint, shipped_name
    from carcli.models import CARModel, preset

    folder = tmp_path_factory.mktemp("weights")
    for scale in (2, 4):
        torch.manual_seed(scale)
        model = CARModel(preset("tiny", scale))
        save_checkpoint(model, folder / shipped_name(scale), {"note": "random test weights"})
    return folder


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_weights: Path) -> Callable[[int], Path]:
    """Path of the tiny random checkpoint for a scale."""
    return lambda scale=4: tiny_weights / f"car_x{scale}.safetensors"


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt: Callable[[int], Path]) -> Callable[[int], torch.nn.Module]:
    """The tiny random model for a scale, loaded from its checkpoint (CPU, eval)."""
    from carcli.checkpoints import load_model

    cache: dict[int, torch.nn.Module] = {}

    def get(scale: int = 4) -> torch.nn.Module:
        if scale not in cache:
            cache[scale] = load_model(tiny_ckpt(scale), scale)[0]
        return cache[scale]

    return get


@pytest.fixture
def no_installed_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the shipped-weights lookup at an empty folder."""
    empty = tmp_path / "no-weights"
    empty.mkdir()
    monkeypatch.setenv("CARCLI_WEIGHTS", str(empty))
    return empty


@pytest.fixture
def datasets_dir() -> Path:
    """``../shared/datasets`` next to the repository, or skip."""
    if not (DATASETS / "val").is_dir():
        pytest.skip(f"data sets not found at {DATASETS} (they live outside the repository)")
    return DATASETS


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=None,
        help="tests/test_fuzz.py: run N random examples (default: a short fixed set); "
        "the CARCLI_FUZZ_EXAMPLES variable does the same",
    )
