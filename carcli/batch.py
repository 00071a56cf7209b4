"""Run a :class:`Task` over many files: load -> compute -> save, errors per file, in order.

:func:`run_batch` walks :class:`Item` s through a task with decoding and
encoding in background threads (:mod:`carcli.streaming`), batches equal-size
images on a GPU, handles errors per file, skips finished outputs, writes
atomically and reports progress, in input order, to a :class:`Reporter`
(:class:`NullReporter` for library calls, ``carcli.console`` for the CLI). It
knows nothing about networks or commands: those are the tasks'.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from carcli.errors import CarError
from carcli.formats import is_stdio
from carcli.imageio import (
    Picture,
    read_image,
    remove_stale_temps,
)
from carcli.streaming import OrderedWorker, Prefetcher
from carcli.tiler import is_oom

if TYPE_CHECKING:
    from carcli.engine import Processor


DEBUG_ENV = "CARCLI_DEBUG"  # set to 1 to get tracebacks for per-file failures


@dataclass
class Item:
    """One input file and the files it produces."""

    src: Path
    rel: str  # path relative to INPUT (for messages, reports and mirroring)
    outputs: dict[str, Path] = field(default_factory=dict)
    error: str | None = None  # known to fail before any work (name clash, ...)


@dataclass
class Result:
    """What ``Task.compute`` produced for one item."""

    images: dict[str, Picture]
    record: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    source: Picture | None = None  # the input, when :meth:`Task.finish` still needs it

    @property
    def pixels(self) -> int:
        """Pixels this result keeps in memory (bounds the writer's queue)."""
        pictures = [*self.images.values()] + ([self.source] if self.source else [])
        return sum(p.width * p.height for p in pictures)


@dataclass
class Outcome:
    item: Item
    status: str  # "ok", "failed" or "skipped"
    error: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    pixels: int = 0
    seconds: float = 0.0


@dataclass
class Summary:
    action: str
    total: int
    ok: int
    failed: int
    skipped: int
    seconds: float
    pixels: int


class Reporter(Protocol):
    """Where a batch tells the user what happens (see ``carcli.console``)."""

    def start(self, total: int, label: str) -> None: ...
    def advance(self, outcome: Outcome) -> None: ...
    def error(self, rel: str, reason: str) -> None: ...
    def warn(self, rel: str, message: str) -> None: ...
    def note(self, message: str) -> None: ...
    def finish(self, summary: Summary) -> None: ...


class NullReporter:
    """A :class:`Reporter` that tells nobody (library calls such as ``evaluate_folder``)."""

    def start(self, total: int, label: str) -> None:
        pass

    def advance(self, outcome: Outcome) -> None:
        pass

    def error(self, rel: str, reason: str) -> None:
        pass

    def warn(self, rel: str, message: str) -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def finish(self, summary: Summary) -> None:
        pass


class Task:
    """One command's work per file: where outputs go, what to compute, how to save it."""

    action = "processed"  # for the summary line
    label = "processing"  # for the progress bar
    skip_done = True  # skip items whose outputs all exist (unless overwrite)

    def __init__(self, processor: Processor, overwrite: bool = False) -> None:
        self.processor = processor
        self.overwrite = overwrite

    def outputs_for(self, rel: Path) -> dict[str, Path]:
        return {}

    def load(self, item: Item) -> Picture:
        return read_image(item.src)

    def compute(self, item: Item, picture: Picture) -> Result:
        raise NotImplementedError

    def batch_key(self, item: Item, picture: Picture) -> Hashable | None:
        """Pictures with equal keys may be computed together (None: never batched)."""
        return None

    def compute_many(
        self, items: Sequence[Item], pictures: Sequence[Picture]
    ) -> list[Result | Exception]:
        """:meth:`compute` for pictures with one batch key; a failure is returned in its place.

        Subclasses run the networks once for the whole group; if that fails
        (out of memory, say) every picture is retried on its own.
        """
        out: list[Result | Exception] = []
        for item, picture in zip(items, pictures, strict=True):
            try:
                out.append(self.compute(item, picture))
            except Exception as exc:
                out.append(exc)
        return out

    def finish(self, item: Item, result: Result) -> Result:
        """Work after the networks that needs no device (metrics, say).

        Runs in the writer's background thread, right before :meth:`save`, so it
        overlaps the next image's compute.
        """
        return result

    def save(self, item: Item, result: Result) -> None:
        pass


def make_items(task: Task, inputs: Sequence[tuple[Path, Path]]) -> list[Item]:
    """Items with their outputs; name clashes and outputs that are inputs fail up front."""
    sources = {os.path.realpath(src) for src, _ in inputs if not is_stdio(src)}
    claimed: dict[str, str] = {}
    items = []
    for src, rel in inputs:
        item = Item(src=src, rel=rel.as_posix(), outputs=task.outputs_for(rel))
        for path in item.outputs.values():
            if is_stdio(path):  # standard output: nothing on disk to clash with
                continue
            real = os.path.realpath(path)
            if real in sources:
                item.error = f"refusing to overwrite an input file ({path})"
            elif real in claimed:
                item.error = f"output {path} would also be written for {claimed[real]}; rename one"
            else:
                claimed[real] = item.rel
        items.append(item)
    return items


@dataclass
class _Job:
    """One item on its way through load -> compute -> save."""

    item: Item
    status: str = "pending"  # then "ok", "failed" or "skipped"
    error: str | None = None
    picture: Picture | None = None
    result: Result | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pixels: int = 0
    seconds: float = 0.0

    def fail(self, exc: BaseException) -> _Job:
        self.status, self.error = "failed", _failure_message(exc)
        self.picture = self.result = None
        return self

    @property
    def weight(self) -> float:
        """Pixels this job keeps in memory while it waits in a queue."""
        if self.picture is not None:
            return float(self.pixels)
        return float(self.result.pixels) if self.result is not None else 0.0


def _failure_message(exc: BaseException) -> str:
    """One line for the user; re-raises unexpected errors when CARCLI_DEBUG is set."""
    if isinstance(exc, CarError):
        return str(exc)
    if is_oom(exc):
        return "out of memory (try a smaller tile size, or the CPU)"
    if os.environ.get(DEBUG_ENV) or not isinstance(exc, Exception):
        raise exc
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}".rstrip(": ")


