"""What `car train` shows while it runs: a live progress bar on a terminal, plain lines elsewhere.

Training runs for hours, usually under ``nohup`` with stderr in a file, where a
live display would fill the file with redraws; so the bar appears only when
stderr is a terminal, and the JSON log is the record either way.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from carcli.console import stderr_console


class TrainDisplay:
    """Plain stderr lines: the start, each validation, the stop (nothing with ``quiet``)."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def start(self, label: str, total: float, completed: float) -> None:
        """``completed`` of ``total``: the trainer passes the schedule position in [0, 1]."""

    def update(self, completed: float, status: str) -> None:
        pass

    def stop(self) -> None:
        pass


class RichTrainDisplay(TrainDisplay):
    """A bar over the schedule with losses, learning rate, speed and the best validation."""

    def __init__(self, console: Console) -> None:
        super().__init__(quiet=False)
        self.console = console
        self._progress: Progress | None = None
        self._task: Any = None

    def say(self, message: str) -> None:
        self.console.print(Text(message), soft_wrap=True)  # above the live bar

    def start(self, label: str, total: float, completed: float) -> None:
        self._progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )
        self._progress.start()
        self._task = self._progress.add_task(label, total=total, completed=completed, status="")

    def update(self, completed: float, status: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, status=status)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def make_display(quiet: bool, console: Console | None = None) -> TrainDisplay:
    """The live display on a terminal, plain lines otherwise (a log file, a pipe)."""
    if quiet:
        return TrainDisplay(quiet=True)
    console = console or stderr_console()
    return RichTrainDisplay(console) if console.is_terminal else TrainDisplay()


def status_line(step: int, l1: float, lr: float, patches_per_s: float, best_psnr: float) -> str:
    """``step 1400 · L1 0.02796 · lr 3.9e-04 · 28.8 patches/s · best 30.457 dB``."""
    parts = [f"step {step}", f"L1 {l1:.5f}", f"lr {lr:.1e}", f"{patches_per_s:.1f} patches/s"]
    if math.isfinite(best_psnr):
        parts.append(f"best {best_psnr:.3f} dB")
    return " · ".join(parts)
