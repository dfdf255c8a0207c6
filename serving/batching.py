"""Dynamic batching on worker threads, the way Triton's dynamic batcher works.

``@serve.batch`` forms batches on the replica's event loop: when a batch finishes, the next one
is only formed and started after the loop has also run the finished batch's responses, so the
model sits idle while HTTP work runs, even with requests already queued. Here worker threads
own the queue: a free worker takes the next batch at once, waiting for it to fill only until the
oldest queued request has waited ``wait_s`` (Triton's ``max_queue_delay``), while the event loop
keeps parsing and answering requests. The batch handler runs on a worker, so it must not block
on the loop's work without a timeout (``run_on_loop`` bounds it).
"""

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any


class BatcherStopped(RuntimeError):
    """The batcher was stopped before the request ran."""


class BatchFailed(RuntimeError):
    """The batch handler raised; each caller of the batch gets its own instance (``__cause__``:
    the handler's exception)."""


def _settle(done: list[tuple[asyncio.Future, Any]]) -> None:
    for future, result in done:
        if future.done():  # the caller gave up (timeout or disconnect)
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)


class DynamicBatcher:
    """``await submit(item)`` returns ``handle_batch(items)[i]`` for the batch the item ran in.

    ``handle_batch`` takes a list of at most ``max_batch_size`` items and returns one result per
    item (an exception instance fails that item alone); if it raises, every caller of the batch
    gets a BatchFailed. ``workers`` threads run batches side by side. Results go back to each
    caller's event loop in one callback per batch.
    """

    # the queue holds (item, the caller's future, time.monotonic() at submit)

    def __init__(
        self,
        handle_batch: Callable[[list], list],
        max_batch_size: int = 32,
        wait_s: float = 0.002,
        name: str = "batcher",
        workers: int = 1,
    ):
        if max_batch_size < 1 or wait_s < 0 or workers < 1:
            raise ValueError("need max_batch_size >= 1, wait_s >= 0 and workers >= 1")
        self.handle_batch = handle_batch
        self.max_batch_size, self.wait_s = int(max_batch_size), float(wait_s)
        self._queue: deque = deque()
        self._running = 0  # items in the batches the workers run now
        self._ready = threading.Condition()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}_{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    async def submit(self, item) -> Any:
        future = asyncio.get_running_loop().create_future()
        with self._ready:
            if self._stopped:
                raise BatcherStopped("batcher stopped")
            self._queue.append((item, future, time.monotonic()))
            # wake the worker only when it waits for a first item or the batch is full
            if len(self._queue) == 1 or len(self._queue) >= self.max_batch_size:
                self._ready.notify()
        return await future

    def pending(self) -> int:
        """Items queued or in a running batch: what a request submitted now waits behind."""
        return len(self._queue) + self._running

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the workers (each finishes its batch); requests still queued fail with
        BatcherStopped."""
        with self._ready:
            self._stopped = True
            left = list(self._queue)
            self._queue.clear()
            self._ready.notify_all()
        self._reply([(future, BatcherStopped("batcher stopped")) for _, future, _ in left])
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def _next_batch(self) -> list:
        """The next batch: full, or what is queued once the oldest request has waited
        ``wait_s``; empty only once stopped. With several workers, another one may take the
        queue while this one waits for its batch to fill: then it waits afresh."""
        with self._ready:
            while not self._stopped:
                while not self._queue and not self._stopped:
                    self._ready.wait()
                while 0 < len(self._queue) < self.max_batch_size and not self._stopped:
                    left = self._queue[0][2] + self.wait_s - time.monotonic()
                    if left <= 0:
                        break
                    self._ready.wait(left)
                size = min(self.max_batch_size, len(self._queue))
                if size and not self._stopped:
                    self._running += size
                    return [self._queue.popleft() for _ in range(size)]
            return []

    def _serve(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            items = [item for item, _, _ in batch]
            try:
                results = self.handle_batch(items)
                if len(results) != len(items):
                    raise RuntimeError(
                        f"batch handler returned {len(results)} results for {len(items)} items"
                    )
            except Exception as exc:  # every caller of the batch gets the failure, its own copy
                results = [_failed_batch(exc) for _ in items]
            with self._ready:
                self._running -= len(items)
            self._reply([(future, r) for (_, future, _), r in zip(batch, results, strict=True)])

    @staticmethod
    def _reply(done: list[tuple[asyncio.Future, Any]]) -> None:
        by_loop: dict = {}
        for future, result in done:
            by_loop.setdefault(future.get_loop(), []).append((future, result))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, pairs)
            except RuntimeError:  # the caller's loop is closed: nobody waits any more
                pass


def _failed_batch(exc: Exception) -> BatchFailed:
    failure = BatchFailed(f"batch failed: {type(exc).__name__}: {exc}")
    failure.__cause__ = exc
    return failure


def run_on_loop(coro: Coroutine, loop: asyncio.AbstractEventLoop, timeout_s: float):
    """Run ``coro`` on ``loop`` from a worker thread and wait for it at most ``timeout_s``."""
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout_s)
    except TimeoutError:
        future.cancel()
        raise
