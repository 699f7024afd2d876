"""Redis specifics of issue 13: priority level streams, retention in the streams, bounds in Lua.

The behaviour every broker shares is in the contract suite; here: keys, what stays in the
streams, what the scripts refuse, and crashes with priorities and retention.
"""

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from microagent_mq import MicroAgent, Queue, QueueFull, consumer
from microagent_mq.tools.redis import RedisBroker

from .conftest import REDIS_DSN, Calls, cleanup, require_server, unique, wait_until
from .test_crash import Workers

pytestmark = pytest.mark.redis


@pytest.fixture
async def broker() -> AsyncIterator[RedisBroker]:
    require_server('redis')
    namespace = unique('ns')
    made = RedisBroker(REDIS_DSN, prefix=f'test:{namespace}:')
    yield made
    await made.close(grace=1)
    await cleanup('redis', namespace, [made])


def keys_of(broker: RedisBroker) -> Any:
    async def keys() -> list[bytes]:
        client: Any = broker.client
        return sorted(k for k in await client.keys(f'{broker.prefix}*') if b':sent:' not in k)
    return keys()


async def test_one_stream_per_level_and_a_plain_queue_keeps_its_keys(broker: RedisBroker) -> None:
    Queue('ranked', max_priority=2)
    Queue('plain')
    await broker.send('ranked', {'n': 0})
    await broker.send('ranked', {'n': 1}, priority=1)
    await broker.send('ranked', {'n': 2}, priority=2)
    await broker.send('plain', {'n': 3})
    await broker.send_many('plain', [{'n': 4}, {'n': 5}])
    p = broker.prefix
    assert await keys_of(broker) == [f'{p}plain'.encode(), f'{p}ranked'.encode(),
                                     f'{p}ranked:clock'.encode(), f'{p}ranked:p1'.encode(),
                                     f'{p}ranked:p2'.encode()]
    client: Any = broker.client
    for key, n in ((f'{p}ranked', 0), (f'{p}ranked:p1', 1), (f'{p}ranked:p2', 2)):
        [(_, fields)] = await client.xrange(key)
        assert fields[b'body'] == f'{{"n":{n}}}'.encode()
    [(_, fields), *_] = await client.xrange(f'{p}plain')
    assert set(fields) == {b'body', b'id', b'ts'}
    assert await broker.queue_length('ranked') == 3


async def test_a_fetch_takes_the_highest_levels_first_and_no_more_than_asked(
        broker: RedisBroker) -> None:
    Queue('ranked', max_priority=2)
    for n, level in enumerate([0, 1, 2, 0, 1, 2, 0]):
        await broker.send('ranked', {'n': n}, priority=level)
    seen: list[int] = []
    for size in (2, 2, 3):
        batch = await broker.receive('ranked', max_count=size, wait=1)
        assert len(batch) == size  # XREADGROUP's COUNT is per stream: never more than asked
        seen += [one.data['n'] for one in batch]
        for one in batch:
            await one.ack()
    assert seen == [2, 5, 1, 4, 0, 3, 6]
    assert await broker.queue_length('ranked') == 0
    assert await broker.client.xlen(broker.stream_key('ranked')) == 0  # no retention: deleted


async def test_a_retry_and_a_requeued_dead_letter_keep_their_level(broker: RedisBroker) -> None:
    ranked = Queue('ranked', max_priority=3)
    calls = Calls()
    failed: set[int] = set()

    class Agent(MicroAgent):
        @consumer(ranked, concurrency=1, max_attempts=2, retry_delay=0.05)
        async def handle(self, n: int) -> None:
            calls.items.append({'n': n})
            calls._changed.set()
            if n == 1 and n not in failed:
                failed.add(n)
                raise RuntimeError('once')
            if n == 2:
                raise RuntimeError('always')

    await broker.send('ranked', {'n': 1}, priority=3)
    await broker.send('ranked', {'n': 2}, priority=2)
    agent = Agent(broker=broker)
    await agent.start()

    async def dead() -> bool:
        return len(await broker.dead_letters('ranked')) == 1

    await wait_until(dead, what='n=2 dead-lettered')
    await wait_until(lambda: [c['n'] for c in calls.items].count(1) == 2, what='n=1 retried')
    await agent.stop()
    client: Any = broker.client
    assert await client.xlen(broker.stream_key('ranked')) == 0  # never in level 0
    [letter] = await client.xrange(broker.dead_key('ranked'))
    assert letter[1][b'priority'] == b'2'
    assert await broker.requeue_dead_letters('ranked') == 1
    [(_, fields)] = await client.xrange(broker.stream_key('ranked') + ':p2')
    assert fields[b'body'] == b'{"n":2}'
    [received] = await broker.receive('ranked', wait=1)
    assert received._delivery.priority == 2
    await received.ack()


