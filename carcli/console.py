"""What the user sees: progress, error lines, the summary line and result tables (rich).

Progress, notes and errors go to stderr so stdout stays clean for tables and
pipes. The progress bar appears only on a terminal and never with --quiet;
error and warning lines always appear.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from carcli.errors import EXIT_INTERRUPTED, CarError

if TYPE_CHECKING:  # the CLI imports this module before torch (see carcli.defaults)
    from carcli.batch import Outcome, Summary


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout_console() -> Console:
    return Console(highlight=False)


def printable(text: str) -> str:
    """``text`` with control characters shown as escapes (``\\n``, ``\\x1b``).

    Messages name files, and a file name may hold a newline or a terminal escape
    sequence: printed raw, one error would read as two lines, or recolour (or
    retitle) the user's terminal.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@contextlib.contextmanager
def user_errors(interrupted: str | None = None) -> Iterator[None]:
    """Errors a user can cause: one line on stderr and their exit code, never a traceback.

    Every command runs in this: a :class:`carcli.errors.CarError` prints its
    message with parameters as flags and exits with its code (2 for usage
    errors). ``interrupted`` is the line for Ctrl-C (exit 130); without it
    KeyboardInterrupt passes on.
    """
    from carcli.interrupts import Terminated, like_ctrl_c

    err = stderr_console()
    try:
        # With an ``interrupted`` line, SIGTERM and SIGHUP end the work as Ctrl-C does
        # (the file in flight finished or discarded), with exit code 128 + N.
        with like_ctrl_c() if interrupted is not None else contextlib.nullcontext():
            yield
    except CarError as exc:
        err.print(
            f"error: {printable(exc.cli_message())}", style="red", markup=False, highlight=False
        )
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt as exc:
        if interrupted is None:
            raise
        code = EXIT_INTERRUPTED
        if isinstance(exc, Terminated):
            interrupted = interrupted.replace("interrupted", f"interrupted by {exc.name}", 1)
            code = exc.exit_code
        err.print(interrupted, style="yellow", markup=False, highlight=False)
        raise typer.Exit(code) from None


class _RateColumn(ProgressColumn):
    """Images and megapixels per second over the images actually processed."""

    def render(self, task: Any) -> Text:
        elapsed, done = task.elapsed or 0.0, task.fields.get("done", 0)
        if elapsed <= 0 or done == 0:
            return Text("-- img/s", style="progress.data.speed")
        rate = f"{done / elapsed:.2f} img/s {task.fields.get('mp', 0.0) / elapsed:.1f} MP/s"
        return Text(rate, style="progress.data.speed")


class ConsoleReporter:
    """A :class:`carcli.batch.Reporter` that prints to the terminal with rich."""

    def __init__(
        self, quiet: bool = False, progress: bool | None = None, console: Console | None = None
    ) -> None:
        self.console = console or stderr_console()
        self.quiet = quiet
        self.show_progress = (
            (not quiet and self.console.is_terminal) if progress is None else progress
        )
        self._progress: Progress | None = None
        self._task: Any = None
        self._notes: set[str] = set()
        self._done = 0
        self._mp = 0.0

    def _line(self, text: str, style: str | None = None) -> None:
        self.console.print(Text(printable(text), style=style or ""), soft_wrap=True)

    def start(self, total: int, label: str) -> None:
        if not self.show_progress or total < 2:
            return
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, done=0, mp=0.0)

    def advance(self, outcome: Outcome) -> None:
        if outcome.status == "ok":
            self._done += 1
            self._mp += outcome.pixels / 1e6
        if self._progress is not None:
            self._progress.update(self._task, advance=1, done=self._done, mp=self._mp)

    def error(self, rel: str, reason: str) -> None:
        self._line(f"error: {rel}: {reason}", "red")

    def warn(self, rel: str, message: str) -> None:
        self._line(f"warning: {rel}: {message}", "yellow")

    def note(self, message: str) -> None:
        if self.quiet or message in self._notes:
            return
        self._notes.add(message)
        self._line(f"note: {message}", "cyan")

    def finish(self, summary: Summary) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if not self.quiet:
            self._line(summary_line(summary), "bold" if not summary.failed else "bold red")


def summary_line(s: Summary) -> str:
    """``done: 12 images downscaled, 1 failed, 3 skipped (...) in 4.2 s (2.9 img/s, ...)``."""
    parts = [f"{s.ok} image{'s' * (s.ok != 1)} {s.action}", f"{s.failed} failed"]
    if s.skipped:
        parts.append(f"{s.skipped} skipped (output exists; --overwrite replaces it)")
    rate = ""
    if s.ok and s.seconds > 0:
        rate = f" ({s.ok / s.seconds:.2f} img/s, {s.pixels / 1e6 / s.seconds:.2f} MP/s)"
    return f"done: {', '.join(parts)} in {s.seconds:.1f} s{rate}"


# --------------------------------------------------------------------------- tables


