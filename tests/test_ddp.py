"""`car train` under torchrun with 2 CPU ranks (gloo): DDP's step equals the doubled batch.

The ranks run in subprocesses started by ``python -m torch.distributed.run``;
this file is also their script (``python tests/test_ddp.py step OUT DATA``).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow  # torchrun and several processes

REPO = Path(__file__).resolve().parents[1]
SEED = 3  # the model's initialisation and the patches; printed by the failing assert
BATCH = 2  # per rank


def _config(data: Path, batch: int):  # noqa: ANN202
    from carcli.train.trainer import TrainConfig

    return TrainConfig(
        scale=4, data=[str(data)], val=[], config="tiny", steps=1, batch=batch, patch=32,
        lr=2e-3, warmup=0, precision="fp32", channels_last=False, ema=0.9, val_every=0,
        threads=1, seed=SEED,
    )  # fmt: skip


def _patches() -> torch.Tensor:
    """2 * BATCH fixed patches, the same in every process."""
    g = torch.Generator().manual_seed(SEED)
    return torch.rand(2 * BATCH, 3, 32, 32, generator=g)


def _trainer_after_step(run: Path, data: Path, batch: int, rank: int = 0, ranks=None):  # noqa: ANN001, ANN202
    """A Trainer after one step of ``batch`` patches: this rank's slice of :func:`_patches`."""
    from carcli.train.trainer import Trainer

    trainer = Trainer(_config(data, batch), run, torch.device("cpu"), quiet=True, ranks=ranks)
    patches = _patches()[rank * batch : (rank + 1) * batch]
    trainer.next_batch = lambda n: patches[:n]
    trainer.train_step()
    return trainer


def _step(run: Path, data: Path, batch: int, rank: int = 0, ranks=None) -> dict:  # noqa: ANN001
    """The weights after one training step of ``batch`` patches."""
    trainer = _trainer_after_step(run, data, batch, rank, ranks)
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _live_ddp() -> int:
    from torch.nn.parallel import DistributedDataParallel

    return sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())


def _rank_main(out: Path, data: Path) -> None:
    """Under torchrun: one DDP step of BATCH patches per rank; rank 0 saves the weights.

    It also counts the DDP wrappers still alive after leaving the group as `car train`
    does (close, teardown): one left to the interpreter's exit can abort the rank.
    """
    from carcli.train import ddp

    ranks, _ = ddp.setup(torch.device("cpu"))
    trainer = _trainer_after_step(out.parent / f"run{ranks.rank}", data, BATCH, ranks.rank, ranks)
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.close()
    ddp.teardown()
    state["live_ddp"] = torch.tensor(_live_ddp())
    if ranks.main:
        torch.save(state, out)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    rng = np.random.default_rng(SEED)
    for i in range(3):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def _torchrun(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_ranks_of_batch_b_step_as_one_rank_of_2b(data: Path, tmp_path: Path) -> None:
    _torchrun(__file__, "step", tmp_path / "ddp.pt", data)
    ddp_state = torch.load(tmp_path / "ddp.pt", weights_only=True)
    # "terminate called without an active exception" (CI, once): a DDP wrapper kept alive
    # by the trainer's reference cycle until the interpreter's exit, when its C++ side can
    # no longer take the GIL. Leaving the group must free it.
    assert ddp_state.pop("live_ddp").item() == 0
    torch.set_num_threads(1)
    one = _step(tmp_path / "one", data, 2 * BATCH)  # one process, both ranks' patches
    half = _step(tmp_path / "half", data, BATCH)  # one process, rank 0's patches only
    from carcli.models import CARModel, preset

    torch.manual_seed(SEED)  # the Trainer's initialisation: the weights before the step
    model = CARModel(preset("tiny", 4))
    model.resampler.init_as_bicubic()
    init = model.state_dict()
    worst = max((ddp_state[k] - one[k]).abs().max().item() for k in one)
    moved = max((init[k] - one[k]).abs().max().item() for k in one)
    apart = max((half[k] - one[k]).abs().max().item() for k in one)
    print(f"seed {SEED}: DDP vs batch 2b {worst:.2e}, step size {moved:.2e}, b vs 2b {apart:.2e}")
    assert worst <= 1e-6, f"seed {SEED}: 2 ranks differ from batch 2b by {worst}"
    assert moved > 1e-4 and apart > 1e-5  # the step did something, and the halves matter


def test_car_train_under_torchrun_resumes_on_one_rank(data: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from carcli.cli import app
    from carcli.train.trainer import LOG_NAME, STATE_NAME

    run = tmp_path / "run"
    train = ["train", "--data", data, "--val", data, "--run", run, "--config", "tiny"]
    train += ["--scale", "4", "--batch", "2", "--patch", "32", "--precision", "fp32"]
    train += ["--val-every", "2", "--log-every", "1", "--threads", "1", "-q"]
    _torchrun("-m", "carcli", "--", *train, "--steps", "3")  # "--": --run is not torchrun's
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["best.safetensors", LOG_NAME, STATE_NAME]
    )  # one state, no temp files; best.safetensors from rank 0's validation
    state = torch.load(run / STATE_NAME, weights_only=True)
    assert state["step"] == 3 and state["ranks"] == 2 and len(state["samplers"]) == 2
    streams = [s["generator"] for s in state["samplers"]]
    assert not torch.equal(*streams)  # each rank drew its own patches
    log = [json.loads(line) for line in (run / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2, 3]  # rank 0 alone logs
    assert [r["step"] for r in log if r["event"] == "val"] == [2, 3]

    # Resume the 2-rank run in one process (another number of ranks) and finish it.
    result = CliRunner().invoke(app, [*map(str, train), "--resume", "--steps", "5"])
    assert result.exit_code == 0, result.output
    state = torch.load(run / STATE_NAME, weights_only=True)
    assert state["step"] == 5 and state["ranks"] == 1
    log = [json.loads(line) for line in (run / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2, 3, 4, 5]


if __name__ == "__main__" and sys.argv[1:2] == ["step"]:
    sys.path.insert(0, str(REPO))
    _rank_main(Path(sys.argv[2]), Path(sys.argv[3]))
