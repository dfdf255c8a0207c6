"""The colocated path's dynamic batcher: results reach the right callers, batches fill up to
their size, a failure stays in its batch (or its item), every worker keeps serving, and a
stopped batcher refuses work instead of hanging."""

import asyncio
import threading
import time

import pytest

from kuberank.serving.batching import BatcherStopped, BatchFailed, DynamicBatcher, run_on_loop


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def _all(batcher, items):
    return await asyncio.gather(*(batcher.submit(i) for i in items))


def test_each_caller_gets_its_own_result_and_batches_fill():
    sizes = []

    def double(items):
        sizes.append(len(items))
        time.sleep(0.005)
        return [i * 2 for i in items]

    batcher = DynamicBatcher(double, max_batch_size=8, wait_s=0.05)
    try:
        got = _run(_all(batcher, range(40)))
    finally:
        batcher.stop()
    assert got == [i * 2 for i in range(40)]
    assert max(sizes) == 8 and sum(sizes) == 40 and len(sizes) <= 6


def test_a_lone_request_waits_wait_s_for_company_then_runs():
    batcher = DynamicBatcher(lambda items: items, max_batch_size=32, wait_s=0.3)
    try:
        started = time.perf_counter()
        assert _run(batcher.submit("x")) == "x"
        assert 0.25 <= time.perf_counter() - started < 3.0
    finally:
        batcher.stop()


def test_the_wait_counts_from_the_oldest_request():
    """A request that queued while the worker was busy has waited already: when the worker
    frees up, its batch starts at once instead of waiting ``wait_s`` more."""
    release = threading.Event()

    def handle(items):
        if "first" in items:
            release.wait(10)
        return items

    batcher = DynamicBatcher(handle, max_batch_size=8, wait_s=1.5)

    async def main():
        first = asyncio.ensure_future(batcher.submit("first"))
        await asyncio.sleep(1.6)  # "first" waited out its wait_s and is running
        second = asyncio.ensure_future(batcher.submit("second"))
        await asyncio.sleep(1.6)  # "second" has waited wait_s behind the busy worker
        release.set()
        freed = time.perf_counter()
        await first
        assert await second == "second"
        return time.perf_counter() - freed

    try:
        assert _run(main()) < 1.0  # not another 1.5 s
    finally:
        batcher.stop()


def test_failures_stay_with_their_item_or_batch():
    def handle(items):
        if "boom" in items:
            raise RuntimeError("batch failed")
        return [ValueError(i) if i == "bad" else i.upper() for i in items]

    batcher = DynamicBatcher(handle, max_batch_size=4, wait_s=0.01)

    async def main():
        good = await asyncio.gather(
            batcher.submit("a"), batcher.submit("bad"), return_exceptions=True
        )
        alone = await asyncio.gather(batcher.submit("boom"), return_exceptions=True)
        after = await batcher.submit("c")
        return good, alone, after

    try:
        good, alone, after = _run(main())
    finally:
        batcher.stop()
    assert good[0] == "A" and isinstance(good[1], ValueError)
    assert isinstance(alone[0], BatchFailed) and "batch failed" in str(alone[0])
    assert isinstance(alone[0].__cause__, RuntimeError) and after == "C"


def test_each_caller_of_a_failed_batch_gets_its_own_error():
    def boom(items):
        raise KeyError("model gone")

    batcher = DynamicBatcher(boom, max_batch_size=4, wait_s=0.05)

    async def main():
        return await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)

    try:
        errors = _run(main())
    finally:
        batcher.stop()
    assert all(isinstance(e, BatchFailed) for e in errors)
    assert len({id(e) for e in errors}) == 3 and all("model gone" in str(e) for e in errors)


def test_a_caller_that_gave_up_does_not_stop_the_others():
    def slow(items):
        time.sleep(0.3)
        return items

    batcher = DynamicBatcher(slow, max_batch_size=4, wait_s=0.05)

    async def main():
        impatient = asyncio.wait_for(batcher.submit("a"), 0.1)
        patient = batcher.submit("b")
        return await asyncio.gather(impatient, patient, return_exceptions=True)

    try:
        impatient, patient = _run(main())
        assert isinstance(impatient, TimeoutError) and patient == "b"
        assert _run(batcher.submit("c")) == "c"  # the worker is still serving
    finally:
        batcher.stop()


def test_a_handler_returning_the_wrong_count_fails_the_batch():
    batcher = DynamicBatcher(lambda items: items[:-1], max_batch_size=4, wait_s=0.0)
    try:
        with pytest.raises(RuntimeError, match="results for"):
            _run(batcher.submit(1))
    finally:
        batcher.stop()


def test_every_worker_keeps_serving_and_batches_run_side_by_side():
    """Two workers racing for one queue: the loser of a race waits for the next batch (it
    used to exit), and two batches run at once."""
    running, overlap, names = [0], [0], set()
    lock = threading.Lock()

    def handle(items):
        with lock:
            running[0] += 1
            overlap[0] = max(overlap[0], running[0])
            names.add(threading.current_thread().name)
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return items

    batcher = DynamicBatcher(handle, max_batch_size=4, wait_s=0.002, name="w", workers=2)

    async def waves():
        for wave in range(20):
            await asyncio.gather(*(batcher.submit(i) for i in range(wave % 7 + 1)))
        return await asyncio.gather(*(batcher.submit(i) for i in range(64)))

    try:
        assert _run(waves()) == list(range(64))
        assert all(t.is_alive() for t in batcher._threads)
        assert names == {"w_0", "w_1"} and overlap[0] == 2
    finally:
        batcher.stop()
    assert not any(t.is_alive() for t in batcher._threads)


def test_stop_fails_queued_requests_and_refuses_new_ones():
    release = threading.Event()

    def slow(items):
        release.wait(10)
        return items

    batcher = DynamicBatcher(slow, max_batch_size=1, wait_s=0.0)

    async def main():
        first = asyncio.ensure_future(batcher.submit(1))  # taken by the worker, blocks
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.05)
        threading.Thread(target=lambda: (time.sleep(0.1), release.set())).start()
        batcher.stop(timeout=5)
        with pytest.raises(BatcherStopped):
            await queued
        assert await first == 1
        with pytest.raises(BatcherStopped):
            await batcher.submit(3)

    _run(main())


def test_bad_settings_are_refused():
    for kwargs in ({"max_batch_size": 0}, {"wait_s": -1}, {"workers": 0}):
        with pytest.raises(ValueError):
            DynamicBatcher(lambda items: items, **kwargs)


def test_run_on_loop_is_bounded():
    async def main():
        loop = asyncio.get_running_loop()

        cancelled = asyncio.Event()

        async def sleeper():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        def from_thread():
            assert run_on_loop(asyncio.sleep(0, result=5), loop, 5) == 5
            with pytest.raises(TimeoutError):
                run_on_loop(sleeper(), loop, 0.05)

        await asyncio.to_thread(from_thread)
        await asyncio.wait_for(cancelled.wait(), 5)  # the timed-out coroutine was cancelled

    _run(main())


def test_pending_counts_queued_and_running_items():
    gate = threading.Event()
    seen = []

    def held(items):
        seen.append(len(items))
        gate.wait(10)
        return items

    batcher = DynamicBatcher(held, max_batch_size=2, wait_s=0.0)

    async def main():
        tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        during = batcher.pending()  # 2 running + 3 queued
        gate.set()
        await asyncio.gather(*tasks)
        return during

    try:
        assert _run(main()) == 5
        assert batcher.pending() == 0
    finally:
        batcher.stop()
