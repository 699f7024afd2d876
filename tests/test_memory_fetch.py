"""The memory subscription's waiting fetch: one alarm serves many waits, never a late return.

A fetch waits until a put wakes it or its deadline; the alarm that ends the wait is kept
from one fetch to the next while it rings no later than theirs.
"""

import asyncio
import time
from typing import Any

from microagent_mq import Queue
from microagent_mq.tools.memory import MemoryBroker, MemorySubscription

from .conftest import unique


def subscription(name: str) -> tuple[MemoryBroker, MemorySubscription]:
    broker = MemoryBroker(f'memory://{unique("fetch")}')
    return broker, MemorySubscription(broker._get(name), name)


async def timed_fetch(sub: MemorySubscription, wait_s: float) -> tuple[Any, float]:
    started = time.monotonic()
    batch = await sub.fetch(10, wait_s)
    return batch, time.monotonic() - started


async def test_a_fetch_waits_its_own_time_on_an_empty_queue() -> None:
    _, sub = subscription(Queue(unique()).name)
    batch, took = await timed_fetch(sub, 0.2)
    assert batch == [] and 0.15 <= took < 0.6
    await sub.close()


async def test_a_shorter_wait_after_a_longer_one_is_not_held_to_its_alarm() -> None:
    queue = Queue(unique())
    broker, sub = subscription(queue.name)
    first = asyncio.create_task(sub.fetch(10, 1.0))  # arms an alarm a second away
    await asyncio.sleep(0.01)
    await broker.send(queue.name, {'n': 1})
    assert len(await first) == 1
    batch, took = await timed_fetch(sub, 0.05)  # its deadline comes first: an alarm of its own
    assert batch == [] and took < 0.5
    await sub.close()


async def test_a_longer_wait_outlasts_the_alarm_of_a_shorter_one() -> None:
    queue = Queue(unique())
    broker, sub = subscription(queue.name)
    first = asyncio.create_task(sub.fetch(10, 0.1))  # its alarm rings 0.1 s from now
    await asyncio.sleep(0.01)
    await broker.send(queue.name, {'n': 1})
    assert len(await first) == 1

    async def send_later() -> None:
        await asyncio.sleep(0.3)  # after that alarm rang
        await broker.send(queue.name, {'n': 2})

    sender = asyncio.create_task(send_later())
    batch, took = await timed_fetch(sub, 0.8)  # woken early by the old alarm: waits on
    await sender
    assert [d.body for d in batch] == [b'{"n":2}'] and 0.25 <= took < 0.7
    await sub.close()


async def test_a_stop_wakes_a_waiting_fetch_at_once() -> None:
    _, sub = subscription(Queue(unique()).name)
    waiting = asyncio.create_task(timed_fetch(sub, 1.0))
    await asyncio.sleep(0.05)
    await sub.stop_fetching()
    batch, took = await waiting
    assert batch == [] and took < 0.5
    await sub.close()
