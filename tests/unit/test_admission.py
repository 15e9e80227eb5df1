"""Admission: capacity + concurrency admitted, the rest shed at once, cancelled waiters leave."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from orchestrator.core.errors import Overloaded
from orchestrator.runtime.admission import Admission, Limiter, Slot


async def test_admits_concurrency_then_queues_capacity_then_sheds() -> None:
    adm = Admission("inference", capacity=3, concurrency=2)
    held = [await adm.acquire() for _ in range(2)]
    waiters = [asyncio.create_task(adm.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert (adm.active, adm.waiting) == (2, 3)
    with pytest.raises(Overloaded) as info:
        await adm.acquire()
    err = info.value
    assert err.stage == "inference"
    assert err.metadata == {"capacity": "3", "concurrency": "2"}
    assert err.retry_after_s is not None and err.retry_after_s > 0
    assert adm.stats.shed == 1
    # Releasing hands slots to waiters in FIFO order.
    held[0].release()
    first: Slot = await waiters[0]
    assert not waiters[1].done()
    assert (adm.active, adm.waiting) == (2, 2)
    first.release()
    held[1].release()
    for w in waiters[1:]:
        (await w).release()
    assert (adm.active, adm.waiting) == (0, 0)
    assert adm.stats.admitted == 5


async def test_cancelled_waiter_leaves_the_queue_at_once() -> None:
    adm = Admission("post", capacity=1, concurrency=1)
    slot = await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert adm.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.waiting == 0
    # The freed queue place is usable again.
    again = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    slot.release()
    (await again).release()
    assert adm.active == 0


async def test_slot_handed_to_a_cancelled_waiter_is_passed_on() -> None:
    adm = Admission("rag", capacity=2, concurrency=1)
    slot = await adm.acquire()
    a = asyncio.create_task(adm.acquire())
    b = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    slot.release()  # hands the slot to a ...
    a.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await a
    (await b).release()
    assert (adm.active, adm.waiting) == (0, 0)


async def test_zero_capacity_sheds_whenever_all_slots_are_busy() -> None:
    adm = Admission("stream", capacity=0, concurrency=1)
    async with await adm.acquire():
        with pytest.raises(Overloaded):
            await adm.acquire()
    async with await adm.acquire():
        pass


def test_rejects_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        Admission("x", capacity=1, concurrency=0)


async def test_random_arrivals_cancels_and_releases_keep_the_invariants() -> None:
    import random

    rng = random.Random(7)
    adm = Admission("x", capacity=5, concurrency=3)
    slots: list[Slot] = []
    waiters: list[asyncio.Task[Slot]] = []
    shed = 0
    for _ in range(2000):
        action = rng.random()
        if action < 0.45:
            task = asyncio.create_task(adm.acquire())
            await asyncio.sleep(0)
            if task.done() and task.exception() is not None:
                assert isinstance(task.exception(), Overloaded)
                shed += 1
            else:
                waiters.append(task)
        elif action < 0.8 and slots:
            slots.pop(rng.randrange(len(slots))).release()
        elif waiters:
            waiters.pop(rng.randrange(len(waiters))).cancel()
        await asyncio.sleep(0)
        for task in [t for t in waiters if t.done()]:
            waiters.remove(task)
            if not task.cancelled():
                slots.append(task.result())
        assert adm.active == len(slots) <= adm.concurrency
        assert adm.waiting <= adm.capacity
        assert adm.waiting == sum(1 for t in waiters if not t.done())
        assert adm.active == adm.concurrency or adm.waiting == 0  # never idle slots while someone waits
    assert adm.stats.shed == shed


def test_summaries_log_at_most_once_a_second_with_the_right_count_and_span() -> None:
    from orchestrator.runtime.stage import _Summary

    summary = _Summary()
    assert summary.note(1000.0) == (1, 0.0)  # the first of a process is logged at once, spanning no time
    assert summary.note(1000.2) is None
    assert summary.note(1000.5) is None
    count, seconds = summary.note(1001.1) or (0, 0.0)
    assert count == 3 and abs(seconds - 0.9) < 1e-9  # since the first unlogged one, not since the process began


async def test_a_request_that_would_outwait_its_deadline_or_the_bound_is_shed_at_once() -> None:
    adm = Admission("stream", capacity=10, concurrency=1, max_queue_wait_s=1.0)
    held = await adm.acquire()
    adm._mean_hold_s = 0.5  # measured: a slot is held half a second; one ahead, so a newcomer waits ~0.5 s
    with pytest.raises(Overloaded) as info:
        await adm.acquire(deadline_s=0.2)  # less time left than the wait it can expect
    assert info.value.metadata["reason"] == "expected_wait" and "its deadline" in info.value.message
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
    waiter = asyncio.create_task(adm.acquire(deadline_s=5.0))  # enough time left: it queues
    await asyncio.sleep(0)
    assert adm.waiting == 1
    adm._mean_hold_s = 0.8  # now a newcomer (two ahead) expects 1.6 s: over the 1 s bound
    with pytest.raises(Overloaded) as info:
        await adm.acquire(deadline_s=5.0)
    assert info.value.metadata["reason"] == "expected_wait" and "the bound" in info.value.message
    held.release()
    (await waiter).release()
    assert adm.stats.shed == 2 and (adm.active, adm.waiting) == (0, 0)


async def test_a_waiter_still_queued_when_the_bound_passes_is_shed_then() -> None:
    adm = Admission("post", capacity=10, concurrency=1, max_queue_wait_s=0.05)
    held = await adm.acquire()
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert adm.waiting == 1
    with pytest.raises(Overloaded) as info:
        await asyncio.wait_for(waiter, 2)
    assert info.value.metadata["reason"] == "queue_wait"
    assert (adm.waiting, adm.stats.shed) == (0, 1)
    held.release()
    assert adm.active == 0  # the slot was not handed to the waiter that left


def test_the_limit_shrinks_when_queueing_rises_and_grows_back() -> None:
    limiter = Limiter(100, min_limit=4, target_s=0.02, window_s=0.1, min_samples=5, smoothing=0.3)
    now, history = 0.0, []
    for _ in range(30):  # congested: requests waited 200 ms in the queues below
        for _ in range(5):
            now += 0.021
            limiter.sample(0.2, in_use=int(limiter.limit), now=now)
        history.append(limiter.limit)
    assert history[1] < 100 and all(b <= a for a, b in itertools.pairwise(history))
    assert limiter.limit == 4  # never below the floor
    for _ in range(60):  # the queues below are empty again, and the stage uses what it has
        for _ in range(5):
            now += 0.021
            limiter.sample(0.0, in_use=int(limiter.limit), now=now)
    assert limiter.limit == 100  # back to the configured concurrency, never above it
    limiter.sample(0.0, in_use=1, now=now + 1)  # barely used: no reason to grow (nor room to)
    assert limiter.limit == 100


async def test_an_adaptive_limit_admits_fewer_when_it_shrinks_and_more_when_it_grows() -> None:
    limiter = Limiter(4, min_limit=1)
    adm = Admission("stream", capacity=10, concurrency=4, limiter=limiter)
    limiter.limit = 2.0
    slots = [await adm.acquire() for _ in range(2)]
    waiter = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    assert (adm.active, adm.waiting, adm.concurrency) == (2, 1, 2)
    limiter.limit = 3.0
    slots.pop().release()  # a release admits as many waiters as the new limit allows
    slots.append(await waiter)
    assert (adm.active, adm.waiting) == (2, 0)
    for slot in slots:
        slot.release()
