"""Background decode and encode around a compute loop: in order, in bounded memory.

A batch of files runs in three stages: decode (file I/O and Pillow/zlib, which
release the GIL), compute (the networks, on the calling thread) and
encode/write. :class:`Prefetcher` runs the first stage ahead of the consumer
in one thread, :class:`OrderedWorker` the last stage behind it in another.
Both hold only a few items and a bounded number of pixels, so memory does not
grow with the number of files, and both hand results back in input order, so
reports read exactly as they would without threads.

Failures: an ``Exception`` is the stage function's business (it turns it
into a result). Anything that escapes a stage function (``KeyboardInterrupt``
raised inside it, or an error a caller wants to surface) stops that stage and
is raised again on the consumer's thread at the point where its item comes up,
so the item before it still completes and the ones after it never start.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Defaults: a handful of images ahead/behind, at most this many pixels waiting
# (float32 RGB: 12 bytes per pixel, so 16 MP is about 200 MB). An empty buffer
# always takes one item, however large, so a 50 MP photo still flows through.
MAX_ITEMS = 32
MAX_PIXELS = 16_000_000


class _Closed(Exception):
    """The buffer was closed: no more puts, and nothing left to get."""


class _Buffer(Generic[T]):
    """A FIFO bounded by item count and by total weight; an empty buffer admits anything."""

    def __init__(self, max_items: int, max_weight: float) -> None:
        self.max_items, self.max_weight = max(1, max_items), max_weight
        self._items: deque[tuple[T, float]] = deque()
        self._weight = 0.0
        self._closed = False
        self._cond = threading.Condition()

    def _full(self, weight: float) -> bool:
        if not self._items:
            return False
        return len(self._items) >= self.max_items or self._weight + weight > self.max_weight

    def put(self, value: T, weight: float = 0.0, force: bool = False) -> None:
        """Append, waiting for room; raise :class:`_Closed` if the buffer is closed."""
        with self._cond:
            while not self._closed and not force and self._full(weight):
                self._cond.wait()
            if self._closed and not force:
                raise _Closed
            self._items.append((value, weight))
            self._weight += weight
            self._cond.notify_all()

    def get(self) -> T:
        """Pop the oldest item, waiting for one; :class:`_Closed` once closed and empty."""
        with self._cond:
            while not self._items and not self._closed:
                self._cond.wait()
            if not self._items:
                raise _Closed
            value, weight = self._items.popleft()
            self._weight -= weight
            self._cond.notify_all()
            return value

    def close(self, drop: bool = False) -> None:
        """No more puts (waiting producers give up); ``drop`` also discards what is queued."""
        with self._cond:
            self._closed = True
            if drop:
                self._items.clear()
                self._weight = 0.0
            self._cond.notify_all()


class _Failure:
    """What escaped a stage function, carried to the consumer's thread."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetcher(Generic[T, R]):
    """Applies ``fn`` to ``items`` in a background thread, ahead of the consumer, in order.

    Iterate to get ``(item, fn(item))`` pairs. ``weight(result)`` (pixels, say)
    bounds how much finished work may wait. Call :meth:`close` when done or on
    error; it stops the thread after its current item.
    """

    def __init__(
        self,
        items: Iterable[T],
        fn: Callable[[T], R],
        weight: Callable[[R], float] = lambda _: 0.0,
        max_items: int = MAX_ITEMS,
        max_weight: float = MAX_PIXELS,
        name: str = "carcli-prefetch",
    ) -> None:
        self._fn, self._weight = fn, weight
        self._buffer: _Buffer[tuple[T, R] | _Failure] = _Buffer(max_items, max_weight)
        self._thread = threading.Thread(target=self._run, args=(list(items),), name=name)
        self._thread.daemon = True  # it only reads; never keep the process alive for it
        self._thread.start()

    def _run(self, items: list[T]) -> None:
        try:
            for item in items:
                result = self._fn(item)
                self._buffer.put((item, result), self._weight(result))
        except _Closed:
            pass
        except BaseException as exc:  # carried to the consumer, raised there
            self._buffer.put(_Failure(exc), force=True)
        finally:
            self._buffer.close()

    def __iter__(self) -> Iterator[tuple[T, R]]:
        while True:
            try:
                entry = self._buffer.get()
            except _Closed:
                return
            if isinstance(entry, _Failure):
                raise entry.exc
            yield entry

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the current item and drop what was prefetched."""
        self._buffer.close(drop=True)
        self._thread.join(timeout)


class OrderedWorker(Generic[T, R]):
    """Applies ``fn`` to submitted jobs in a background thread, one at a time, in order.

    :meth:`submit` waits while the queue is full (bounded memory);
    :meth:`finished` returns the results completed so far, in submission order,
    and raises what escaped ``fn`` once the results before it have been taken.
    :meth:`close` waits for everything; :meth:`cancel` drops jobs not yet
    started and waits only for the current one (which therefore never stops
    half-way, e.g. half-written).
    """

    def __init__(
        self,
        fn: Callable[[T], R],
        max_items: int = MAX_ITEMS,
        max_weight: float = MAX_PIXELS,
        name: str = "carcli-worker",
    ) -> None:
        self._fn = fn
        self._buffer: _Buffer[T] = _Buffer(max_items, max_weight)
        self._done: deque[R | _Failure] = deque()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                job = self._buffer.get()
            except _Closed:
                return
            try:
                result: R | _Failure = self._fn(job)
            except BaseException as exc:  # stop here; the consumer raises it in turn
                result = _Failure(exc)
                self._buffer.close(drop=True)
            with self._lock:
                self._done.append(result)

    def submit(self, job: T, weight: float = 0.0) -> None:
        """Queue a job, waiting for room. Raises what stopped the worker, if anything did."""
        try:
            self._buffer.put(job, weight)
        except _Closed:
            self._thread.join()
            # Raise what stopped the worker even when earlier results are still waiting
            # to be taken; they stay queued for finished(), in order, before the failure.
            with self._lock:
                failure = next((e for e in self._done if isinstance(e, _Failure)), None)
            if failure is not None:
                raise failure.exc from None
            raise RuntimeError("submit() after close() or cancel()") from None

    def finished(self) -> list[R]:
        """Results completed so far (in order), removed from the worker."""
        out: list[R] = []
        with self._lock:
            while self._done:
                entry = self._done[0]
                if isinstance(entry, _Failure):
                    if out:  # hand over what came before; raise on the next call
                        break
                    self._done.popleft()
                    raise entry.exc
                out.append(self._done.popleft())  # type: ignore[arg-type]
        return out

    def close(self) -> None:
        """No more jobs; wait until the queued ones are done."""
        self._buffer.close()
        self._thread.join()

    def cancel(self) -> None:
        """Drop the jobs not started; wait for the current one."""
        self._buffer.close(drop=True)
        self._thread.join()