def _load(task: Task, item: Item) -> _Job:
    """First stage (background thread): skip, fail early or decode."""
    job = _Job(item)
    if item.error:
        job.status, job.error = "failed", item.error
        return job
    stale = sum(remove_stale_temps(p) for p in item.outputs.values() if not is_stdio(p))
    if stale:
        job.notes.append(f"removed {stale} temp file(s) an interrupted run left next to outputs")
    # A folder where an output belongs is not a finished output: the write then
    # says what is in the way, instead of the image being skipped for good.
    if (
        task.skip_done
        and not task.overwrite
        and item.outputs
        and all(p.exists() and not p.is_dir() and not is_stdio(p) for p in item.outputs.values())
    ):
        job.status = "skipped"
        return job
    start = time.perf_counter()
    try:
        job.picture = task.load(item)
    except Exception as exc:
        return job.fail(exc)
    finally:
        job.seconds += time.perf_counter() - start
    job.pixels = job.picture.width * job.picture.height
    job.notes += job.picture.notes  # what reading changed, e.g. a colour profile converted
    job.warnings += job.picture.warnings  # what reading could not keep (frames, clipping)
    return job


def _compute(task: Task, jobs: list[_Job]) -> None:
    """Second stage (calling thread): the networks, for a group of equal-size pictures."""
    start = time.perf_counter()
    pictures = [j.picture for j in jobs]
    results = task.compute_many([j.item for j in jobs], pictures)  # type: ignore[arg-type]
    share = (time.perf_counter() - start) / len(jobs)
    take_notes = getattr(task.processor, "take_notes", None)
    jobs[0].notes += take_notes() if take_notes else []
    for job, result in zip(jobs, results, strict=True):
        job.seconds += share
        job.picture = None  # free the input before the job waits for the writer
        if isinstance(result, Exception):
            job.fail(result)
        else:
            job.result = result


