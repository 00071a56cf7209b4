"""Throughput of car downscale / upscale / roundtrip on a folder, next to PIL bicubic.

    python bench/throughput.py FOLDER                     # 2x and 4x, installed weights
    python bench/throughput.py FOLDER -s 4 --weights car_x4.safetensors --json out.json
    python bench/throughput.py --make-folder DIR --count 50 --size 1680x1260   # ~2 MP photos
    python bench/throughput.py --make-photo big.png --size 6000x4000           # one 24 MP photo
    python bench/throughput.py --psnr ../shared/datasets/val/Set5 -s 4 --weights W  # fp32 vs bf16
    python bench/throughput.py FOLDER --against fast     # installed pair vs a v2 preset or file,
                                                          # side by side in one run
    python bench/throughput.py FOLDER --against FILE --rounds 5 --pipelines roundtrip
                                                          # 5 alternating rounds, median ratio

For each scale it measures, on the same images in the same run:

* PIL's bicubic resize down and up (the reference point: what a plain resize costs);
* compute alone: the Processor's downscale (resampler network + resampling op)
  and upscale (the SR network) on already-decoded images, nothing written;
* the three commands' pipelines as ``car`` runs them (``run_batch``: decode,
  compute, encode, write; roundtrip also measures PSNR/SSIM and the bicubic
  baseline), with their wall time divided by the compute-alone time: 1.00 means
  file I/O is completely hidden behind the networks;

and prints megapixels per second (of the HR image) for each, plus the peak
resident memory of the process. Without installed weights and without
``--weights`` it uses a randomly initialised model of the shipped "compact"
preset and says so: speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from carcli.batch import make_items, run_batch
from carcli.checkpoints import NoWeightsInstalled, load_model
from carcli.console import ConsoleReporter
from carcli.engine import Processor, build_processor
from carcli.imageio import find_images, read_image
from carcli.metrics import measure
from carcli.models import CARModel, preset
from carcli.models.config import preset_names
from carcli.models.quantize import quantize_bits
from carcli.paths import collect_inputs
from carcli.runpolicy import RunPolicy, resolve_device
from carcli.tasks import DownscaleTask, RoundtripTask, UpscaleTask

SAMPLES = Path(__file__).resolve().parents[1] / "carcli" / "samples"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def policy_of(args: argparse.Namespace, **changes: Any) -> RunPolicy:
    """The run policy these options ask for (the options mean what ``car``'s do)."""
    policy = RunPolicy(
        args.device,
        args.precision,
        args.tile,
        "auto" if args.threads is None else args.threads,
        channels_last=not args.no_channels_last,
    )
    return replace(policy, **changes)


def make_processor(
    scale: int, weights: Path | None, args: argparse.Namespace
) -> tuple[Processor, str]:
    """The processor ``car`` would build, and a line saying which weights it has."""
    policy = policy_of(args)
    device = resolve_device(policy.device)
    if weights is not None and not weights.exists() and str(weights) in preset_names():
        torch.manual_seed(scale)
        model = CARModel(preset(str(weights), scale)).eval()
        return build_processor(model, policy), f"random {weights} preset"
    try:
        model, meta = load_model(weights, scale, device)
        what = f"{weights or 'installed weights'} ({model.config.name})"
    except NoWeightsInstalled:
        torch.manual_seed(scale)
        model = CARModel(preset("compact", scale)).eval()
        what = "random compact preset"
        print(
            f"note: no weights installed for {scale}x and no --weights given: timing a randomly "
            "initialised model of the shipped 'compact' preset (speed does not depend on the "
            "weight values)",
            file=sys.stderr,
        )
    return build_processor(model, policy), what


class Timed:
    """Adds up the time in the processor's two methods and in the two networks' forwards.

    ``seconds`` has the processor's ``downscale`` (resampler network, resampling
    op, tiling) and ``upscale`` (SR network, tiling); ``networks`` the forward passes
    of the resampler network and of the SR network's parts alone.
    """

    def __init__(self, processor: Processor) -> None:
        self.processor = processor
        self.seconds = {"downscale": 0.0, "upscale": 0.0}
        self.networks = 0.0
        self._orig = {name: getattr(processor, name) for name in self.seconds}
        self._hooks: list[Any] = []
        self._started = 0.0

    def __enter__(self) -> Timed:
        for name, fn in self._orig.items():
            setattr(self.processor, name, self._wrap(name, fn))
        model = self.processor.model
        # The SR network's top-level parts, whatever the architecture (they run one at a time).
        for module in (model.resampler, *model.sr.children()):
            self._hooks.append(module.register_forward_pre_hook(self._start))
            self._hooks.append(module.register_forward_hook(self._stop))
        return self

    def _start(self, *_: Any) -> None:
        sync(self.processor.device)
        self._started = time.perf_counter()

    def _stop(self, *_: Any) -> None:
        sync(self.processor.device)
        self.networks += time.perf_counter() - self._started

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def run(*args: Any, **kwargs: Any) -> Any:
            sync(self.processor.device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.processor.device)
            self.seconds[name] += time.perf_counter() - start
            return out

        return run

    def __exit__(self, *exc: object) -> None:
        for name in self._orig:
            delattr(self.processor, name)  # back to the class's methods
        for hook in self._hooks:
            hook.remove()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pil_bicubic(files: list[Path], scale: int) -> tuple[float, float]:
    """Seconds for PIL's bicubic down and up over the files (decoded outside the timing)."""
    down = up = 0.0
    for path in files:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.load()
        w, h = im.size
        start = time.perf_counter()
        small = im.resize((math.ceil(w / scale), math.ceil(h / scale)), Image.Resampling.BICUBIC)
        down += time.perf_counter() - start
        start = time.perf_counter()
        small.resize((w, h), Image.Resampling.BICUBIC)
        up += time.perf_counter() - start
    return down, up


def compute_alone(processor: Processor, files: list[Path]) -> tuple[float, float, float]:
    """Seconds of the processor's downscale and upscale (images decoded beforehand),
    and of the network forward passes inside them."""
    with torch.inference_mode():  # warm-up: oneDNN/cuDNN pick their kernels on first use
        processor.upscale(processor.downscale(torch.rand(3, 64, 64)))
    with Timed(processor) as timed:
        for path in files:
            picture = read_image(path)
            lr = processor.downscale(picture.rgb)
            processor.upscale(lr, size=(picture.height, picture.width))
            del picture, lr
    return timed.seconds["downscale"], timed.seconds["upscale"], timed.networks


def pipelines(
    processor: Processor, folder: Path, work: Path, names: list[str]
) -> dict[str, dict[str, float]]:
    """Wall time of the commands' pipelines and the compute time inside them."""
    reporter = ConsoleReporter(quiet=True)
    lr_dir, sr_dir = work / "lr", work / "sr"
    tasks = {
        "downscale": (DownscaleTask(processor, lr_dir, overwrite=True), folder),
        "upscale": (UpscaleTask(processor, sr_dir, overwrite=True), lr_dir),
        "roundtrip": (RoundtripTask(processor), folder),
    }
    out = {}
    for name, (task, source) in tasks.items():
        if name not in names:
            continue
        items = make_items(task, collect_inputs(source))
        with Timed(processor) as timed:
            start = time.perf_counter()
            outcomes = run_batch(task, items, reporter)
            wall = time.perf_counter() - start
        failed = [o for o in outcomes if o.status != "ok"]
        if failed:
            raise SystemExit(f"{name}: {len(failed)} image(s) failed: {failed[0].error}")
        out[name] = {"wall": wall, "compute": sum(timed.seconds.values())}
    return out


def run_scale(scale: int, files: list[Path], folder: Path, args: argparse.Namespace) -> dict:
    processor, what = make_processor(scale, args.weights, args)
    mp = sum(Image.open(f).size[0] * Image.open(f).size[1] for f in files) / 1e6
    pil_down, pil_up = pil_bicubic(files, scale)
    down, up, nets = compute_alone(processor, files)
    with tempfile.TemporaryDirectory(prefix="carcli-bench-") as tmp:
        names = args.pipelines
        if "upscale" in names and "downscale" not in names:
            names = ["downscale", *names]  # upscale reads what downscale wrote
        pipe = pipelines(processor, folder, Path(tmp), names)
    compute = {"downscale": down, "upscale": up, "roundtrip": down + up}
    rows = [
        ("PIL bicubic down", pil_down, None),
        ("PIL bicubic up", pil_up, None),
        ("PIL bicubic roundtrip", pil_down + pil_up, None),
        ("compute downscale (resampler + op)", down, None),
        ("compute upscale (SR network)", up, None),
        ("compute roundtrip", down + up, None),
        ("  of which network forward passes", nets, None),
    ]
    for name in pipe:
        label = f"car {name} pipeline" + (" (+ metrics)" if name == "roundtrip" else "")
        rows.append((label, pipe[name]["wall"], pipe[name]["wall"] / compute[name]))
    print(
        f"\n{scale}x: {len(files)} images, {mp:.1f} MP, {processor.device}, "
        f"precision {processor.precision}, tiles {args.tile or 'auto'}, "
        f"{torch.get_num_threads()} threads, weights: {what}"
    )
    print(f"  {'':38s} {'seconds':>9s} {'MP/s':>8s} {'wall/compute':>13s}")
    for label, seconds, ratio in rows:
        r = f"{ratio:13.3f}" if ratio is not None else ""
        print(f"  {label:38s} {seconds:9.2f} {mp / seconds:8.3f} {r}")
    for name in pipe:
        inside = pipe[name]["compute"]
        print(
            f"  {name} pipeline: compute inside it {inside:.2f} s, "
            f"exposed overhead {pipe[name]['wall'] - inside:.2f} s"
        )
    return {
        "scale": scale,
        "images": len(files),
        "megapixels": mp,
        "device": str(processor.device),
        "precision": processor.precision,
        "threads": torch.get_num_threads(),
        "weights": what,
        "seconds": {label: seconds for label, seconds, _ in rows},
        "pipelines": pipe,
        "compute": compute,
    }


# ------------------------------------------------------------------ test data


def synthetic_photo(height: int, width: int, seed: int) -> Image.Image:
    """A photo-like image of any size: bundled samples enlarged and laid out in rows.

    Each row has its own height (1.5x-3x a sample's, like a camera's soft
    detail at high resolution); the samples in it are enlarged with Lanczos to
    that height, some mirrored, and placed edge to edge, so edges and textures
    run across the whole frame. A little noise stands in for sensor grain.
    """
    rng = np.random.default_rng(seed)
    sources = []
    for path in sorted(SAMPLES.glob("*.png")):
        with Image.open(path) as im:
            sources.append(im.convert("RGB"))
    canvas = Image.new("RGB", (width, height))
    y = 0
    while y < height:
        row_h = int(rng.uniform(1.5, 3.0) * 384)
        x = 0
        while x < width:
            src = sources[rng.integers(len(sources))]
            size = (round(src.width * row_h / src.height), row_h)
            tile = src.resize(size, Image.Resampling.LANCZOS)
            if rng.random() < 0.5:
                tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            canvas.paste(tile, (x, y))
            x += tile.width
        y += row_h
    array = np.asarray(canvas, dtype=np.int16)
    array = array + rng.integers(-2, 3, array.shape, dtype=np.int16)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def parse_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def psnr_check(folder: Path, scale: int, args: argparse.Namespace) -> None:
    """Y-PSNR of the round trip at each precision this device supports, against fp32."""
    device = resolve_device(args.device)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    pictures = [read_image(p) for p in find_images(folder)]
    results = {}
    for precision in precisions:
        model, _ = load_model(args.weights, scale, device)
        # fp32 as the reference, in the weights' own memory format
        policy = policy_of(args, precision=precision, channels_last=precision != "fp32")
        processor = build_processor(model, policy)
        values, start = [], time.perf_counter()
        for picture in pictures:
            lr = processor.downscale(picture.rgb)
            rec = quantize_bits(processor.upscale(lr, (picture.height, picture.width)), 8)
            values.append(measure(rec, picture.rgb, scale)[0])
        results[precision] = (statistics.fmean(values), time.perf_counter() - start)
    base = results["fp32"][0]
    for precision, (psnr, seconds) in results.items():
        print(
            f"{folder.name} {scale}x {precision}: {psnr:.4f} dB "
            f"({psnr - base:+.4f} vs fp32), {seconds:.1f} s"
        )


def side_by_side(files: list[Path], folder: Path, args: argparse.Namespace) -> list[dict]:
    """Both checkpoints on the same images in the same run, ``--rounds`` times in the order
    ABBA..., then the ratio (second / first) of each pipeline: per round, median and range."""
    first, second = args.weights, args.against
    report: list[dict] = []
    ratios: dict[tuple[int, str], list[float]] = {}
    for round_ in range(args.rounds):
        for scale in args.scale:
            order = [first, second] if round_ % 2 == 0 else [second, first]
            timed = {}
            for weights in order:
                args.weights = weights
                timed[weights is second] = run_scale(scale, files, folder, args)
            args.weights = first
            a, b = timed[False], timed[True]
            report += [a, b]
            for name in a["pipelines"]:
                ta, tb = a["pipelines"][name]["wall"], b["pipelines"][name]["wall"]
                ratios.setdefault((scale, name), []).append(tb / ta)
                print(
                    f"  round {round_ + 1}, {scale}x car {name}: {a['weights']} {ta:.2f} s, "
                    f"{b['weights']} {tb:.2f} s, ratio {tb / ta:.3f}"
                )
    print(f"\nside by side over {args.rounds} round(s) (ratio = second / first):")
    for (scale, name), values in ratios.items():
        spread = f" (range {min(values):.3f} to {max(values):.3f})" if len(values) > 1 else ""
        print(f"  {scale}x car {name}: median ratio {statistics.median(values):.3f}{spread}")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="folder of images to time")
    parser.add_argument("-s", "--scale", type=int, nargs="+", default=[2, 4], choices=[2, 4])
    parser.add_argument("-w", "--weights", type=Path, help="checkpoint (default: installed)")
    parser.add_argument("-d", "--device", default="auto")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--tile", type=int, help="tile side in output pixels (default: auto)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--limit", type=int, help="use only the first N images")
    parser.add_argument(
        "--pipelines",
        type=lambda t: t.split(","),
        default=["downscale", "upscale", "roundtrip"],
        help="which command pipelines to time (comma-separated; default all three)",
    )
    parser.add_argument(
        "--against",
        type=Path,
        help="a second checkpoint, or a preset name (random weights: speed only), timed after "
        "the first on the same images; prints the ratios",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --against: time both this many times, alternating which goes first, and "
        "print the median ratio (a busy machine's drift cancels out)",
    )
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--make-folder", type=Path, help="write --count synthetic photos here")
    parser.add_argument("--make-photo", type=Path, help="write one synthetic photo here")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--size", type=parse_size, default=(1680, 1260), help="WxH")
    parser.add_argument("--psnr", type=Path, help="data set folder: PSNR per precision")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    policy_of(args).apply_threads(torch.device("cpu"))  # as car does

    if args.make_folder or args.make_photo:
        w, h = args.size
        if args.make_photo:
            synthetic_photo(h, w, seed=0).save(args.make_photo)
        if args.make_folder:
            args.make_folder.mkdir(parents=True, exist_ok=True)
            for i in range(args.count):
                synthetic_photo(h, w, seed=i).save(args.make_folder / f"photo_{i:03d}.png")
        return
    if args.psnr:
        for scale in args.scale:
            psnr_check(args.psnr, scale, args)
        return
    if args.folder is None:
        parser.error("give FOLDER (or --make-folder / --make-photo / --psnr)")
    files = find_images(args.folder)[: args.limit]
    if not files:
        parser.error(f"no images in {args.folder}")
    folder = args.folder
    if args.limit:  # the pipelines read a folder: link the chosen files into a temporary one
        folder = Path(tempfile.mkdtemp(prefix="carcli-bench-in-"))
        for f in files:
            (folder / f.name).symlink_to(f.resolve())
        files = find_images(folder)
    if args.against is None:
        report = [run_scale(scale, files, folder, args) for scale in args.scale]
    else:
        report = side_by_side(files, folder, args)
    rss = peak_rss_bytes()
    print(f"\npeak resident memory: {rss / 2**30:.2f} GiB")
    if args.json:
        args.json.write_text(json.dumps({"runs": report, "peak_rss_bytes": rss}, indent=2))


if __name__ == "__main__":
    main()
