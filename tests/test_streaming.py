"""The streaming batch runner: order, exactly-once writes, no temp files, overlap, bounds."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image

from carcli import imageio
from carcli.batch import Item, Outcome, Result, Summary, Task, make_items, run_batch
from carcli.engine import Processor
from carcli.imageio import Picture, is_temp_file
from carcli.metrics import measure
from carcli.paths import collect_inputs
from carcli.pictures import roundtrip_picture
from carcli.streaming import OrderedWorker, Prefetcher
from carcli.tasks import DownscaleTask, RoundtripTask


class Recorder:
    """A Reporter that remembers every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.summary: Summary | None = None

    def start(self, total: int, label: str) -> None:
        self.calls.append(("start", total))

    def advance(self, outcome: Outcome) -> None:
        self.calls.append(("advance", (outcome.item.rel, outcome.status)))

    def error(self, rel: str, reason: str) -> None:
        self.calls.append(("error", rel))

    def warn(self, rel: str, message: str) -> None:
        self.calls.append(("warn", rel))

    def note(self, message: str) -> None:
        self.calls.append(("note", message))

    def finish(self, summary: Summary) -> None:
        self.summary = summary

    def advanced(self) -> list[tuple[str, str]]:
        return [value for kind, value in self.calls if kind == "advance"]


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temp_file(p)]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Eight small images; the third is not an image at all."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        Image.fromarray(photo(20 + i, 23, seed=i)).save(src / f"{i}.png")
    (src / "2.png").write_bytes(b"not a png")
    return src


