"""Forward time of SR network candidates on this CPU, as ratios against EDSR in the same run.

Usage: python bench/sr_cost.py [--scale 4] [--precision fp32|bf16] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from carcli.models import CARModel, preset
from carcli.models.config import CARConfig, SRConfig


def macs_per_hr_pixel(model: torch.nn.Module, scale: int) -> float:
    """Multiply-adds of the convs per output pixel, counted with hooks on a 32x32 LR input."""
    total = 0

    def hook(module, inputs, output):  # noqa: ANN001, ANN202
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.weight[0].numel()
            total += output.numel() * k
        elif type(module).__name__ == "RepConv3" and not module.training:
            total += output.numel() * module.cin * 9

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.rand(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return total / (32 * 32 * scale * scale)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr-side", type=int, default=0, help="LR tile side (default: 1 MP HR)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    s = args.scale
    side = args.lr_side or 1000 // s
    candidates = {"edsr16x64 (shipped)": preset("compact", s)}
    for f, n in [(64, 8), (64, 12), (64, 16), (64, 20), (48, 16), (48, 24)]:
        candidates[f"rep{n}x{f}"] = CARConfig(
            scale=s,
            resampler=preset("compact", s).resampler,
            sr=SRConfig(arch="rep", features=f, blocks=n, res_scale=1.0),
        )
    lr = torch.rand(1, 3, side, side).contiguous(memory_format=torch.channels_last)
    base = None
    print(f"scale {s}, LR {side}x{side}, {args.precision}, {args.threads} threads")
    for name, cfg in candidates.items():
        sr = CARModel(cfg).sr.eval().to(memory_format=torch.channels_last)
        params = sum(p.numel() for p in sr.parameters()) / 1e6
        macs = macs_per_hr_pixel(sr, s)
        with torch.inference_mode():
            sr.forward_mixed(lr, args.precision)
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                sr.forward_mixed(lr, args.precision)
                times.append(time.perf_counter() - t0)
        t = min(times)
        base = base or t
        print(f"{name:22s} {params:5.2f}M  {macs / 1e3:6.1f}k MAC/px  {t:6.3f} s  {t / base:5.2f}x")


if __name__ == "__main__":
    main()