async def test_retention_keeps_handled_entries_and_length_counts_what_waits(
        broker: RedisBroker) -> None:
    kept = Queue('kept', retention='1h')
    calls = Calls()
    tried: set[int] = set()

    class Agent(MicroAgent):
        @consumer(kept, concurrency=1, retry_delay=0.05)
        async def handle(self, n: int) -> None:
            if n == 1 and n not in tried:
                tried.add(n)
                raise RuntimeError('once')
            calls.items.append({'n': n})
            calls._changed.set()

    await broker.send_many('kept', [{'n': 0}, {'n': 1}, {'n': 2}])
    assert await broker.queue_length('kept') == 3
    agent = Agent(broker=broker)
    await agent.start()
    await wait_until(lambda: sorted(c['n'] for c in calls.items) == [0, 1, 2], what='handled')
    await agent.stop()
    await broker.send('kept', {'n': 3})
    assert await broker.queue_length('kept') == 1  # handled ones are kept, not waiting
    # the original three, the retry's copy of n=1, and n=3
    assert await broker.client.xlen(broker.stream_key('kept')) == 5
    history = await broker.history('kept')
    assert [entry.data['n'] for entry in history] == [0, 1, 2, 3]  # the copy is not listed


async def test_trim_removes_handled_entries_past_retention_only(broker: RedisBroker) -> None:
    kept = Queue('kept', retention=1)
    release = asyncio.Event()
    started: list[int] = []

    class Agent(MicroAgent):
        @consumer(kept, concurrency=1)
        async def handle(self, n: int) -> None:
            started.append(n)
            if n == 1:  # held, unhandled, while the trim runs
                await release.wait()

    await broker.send_many('kept', [{'n': 0}, {'n': 1}, {'n': 2}])
    agent = Agent(broker=broker)
    await agent.start()
    await wait_until(lambda: started == [0, 1], what='n=1 in the handler')
    await asyncio.sleep(1.2)  # past the retention of every entry (the trim is what we test)
    await broker._trim()
    stream = broker.stream_key('kept')
    left = [fields[b'body'] for _, fields in await broker.client.xrange(stream)]
    assert left == [b'{"n":1}', b'{"n":2}']  # n=0 handled: trimmed; n=1 held, n=2 waiting: kept
    release.set()
    await wait_until(lambda: started == [0, 1, 2], what='all handled')

    async def acked() -> bool:
        return (await broker.client.xpending(stream, 'microagent_mq'))['pending'] == 0

    await wait_until(acked, what='all acked')
    await asyncio.sleep(1.1)
    await broker._trim()  # still consuming: the mover trims the queues it consumes
    assert await broker.client.xlen(stream) == 0
    await agent.stop()
    assert await broker.history('kept') == []


async def test_history_ends_at_the_retention_even_before_a_trim(broker: RedisBroker) -> None:
    Queue('kept', retention=1)
    await broker.send('kept', {'n': 0})
    assert [entry.data for entry in await broker.history('kept')] == [{'n': 0}]
    await asyncio.sleep(1.1)
    await broker.send('kept', {'n': 1})
    assert [entry.data for entry in await broker.history('kept')] == [{'n': 1}]
    assert await broker.queue_length('kept') == 2  # unhandled: still waits, never trimmed


async def test_queue_full_stores_nothing_anywhere(broker: RedisBroker) -> None:
    Queue('small', max_length=2, exchange='fan')
    Queue('large', max_length=10, exchange='fan')
    await broker.send('small', {'n': 0})
    with pytest.raises(QueueFull, match="queue 'small' is full"):
        await broker.send_many('small', [{'n': 1}, {'n': 2}])
    assert await broker.client.xlen(broker.stream_key('small')) == 1
    with pytest.raises(QueueFull):
        await broker.send_many('fan', [{'n': 3}, {'n': 4}])  # fits in large, not in small
    assert await broker.client.exists(broker.stream_key('large')) == 0
    await broker.send('fan', {'n': 5})
    with pytest.raises(QueueFull):
        await broker.send('small', {'n': 6}, headers={'k': 'v'})
    assert await broker.queue_length('small') == 2
    assert await broker.queue_length('large') == 1
    await broker.send('small', {'n': 7}, delay=30)  # delayed: counts once due
    assert await broker.client.zcard(broker.delayed_key('small')) == 1