def test_order_exactly_once_and_no_temp_files_when_images_fail(
    tiny_model, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failures while decoding (2), computing (4) and writing (5) leave the rest intact."""
    out = tmp_path / "out"
    writes: dict[Path, int] = {}
    real_write, real_replace = imageio.atomic_write_bytes, imageio.os.replace

    def counting_write(path: Path, data: bytes) -> None:
        writes[Path(path)] = writes.get(Path(path), 0) + 1
        real_write(path, data)

    def failing_replace(src: str, dst: str) -> None:  # the disk fails half-way through 5.png
        if Path(dst).name == "5.png":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    task = DownscaleTask(Processor(tiny_model(4)), out)
    real_compute = task.compute

    def compute(item: Item, picture: Picture, lr: torch.Tensor | None = None) -> Result:
        if item.rel == "4.png":
            raise RuntimeError("simulated failure inside the networks")
        return real_compute(item, picture, lr)

    monkeypatch.setattr(imageio, "atomic_write_bytes", counting_write)
    monkeypatch.setattr(imageio.os, "replace", failing_replace)
    monkeypatch.setattr(task, "compute", compute)
    items = make_items(task, collect_inputs(folder))
    reporter = Recorder()
    outcomes = run_batch(task, items, reporter)

    names = [f"{i}.png" for i in range(8)]
    failed = {"2.png", "4.png", "5.png"}
    assert [o.item.rel for o in outcomes] == names
    assert reporter.advanced() == [(n, "failed" if n in failed else "ok") for n in names]
    # Each error line comes right before its item's progress step.
    errors = [i for i, (kind, _) in enumerate(reporter.calls) if kind == "error"]
    assert [reporter.calls[i + 1][1][0] for i in errors] == ["2.png", "4.png", "5.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(set(names) - failed)
    assert {p.name: n for p, n in writes.items()} == {
        n: 1 for n in names if n not in {"2.png", "4.png"}
    }
    assert temp_files(tmp_path) == []
    assert "No space left" in outcomes[5].error and "simulated" in outcomes[4].error
    assert reporter.summary is not None and reporter.summary.ok == 5

    # Resuming writes only what is missing, once more each.
    monkeypatch.setattr(imageio.os, "replace", real_replace)
    monkeypatch.setattr(task, "compute", real_compute)
    writes.clear()
    outcomes = run_batch(task, make_items(task, collect_inputs(folder)), Recorder())
    assert {p.name for p in writes} == {"4.png", "5.png"} and set(writes.values()) == {1}
    assert [o.status for o in outcomes].count("skipped") == 5


def test_interrupt_while_computing_keeps_only_complete_files(
    tiny_model, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    task = DownscaleTask(Processor(tiny_model(2)), out)
    real_compute = task.compute

    def compute(item: Item, picture: Picture, lr: torch.Tensor | None = None) -> Result:
        if item.rel == "6.png":
            raise KeyboardInterrupt
        return real_compute(item, picture, lr)

    monkeypatch.setattr(task, "compute", compute)
    reporter = Recorder()
    with pytest.raises(KeyboardInterrupt):
        run_batch(task, make_items(task, collect_inputs(folder)), reporter)
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    reported_ok = sorted(rel for rel, status in reporter.advanced() if status == "ok")
    assert written == reported_ok and "6.png" not in written and "7.png" not in written
    for name in written:  # complete, decodable files only
        assert Image.open(out / name).size[0] == 12
    assert temp_files(tmp_path) == []
    assert reporter.summary is not None  # the progress bar was stopped and summarised


class FakeProcessor:
    """Stands in for Processor: batching limit and notes, no networks."""

    scale = 2

    def __init__(self, batch: int = 1) -> None:
        self.batch = batch

    def max_batch(self, height: int, width: int) -> int:
        return self.batch

    def take_notes(self) -> list[str]:
        return []


class SleepyTask(Task):
    """Loads, computes and saves by sleeping, to time the overlap of the stages."""

    def __init__(self, delay: float = 0.0, batch: int = 1) -> None:
        super().__init__(FakeProcessor(batch))  # type: ignore[arg-type]
        self.delay = delay
        self.groups: list[list[str]] = []
        self.saved: list[str] = []
        self.sizes: dict[str, int] = {}

    def load(self, item: Item) -> Picture:
        time.sleep(self.delay)
        if item.rel.startswith("bad"):
            raise imageio.ImageReadError("corrupt image: simulated")
        side = self.sizes.get(item.rel, 4)
        return Picture(rgb=torch.zeros(3, side, side))

    def batch_key(self, item: Item, picture: Picture) -> tuple[int, int]:
        return (picture.height, picture.width)

    def compute_many(self, items, pictures) -> list[Result | Exception]:
        self.groups.append([i.rel for i in items])
        time.sleep(self.delay * len(items))
        return [Result({}, {"file": i.rel}) for i in items]

    def save(self, item: Item, result: Result) -> None:
        time.sleep(self.delay)
        self.saved.append(item.rel)


def items_named(names: list[str]) -> list[Item]:
    return [Item(src=Path(n), rel=n) for n in names]


def test_decode_and_encode_overlap_compute() -> None:
    """Three stages of equal duration take about one stage's time per item, not three."""
    task, n, delay = SleepyTask(delay=0.04), 15, 0.04
    start = time.perf_counter()
    outcomes = run_batch(task, items_named([f"{i}.png" for i in range(n)]), Recorder())
    wall = time.perf_counter() - start
    assert [o.status for o in outcomes] == ["ok"] * n
    assert task.saved == [f"{i}.png" for i in range(n)]
    assert wall < 0.6 * (3 * n * delay), f"{wall:.2f} s: stages did not overlap"


def test_equal_sizes_are_batched_in_order() -> None:
    task = SleepyTask(batch=3)
    names = ["a0", "a1", "a2", "a3", "b0", "a4", "bad", "a5", "a6"]
    task.sizes = {"b0": 6}
    reporter = Recorder()
    outcomes = run_batch(task, items_named(names), reporter)
    assert task.groups == [["a0", "a1", "a2"], ["a3"], ["b0"], ["a4"], ["a5", "a6"]]
    assert [o.item.rel for o in outcomes] == names
    assert reporter.advanced()[6] == ("bad", "failed")
    assert task.saved == [n for n in names if n != "bad"]


def test_prefetcher_is_bounded_by_count_and_weight() -> None:
    loaded: list[int] = []
    lock = threading.Lock()

    def load(i: int) -> int:
        with lock:
            loaded.append(i)
        return i

    for max_items, weight, bound in [(3, 0.0, 3), (100, 10.0, 2)]:
        loaded.clear()
        fetch = Prefetcher(
            range(40), load, weight=lambda _, w=weight: w, max_items=max_items, max_weight=25.0
        )
        ahead = []
        for consumed, (item, value) in enumerate(fetch):
            assert item == value == consumed  # in order
            time.sleep(0.002)
            with lock:
                ahead.append(len(loaded) - consumed - 1)
        fetch.close()
        # Buffered items plus the one being loaded.
        assert max(ahead) <= bound + 1 and len(loaded) == 40


def test_ordered_worker_hands_back_results_then_the_failure() -> None:
    def work(i: int) -> int:
        if i == 3:
            raise KeyboardInterrupt
        return i * i

    worker = OrderedWorker(work, max_items=2)
    for i in range(3):
        worker.submit(i)
    done: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        worker.submit(3)
        while True:  # however the threads are scheduled: results first, then the failure
            done += worker.finished()
            time.sleep(0.005)
    assert done == [0, 1, 4]
    worker.cancel()
    worker2 = OrderedWorker(lambda i: i + 1)
    for i in range(5):
        worker2.submit(i, weight=1.0)
    worker2.close()
    assert worker2.finished() == [1, 2, 3, 4, 5]


def test_roundtrip_reports_match_sequential_processing(tiny_model, folder: Path) -> None:
    """The threaded runner gives the same records as computing each image by hand."""
    processor = Processor(tiny_model(2))
    task = RoundtripTask(processor, compare_bicubic=False)
    outcomes = run_batch(task, make_items(task, collect_inputs(folder)), Recorder())
    for outcome in outcomes:
        if outcome.status != "ok":
            continue
        picture = imageio.read_image(outcome.item.src)
        _, rec = roundtrip_picture(processor, picture)
        psnr, _ = measure(rec.rgb, picture.rgb, 2)
        assert outcome.record["psnr"] == pytest.approx(psnr)
        assert np.isfinite(outcome.seconds) and outcome.seconds > 0
