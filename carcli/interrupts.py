"""SIGTERM and SIGHUP end a run the way Ctrl-C does: the file in flight is finished or
discarded, the user hears how to resume, and the exit code is 128 + the signal number.

Without this a ``kill`` (or a closed terminal) killed ``car`` outright: no message,
and a write cut short left its hidden temp file behind.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

# The signals handled like Ctrl-C (SIGHUP does not exist on Windows).
SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when one of :data:`SIGNALS` arrives; ``signum`` says which.

    A KeyboardInterrupt, so every path that finishes cleanly on Ctrl-C (the
    batch runner's cancel, atomic writes' cleanup) does the same here.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(exc: KeyboardInterrupt) -> int:
    """128 + N for a signal N, 130 (SIGINT) for Ctrl-C."""
    return exc.exit_code if isinstance(exc, Terminated) else 130


@contextlib.contextmanager
def like_ctrl_c() -> Iterator[None]:
    """Within the block, SIGTERM/SIGHUP raise :class:`Terminated` in the main thread.

    After the first one the signals are ignored, so a second cannot cut the
    cleanup short; the previous handlers come back when the block ends.
    Outside the main thread (where handlers cannot be set) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {sig: signal.signal(sig, handler) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