async def test_drop_oldest_drops_only_undelivered_entries(broker: RedisBroker) -> None:
    Queue('capped', max_length=2, overflow='drop_oldest', retention=3600)
    await broker.send('capped', {'n': 0})
    [held] = await broker.receive('capped', wait=1)  # pending: never dropped
    for n in (1, 2, 3):
        await broker.send('capped', {'n': n})
    assert await broker.queue_length('capped') == 2
    await held.ack()
    got = [one.data['n'] for one in await broker.receive('capped', max_count=5, wait=1)]
    assert got == [2, 3]  # 1 was the oldest waiting


async def test_a_retry_into_a_full_queue_is_never_lost(broker: RedisBroker) -> None:
    Queue('small', max_length=1)
    await broker.send('small', {'n': 0})
    [first] = await broker.receive('small', wait=1, retry_delay=0.01)
    await broker.send('small', {'n': 1})  # the queue is full again
    await first.retry(delay=0.01)
    got: list[int] = []
    deadline = time.monotonic() + 10
    while len(got) < 2 and time.monotonic() < deadline:
        for one in await broker.receive('small', max_count=2, wait=0.5):
            got.append(one.data['n'])
            await one.ack()
    assert sorted(got) == [0, 1]


async def test_sigkill_with_priorities_and_retention_loses_nothing(
        broker: RedisBroker, tmp_path: Path) -> None:
    declared = {'max_priority': 2, 'retention': 3600}
    queue = Queue(unique(), **declared)
    namespace = broker.prefix.removeprefix('test:').removesuffix(':')
    workers = Workers('redis', namespace, queue.name, tmp_path)
    options = {'timeout': 1, 'visibility_timeout': 2, 'queue': declared}
    try:
        doomed = await workers.start('hang', **options)
        await broker.send(queue.name, {'n': 1}, priority=2)
        await wait_until(lambda: bool(workers.started(1)), what='handler started')
        await broker.send(queue.name, {'n': 2}, priority=1)
        await broker.send(queue.name, {'n': 3})
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        await workers.start('record', **options)
        await wait_until(lambda: sorted(workers.handled()) == [1, 2, 3], timeout_s=30,
                         what='every message handled after the kill')
        assert len(workers.handled()) == 3  # once each
        assert await broker.queue_length(queue.name) == 0
        assert [entry.data['n'] for entry in await broker.history(queue.name)] == [1, 2, 3]
    finally:
        workers.kill_all()


@pytest.mark.parametrize('options', [{'max_priority': 2}, {'retention': 3600}])
async def test_a_level_consumer_renews_what_it_holds(broker: RedisBroker,
                                                     options: dict[str, Any]) -> None:
    """Messages waiting in a level consumer's buffer past the visibility stay its own.

    The heartbeat sleeps while a consumer holds nothing; a level queue's fetch must wake it,
    or another consumer takes the buffered messages over as abandoned (with max_attempts=1:
    dead-lettered, never handled).
    """
    other = RedisBroker(REDIS_DSN, prefix=broker.prefix)
    queue, counts = Queue(unique(), **options), Calls()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=1, prefetch=10, visibility_timeout=2, timeout=1,
                  max_attempts=1)
        async def handle(self, n: int) -> None:
            counts.add({'n': n})
            await asyncio.sleep(0.8)  # 6 messages: the last waits ~4 s in the buffer

    await broker.send_many(queue.name, [{'n': n} for n in range(6)])
    first = Agent(broker=broker)
    await first.start()
    await counts.wait_for(1)
    second = Agent(broker=other)  # would take over what the first one stopped renewing
    await second.start()
    try:
        await wait_until(lambda: len(counts) >= 6, what='6 handlings')
        await asyncio.sleep(0.5)
        assert sorted(item['n'] for item in counts.items) == list(range(6))
        assert await broker.dead_letters(queue.name) == []
    finally:
        await second.stop()
        await other.close()


@pytest.mark.parametrize('options', [{'max_priority': 2}, {'retention': 60}, {}])
async def test_a_retry_tells_the_mover_of_its_queue(broker: RedisBroker, options: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A retry's delayed message is polled for from the next poll on, on every kind of queue
    (without the poke, only the mover's discovery finds it: up to DISCOVER_S late)."""
    queue, calls = Queue(unique(), **options), Calls()
    poked: list[str] = []
    real = type(broker._delayed).poke

    def poke(mover: Any, name: str) -> None:
        poked.append(name)
        real(mover, name)

    monkeypatch.setattr(type(broker._delayed), 'poke', poke)

    class Agent(MicroAgent):
        @consumer(queue, max_attempts=2, retry_delay=0.01)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})
            if len(calls.items) == 1:
                raise RuntimeError('once')

    agent = Agent(broker=broker)
    await agent.start()
    try:
        await broker.send(queue.name, {'n': 1})
        await calls.wait_for(2)
        assert poked.count(queue.name) == 1
    finally:
        await agent.stop(grace=1)
