"""Training speed (patches/s) of the shipped models under each precision and memory format.

    python bench/train_step.py                       # 4x, 192-px patches, batch 4
    python bench/train_step.py -s 2 --patch 96 --batch 16 --seconds 120

Each setting runs real `car train` steps (forward, losses, backward, Adam, EMA)
from the shipped weights on the training images for ``--seconds`` after one
warm-up step; the first setting is the baseline of the printed ratios. Settings
are interleaved ``--rounds`` times so a drift of the machine's speed hits all
of them alike. bf16 is only worth it where the CPU has AVX512-BF16 or AMX;
elsewhere it is emulated, which is what `car train --precision auto` avoids.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from carcli.checkpoints import shipped_name, weights_dir
from carcli.runpolicy import cpu_has_bf16
from carcli.train.trainer import TrainConfig, Trainer

SETTINGS = {
    "auto": ("auto", None),  # what `car train` and TrainConfig pick on this CPU
    "fp32": ("fp32", False),
    "fp32-cl": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16-cl": ("bf16", True),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-s", "--scale", type=int, choices=(2, 4), default=4)
    ap.add_argument("--data", default="../shared/datasets/train")
    ap.add_argument("--patch", type=int, default=192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--seconds", type=float, default=60.0, help="per setting and round")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--settings", default="fp32,fp32-cl,bf16,bf16-cl", help=", ".join(SETTINGS))
    args = ap.parse_args()

    names = args.settings.split(",")
    init = weights_dir() / shipped_name(args.scale)
    print(f"{args.scale}x, {args.batch} x {args.patch}-px patches, {args.threads} threads, "
          f"native bf16: {cpu_has_bf16()}")  # fmt: skip
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            precision, channels_last = SETTINGS[name]
            cfg = TrainConfig(
                scale=args.scale, data=[args.data], val=[], config="from-init", init=str(init),
                steps=10**9, batch=args.batch, patch=args.patch, precision=precision,
                channels_last=channels_last, threads=args.threads, val_every=0,
                log_every=10**9, seed=1,
            )  # fmt: skip
            trainers[name] = Trainer(cfg, Path(tmp) / name, torch.device("cpu"), quiet=True)
            trainers[name].train_step()  # warm-up
        patches = dict.fromkeys(names, 0)
        seconds = dict.fromkeys(names, 0.0)
        for _ in range(args.rounds):
            for name in names:
                start = time.perf_counter()
                while time.perf_counter() - start < args.seconds:
                    trainers[name].train_step()
                    patches[name] += args.batch
                seconds[name] += time.perf_counter() - start
    base = patches[names[0]] / seconds[names[0]]
    for name in names:
        rate = patches[name] / seconds[name]
        print(f"  {name:8s} {rate:6.2f} patches/s   x{rate / base:.2f} vs {names[0]}")


if __name__ == "__main__":
    main()