def _num(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def _delta(car: float | None, base: float | None) -> Text:
    if car is None or base is None or math.isinf(car) or math.isinf(base):
        return Text("-")
    d = car - base
    return Text(f"{d:+.2f}", style="green" if d > 0 else "red" if d < 0 else "")


def roundtrip_table(
    records: Sequence[dict[str, Any]], report: dict[str, Any], compare_bicubic: bool = True
) -> Table:
    """One row per image and a mean row: CAR and bicubic Y-PSNR/SSIM and the PSNR gain."""
    scale = report["scale"]
    table = Table(
        title=f"CAR round trip x{scale}",
        caption=(
            f"Y-PSNR (dB) and SSIM on BT.601 luma, {scale} px border shaved; "
            "bicubic = MATLAB imresize down (8-bit) and up"
        ),
        header_style="bold",
    )
    table.add_column("file", no_wrap=True)
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("CAR PSNR", justify="right")
    table.add_column("CAR SSIM", justify="right")
    if compare_bicubic:
        table.add_column("bicubic PSNR", justify="right")
        table.add_column("bicubic SSIM", justify="right")
        table.add_column("gain", justify="right")
    for i, r in enumerate(records):
        row: list[Any] = [printable(r["file"]), f"{r['width']}x{r['height']}"]
        row += [_num(r["psnr"], 2), _num(r["ssim"], 4)]
        if compare_bicubic:
            row += [_num(r["bicubic_psnr"], 2), _num(r["bicubic_ssim"], 4)]
            row.append(_delta(r["psnr"], r["bicubic_psnr"]))
        table.add_row(*row, end_section=i == len(records) - 1)
    mean: list[Any] = [f"mean of {report['count']}", ""]
    mean += [_num(report["psnr"], 2), _num(report["ssim"], 4)]
    if compare_bicubic:
        base = report["baselines"]["bicubic"]
        mean += [_num(base["psnr"], 2), _num(base["ssim"], 4), _delta(report["psnr"], base["psnr"])]
    table.add_row(*mean, style="bold")
    return table


def _is_official(weights: dict[str, Any]) -> bool:
    """The authors' kgn.pth/usn.pth folder (listed as one entry), not a carcli file."""
    return (weights.get("metadata") or {}).get("source") == "official"


def info_tables(info: dict[str, Any]) -> list[Any]:
    """Renderables for ``car info``: versions and devices, then installed weights."""
    env = Table(show_header=False, box=None, pad_edge=False)
    env.add_column(style="bold")
    env.add_column()
    for name, version in info["versions"].items():
        env.add_row(name, version)
    for dev in info["devices"]:
        env.add_row(
            f"device {dev['device']}", f"{dev['name']} (resampling backend: {dev['backend']})"
        )
    env.add_row("default device", info["default_device"])
    env.add_row("weights dir", info["weights_dir"])

    listed = info.get("weights_listed")
    title = f"weights in {listed}" if listed else "installed weights"
    weights = Table(title=title, header_style="bold")
    broken = any(w.get("error") for w in info["weights"])
    columns = ("scale", "file", "config", "architecture", "parameters", "validation")
    for column in columns + ("problem",) * broken:
        weights.add_column(column, overflow="fold")
    for w in info["weights"]:
        row = [
            f"{w['scale']}x" if w.get("scale") else "?",
            Path(w["file"]).name + ("/ (kgn.pth, usn.pth)" if _is_official(w) else ""),
            w.get("config") or "-",
            w.get("architecture") or "-",
            w.get("parameters") or "-",
            w.get("validation") or "-",
        ]
        weights.add_row(*row, *([w.get("error") or ""] if broken else []))
    if not info["weights"] and listed:
        weights.caption = (
            f"no carcli checkpoint (.safetensors) and no authors' kgn.pth/usn.pth in {listed}"
        )
    elif not info["weights"]:
        weights.caption = (
            "none found in the weights dir: commands need --weights FILE_OR_FOLDER (a carcli "
            "checkpoint, or the authors' kgn.pth/usn.pth folder), or unset CARCLI_WEIGHTS to "
            "use the weights that ship with carcli"
        )
    # Digests in sha256sum's format, one unbroken line each (a table column would fold
    # them), so `sha256sum -c` in the weights dir can check what is installed.
    digests = [f"{w['sha256']}  {Path(w['file']).name}" for w in info["weights"] if w.get("sha256")]
    if not digests:
        return [env, weights]
    folders = {str(Path(w["file"]).parent) for w in info["weights"] if w.get("sha256")}
    where = (
        "the weights dir" if not listed else folders.pop() if len(folders) == 1 else "their folder"
    )
    listing = Text(f"SHA-256 (sha256sum -c in {where} checks them):\n", style="bold")
    listing.append("\n".join(digests), style="default")
    listing.no_wrap, listing.overflow = True, "ignore"
    return [env, weights, listing]
