"""Redis delivery at the edges: graceful stops, releases, lengths, takeovers, foreign entries."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from microagent_mq import MicroAgent, Queue, Reject, consumer
from microagent_mq.tools.redis import RedisBroker
from microagent_mq.tools.redis_consumer import GROUP, RELEASED_IDLE_MS, RedisSubscription
from microagent_mq.transport import Outgoing

from .conftest import REDIS_DSN, Calls, require_server, unique, wait_until

pytestmark = pytest.mark.redis
Brokers = Callable[[], RedisBroker]


@pytest.fixture
async def brokers() -> AsyncIterator[Brokers]:
    """Redis brokers sharing one key prefix (as separate processes would); cleaned up after."""
    require_server('redis')
    prefix = f'test:{unique("ns")}:'
    made: list[RedisBroker] = []

    def make() -> RedisBroker:
        made.append(RedisBroker(REDIS_DSN, prefix=prefix))
        return made[-1]

    yield make
    for broker in made:
        await broker.close(grace=1)
    if made:
        client: Any = made[0].client
        keys = [k async for k in client.scan_iter(match=f'{prefix}*', count=1000)]
        if keys:
            await client.delete(*keys)
        await made[0].close()


async def start(broker: RedisBroker, queue: Queue, handler: Callable[..., Awaitable[None]],
                **options: Any) -> MicroAgent:
    class Agent(MicroAgent):
        @consumer(queue, **options)
        async def handle(self, **data: Any) -> None:
            await handler(**data)

    agent = Agent(broker=broker)
    await agent.start()
    return agent


async def subscription(broker: RedisBroker, queue: str, visibility_s: float = 60.0
                       ) -> RedisSubscription:
    sub = RedisSubscription(broker, queue, visibility_s)
    await sub.create_group()
    return sub


async def pending(broker: RedisBroker, queue: str, consumer_name: str | None = None
                  ) -> list[dict[str, Any]]:
    client: Any = broker.client
    kwargs = {'consumername': consumer_name} if consumer_name else {}
    return list(await client.xpending_range(broker.stream_key(queue), GROUP, '-', '+', 10_000,
                                            **kwargs))


async def test_graceful_stops_under_load_strand_nothing(brokers: Brokers) -> None:
    """Item 3: a stop while XREADGROUP is in flight leaves nothing hidden in the stopped
    consumer's pending list; the next consumer gets everything at once, as first attempts."""
    queue, sender = Queue(unique()), brokers()
    handled: list[int] = []
    sent = 0
    producing = True

    async def produce() -> None:
        nonlocal sent
        while producing:
            await sender.send(queue.name, {'n': sent})
            sent += 1
            await asyncio.sleep(0.001)  # pacing: a message every millisecond or so

    async def handler(n: int) -> None:
        handled.append(n)

    # A visibility far beyond the test's deadlines: a stranded message would never come back.
    options = {'max_attempts': 1, 'timeout': 1, 'visibility_timeout': 120}
    producer = asyncio.create_task(produce())
    try:
        for _ in range(15):
            broker = brokers()
            agent = await start(broker, queue, handler, **options)
            before = len(handled)
            await wait_until(lambda b=before: len(handled) > b, what='a message handled')
            await agent.stop(grace=5)
            left = await pending(broker, queue.name, broker.uid)
            assert all(p['time_since_delivered'] >= RELEASED_IDLE_MS // 2 for p in left), left
    finally:
        producing = False
        await producer
    await start(brokers(), queue, handler, **options)
    await wait_until(lambda: len(handled) >= sent, what='every message handled')
    assert sorted(handled) == list(range(sent))  # each once: none stranded, none counted twice
    assert await sender.dead_letters(queue.name) == []
    assert await sender.queue_length(queue.name) == 0


async def test_stop_fetching_ends_a_waiting_read_and_starts_no_other(brokers: Brokers) -> None:
    broker, queue = brokers(), Queue(unique()).name
    sub = await subscription(broker, queue)
    await broker.client.xadd(broker.stream_key(queue), {'body': b'{"n":1}', 'id': 'a'})
    first = await sub.fetch(10)
    assert [d.message_id for d in first] == ['a']
    waiting = asyncio.create_task(sub.fetch(10))  # blocks in XREADGROUP on an empty stream
    await asyncio.sleep(0)
    await sub.stop_fetching()
    assert await asyncio.wait_for(waiting, 5) == []
    await broker.client.xadd(broker.stream_key(queue), {'body': b'{"n":2}', 'id': 'b'})
    assert await sub.fetch(10) == []  # no read after stop_fetching: 'b' stays waiting
    await sub.release(first)
    assert await broker._length(queue) == 2
    await sub.close()
    assert await broker._length(queue) == 2


async def test_released_buffer_is_waiting_and_costs_no_attempt(brokers: Brokers) -> None:
    """Item 9 and the 'release counts an attempt' mutant: a graceful stop's released buffer
    counts in queue_length and comes back as first attempts (max_attempts=1 would otherwise
    dead-letter it)."""
    first, queue = brokers(), Queue(unique())
    started, go_on = asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    async def slow(n: int) -> None:
        started.set()
        await go_on.wait()
        handled.append(n)

    await first.send_many(queue.name, [{'n': n} for n in range(5)])
    agent = await start(first, queue, slow, max_attempts=1, prefetch=8)
    await asyncio.wait_for(started.wait(), 10)  # the other four wait in its buffer
    assert await first.queue_length(queue.name) == 0
    stopping = asyncio.create_task(agent.stop(grace=10))
    await wait_until(lambda: first._runners == {}, what='stop under way')
    go_on.set()
    await stopping
    assert handled == [0]
    assert await first.queue_length(queue.name) == 4

    async def record(n: int) -> None:
        handled.append(n)

    await start(brokers(), queue, record, max_attempts=1)
    await wait_until(lambda: len(handled) == 5, what='the released four')
    assert handled == [0, 1, 2, 3, 4]
    assert await first.dead_letters(queue.name) == []


async def test_length_leaves_out_the_message_being_handled(brokers: Brokers) -> None:
    """Mutant: a queue_length that ignores in-flight messages."""
    broker, queue = brokers(), Queue(unique())
    started, go_on = asyncio.Event(), asyncio.Event()

    async def slow(n: int) -> None:
        started.set()
        await go_on.wait()

    await broker.send_many(queue.name, [{'n': n} for n in range(3)])
    agent = await start(broker, queue, slow, prefetch=0)
    await asyncio.wait_for(started.wait(), 10)
    assert await broker.queue_length(queue.name) == 2
    go_on.set()
    await wait_until(lambda: _zero(broker, queue.name), what='all handled')
    await agent.stop(grace=5)


async def _zero(broker: RedisBroker, queue: str) -> bool:
    return await broker.queue_length(queue) == 0 and not await pending(broker, queue)


async def test_due_delayed_message_counts_without_a_consumer(brokers: Brokers) -> None:
    """Item 9: no consumer runs the mover here; a due delayed message is still waiting."""
    broker, queue = brokers(), Queue(unique())
    await broker.send(queue.name, {'n': 1}, delay=0.2)
    await broker.send(queue.name, {'n': 2}, delay=3600)
    await wait_until(lambda: _length_is(broker, queue.name, 1), what='the due one counted')


async def _length_is(broker: RedisBroker, queue: str, expected: int) -> bool:
    return await broker.queue_length(queue) == expected


async def test_close_flushes_acks(brokers: Brokers) -> None:
    """Mutant: acks not flushed on close (close runs before the ack timer fires)."""
    broker, queue = brokers(), Queue(unique()).name
    sub = await subscription(broker, queue)
    await broker.send_many(queue, [{'n': n} for n in range(3)])
    deliveries = await sub.fetch(10)
    for delivery in deliveries:
        await sub.ack(delivery)
    await sub.close()
    assert await pending(broker, queue) == []
    assert await broker.client.xlen(broker.stream_key(queue)) == 0


async def test_ack_after_broker_closed_does_not_reconnect(brokers: Brokers) -> None:
    """Item 15: an ack timer (or a heartbeat) that fires after close() must not make a new
    client."""
    broker, queue = brokers(), Queue(unique()).name
    sub = await subscription(broker, queue)
    await broker.send(queue, {'n': 1})
    [delivery] = await sub.fetch(10)
    await broker.close()
    assert await sub.renew(sub.held()) == []  # a heartbeat after close does nothing
    assert broker._client is None
    await sub.ack(delivery)  # arms the flush timer
    await wait_until(lambda: sub._ack_flush is not None and sub._ack_flush.done(),
                     what='the flush ran')
    assert broker._client is None
    await sub.close()
    assert broker._client is None


async def test_extend_never_undoes_a_takeover(brokers: Brokers) -> None:
    """Item 14: a takeover between extend()'s check and its claim must stand."""
    broker, queue = brokers(), Queue(unique()).name
    mine = await subscription(broker, queue)
    await broker.send(queue, {'n': 1})
    [delivery] = await mine.fetch(10)
    client: Any = broker.client
    other = brokers()
    original = client.execute_command
    commands = 0

    async def then_taken_over(*args: Any, **kwargs: Any) -> Any:
        nonlocal commands
        result = await original(*args, **kwargs)
        commands += 1
        if commands == 1:  # right after extend's first command, another consumer claims it
            await other.client.xclaim(broker.stream_key(queue), GROUP, 'other', 0,
                                      [delivery.handle], justid=True)
        return result

    client.execute_command = then_taken_over
    try:
        renewed = await mine.extend(delivery)
    finally:
        client.execute_command = original
    [entry] = await pending(broker, queue)
    assert entry['consumer'] == b'other'
    assert renewed  # it held the message when it renewed it, in one command
    assert await mine.extend(delivery) is False  # it knows the message is gone
    await mine.close()


async def test_requeue_moves_a_snapshot_while_a_consumer_keeps_rejecting(
        brokers: Brokers) -> None:
    """Item 8: what a live consumer rejects again is not moved again by the same call."""
    broker, queue = brokers(), Queue(unique())

    async def reject(n: int) -> None:
        raise Reject('still broken')

    await start(broker, queue, reject, concurrency=8)
    await broker.send_many(queue.name, [{'n': n} for n in range(300)])
    await wait_until(lambda: _dead_count(broker, queue.name, 300), what='300 dead letters')
    assert await broker.requeue_dead_letters(queue.name) == 300
    await wait_until(lambda: _dead_count(broker, queue.name, 300), what='rejected again')


async def _dead_count(broker: RedisBroker, queue: str, expected: int) -> bool:
    return len(await broker.dead_letters(queue, limit=10_000)) == expected


async def test_foreign_entries_on_fetch(brokers: Brokers) -> None:
    """Item 16: an entry with only a body works (its stream id is its message id); one with
    no body is dead-lettered with the reason; neither fails the others of its batch."""
    broker, queue = brokers(), Queue(unique()).name
    sub = await subscription(broker, queue)
    stream = broker.stream_key(queue)
    client: Any = broker.client
    only_body = await client.xadd(stream, {'body': b'{"n":1}'})
    await client.xadd(stream, {'payload': b'{"n":2}'})
    await client.xadd(stream, {'body': b'{"n":3}', 'id': 'x', 'attempt': 'lots', 'ts': 'soon'})
    await broker.send(queue, {'n': 4})
    deliveries = await sub.fetch(10)
    assert [d.body for d in deliveries] == [b'{"n":1}', b'{"n":3}', b'{"n":4}']
    assert deliveries[0].message_id == only_body.decode()
    assert [d.attempt for d in deliveries] == [1, 1, 1]
    assert deliveries[0].sent_at == 0.0 and deliveries[0].headers is None
    [letter] = await broker.dead_letters(queue)
    assert 'no body field' in letter.error and 'payload' in letter.error
    for delivery in deliveries:
        await sub.ack(delivery)
    await sub.close()


async def test_foreign_entries_on_takeover(brokers: Brokers) -> None:
    """Item 16: a bad entry among a dead consumer's messages does not block their recovery."""
    broker, queue = brokers(), Queue(unique())
    stream = broker.stream_key(queue.name)
    client: Any = broker.client
    await client.xgroup_create(stream, GROUP, id='0', mkstream=True)
    await client.xadd(stream, {'body': b'{"n":1}'})
    await client.xadd(stream, {'nothing': b'useful'})
    await broker.send(queue.name, {'n': 2})
    await client.xreadgroup(GROUP, 'dead', {stream: '>'}, count=10)  # then it died
    calls = Calls()

    async def record(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, record, timeout=0.5, visibility_timeout=1)
    assert await calls.wait_for(2) == [{'n': 1}, {'n': 2}]
    await wait_until(lambda: _dead_count(broker, queue.name, 1), what='the bad one dead')


async def test_headers_and_sent_at_survive_every_path(brokers: Brokers) -> None:
    broker, queue = brokers(), Queue(unique()).name
    sub = await subscription(broker, queue, visibility_s=60)
    headers = {'trace': 'abc', 'n': [1, 2], 'nested': {'x': None}}

    def outgoing(delay: float = 0.0, with_headers: bool = True) -> Outgoing:
        return Outgoing(b'{"n":1}', f'm-{unique()}', (queue,), delay=delay,
                        headers=headers if with_headers else None, sent_at=1234.5)

    await broker._publish([outgoing()])
    await broker._publish([outgoing(with_headers=False)])
    first, plain = await sub.fetch(10)
    assert (first.headers, first.sent_at, first.attempt) == (headers, 1234.5, 1)
    assert (plain.headers, plain.sent_at) == (None, 1234.5)
    await sub.ack(plain)
    await sub.retry_later(first, 0.001, 'again')  # delayed, then moved by the mover
    [retried] = await _fetch_until(broker, sub, 1)
    assert (retried.headers, retried.sent_at, retried.attempt) == (headers, 1234.5, 2)
    await sub.release([retried])
    other = await subscription(brokers(), queue)
    [claimed] = await other.fetch(10)
    assert (claimed.headers, claimed.sent_at, claimed.attempt) == (headers, 1234.5, 2)
    await other.dead_letter(claimed, 'given up')
    [letter] = await broker.dead_letters(queue)
    assert letter.attempts == 2 and letter.error == 'given up'
    assert await broker._requeue_dead_letters(queue) == 1
    [requeued] = await other.fetch(10)
    assert (requeued.headers, requeued.sent_at, requeued.attempt) == (headers, 1234.5, 1)
    await other.ack(requeued)
    await broker._publish([outgoing(delay=0.001), outgoing(), outgoing(with_headers=False)])
    delivered = await _fetch_until(broker, other, 3)
    assert sorted(d.headers is None for d in delivered) == [False, False, True]
    assert {d.sent_at for d in delivered} == {1234.5}
    for delivery in delivered:
        await other.ack(delivery)
    await sub.close()
    await other.close()


async def _fetch_until(broker: RedisBroker, sub: RedisSubscription, count: int) -> list[Any]:
    """Fetch until ``count`` arrived, moving due delayed messages as the mover would."""
    got: list[Any] = []
    async with asyncio.timeout(10):
        while len(got) < count:
            await broker._move_some([sub._queue])
            got += await sub.fetch(10, 0.2)  # bounded: an idle fetch may wait 10 s
    return got


async def test_mover_moves_a_large_backlog_at_once(brokers: Brokers) -> None:
    """Item 15: 3,000 due messages move in one burst of commands (batches of 1,000, again
    at once while more are due), not 100 per queue per poll."""
    broker, queue = brokers(), Queue(unique()).name
    await broker.send_many(queue, [{'n': n} for n in range(3000)], delay=0.001)
    await wait_until(lambda: _length_is(broker, queue, 3000), what='all due')
    left_after_burst: list[int] = []
    move = broker._delayed.move

    async def recording(queues: list[str]) -> list[str]:
        more = await move(queues)
        if not more:  # the end of a burst: the mover waits for the next poll now
            left_after_burst.append(await broker.client.zcard(broker.delayed_key(queue)))
        return more

    broker._delayed.move = recording  # type: ignore[method-assign]
    broker._delayed.watch(queue)
    await wait_until(lambda: bool(left_after_burst), what='a burst of moves')
    assert left_after_burst[0] == 0
    assert await broker.client.xlen(broker.stream_key(queue)) == 3000


async def test_dead_consumers_are_forgotten(brokers: Brokers) -> None:
    """Item 15: consumers idle far beyond the visibility with nothing pending leave the group;
    one with pending messages stays (deleting it would lose them)."""
    broker, queue = brokers(), Queue(unique()).name
    stream = broker.stream_key(queue)
    client: Any = broker.client
    await client.xgroup_create(stream, GROUP, id='0', mkstream=True)
    await client.xgroup_createconsumer(stream, GROUP, 'gone')
    await broker.send(queue, {'n': 1})
    await client.xreadgroup(GROUP, 'holding', {stream: '>'}, count=1)
    sub = await subscription(broker, queue)
    sub._tidy_idle_ms = 200  # instead of ten visibility timeouts (at least a minute)

    async def names() -> set[bytes]:
        return {c['name'] for c in await client.xinfo_consumers(stream, GROUP)}

    async def tidied() -> bool:
        sub._next_tidy = sub._next_claim = 0.0
        await sub.fetch(1, 0)  # no wait: an idle fetch would wait in the shared read
        return b'gone' not in await names()

    await wait_until(tidied, what='the idle consumer forgotten')
    assert b'holding' in await names()
    await sub.close()