def _save(task: Task, job: _Job) -> _Job:
    """Third stage (background thread): finish (metrics), encode and write atomically."""
    if job.status != "pending" or job.result is None:
        return job
    start = time.perf_counter()
    try:
        job.result = task.finish(job.item, job.result)
        task.save(job.item, job.result)
        job.status = "ok"
    except Exception as exc:
        job.fail(exc)
    finally:
        job.seconds += time.perf_counter() - start
    return job


def _groups(task: Task, jobs: Iterator[tuple[Item, _Job]]) -> Iterator[list[_Job]]:
    """Consecutive jobs whose pictures can share one pass of the networks.

    Jobs that need no compute pass through alone. The group size comes from
    the processor (1 on the CPU, where batching gains nothing).
    """
    held: _Job | None = None
    while True:
        if held is None:
            entry = next(jobs, None)
            if entry is None:
                return
            held = entry[1]
        first, held = held, None
        if first.picture is None:
            yield [first]
            continue
        key = task.batch_key(first.item, first.picture)
        limit = (
            1
            if key is None
            else task.processor.max_batch(first.picture.height, first.picture.width)
        )
        group = [first]
        while len(group) < limit:
            entry = next(jobs, None)
            if entry is None:
                break
            job = entry[1]
            if job.picture is None or task.batch_key(job.item, job.picture) != key:
                held = job
                break
            group.append(job)
        yield group


def run_batch(task: Task, items: Sequence[Item], reporter: Reporter) -> list[Outcome]:
    """Process every item, one error line per failure; the batch always continues.

    Decoding runs ahead and encoding/writing behind the compute in background
    threads (bounded queues), so the CPU or GPU does not wait for file I/O.
    Reports come in input order; every output is written once, atomically.
    """
    start = time.perf_counter()
    reporter.start(len(items), task.label)
    outcomes: list[Outcome] = []

    def report(done: list[_Job]) -> None:
        for job in done:
            result = job.result
            for message in job.notes + (result.notes if result else []):
                reporter.note(message)
            for message in job.warnings + (result.warnings if result else []):
                reporter.warn(job.item.rel, message)
            outcome = Outcome(job.item, job.status, job.error, seconds=job.seconds)
            if job.status == "ok" and result is not None:
                outcome.record, outcome.pixels = result.record, job.pixels
            if outcome.status == "failed":
                reporter.error(job.item.rel, outcome.error or "failed")
            reporter.advance(outcome)
            outcomes.append(outcome)

    loader = Prefetcher(items, functools.partial(_load, task), weight=lambda j: j.weight)
    writer: OrderedWorker[_Job, _Job] = OrderedWorker(functools.partial(_save, task))
    try:
        try:
            for group in _groups(task, iter(loader)):
                if group[0].status == "pending":
                    _compute(task, group)
                for job in group:
                    writer.submit(job, job.weight)
                report(writer.finished())
            writer.close()
            # finished() hands over the results before a failure and raises it on the
            # next call, so drain until empty: a Ctrl-C in the last writes still counts.
            while done := writer.finished():
                report(done)
        except BaseException:
            # Ctrl-C or a debug re-raise: finish the file being written (atomically),
            # start no other, and still report what was done.
            writer.cancel()
            with contextlib.suppress(BaseException):
                report(writer.finished())
            raise
        finally:
            loader.close()
    finally:  # also on Ctrl-C: stop the progress bar and say what was done
        reporter.finish(summarize(task.action, outcomes, time.perf_counter() - start))
    return outcomes


def summarize(action: str, outcomes: Sequence[Outcome], seconds: float) -> Summary:
    count = lambda status: sum(o.status == status for o in outcomes)  # noqa: E731
    return Summary(
        action=action,
        total=len(outcomes),
        ok=count("ok"),
        failed=count("failed"),
        skipped=count("skipped"),
        seconds=seconds,
        pixels=sum(o.pixels for o in outcomes),
    )
