"""Idempotent consumers: an id handled successfully within the window is acked, not handled again."""

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from microagent_mq import ConfigurationError, MicroAgent, Queue, Retry, consumer, idempotency
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.idempotency import MemoryIdempotencyStore, store_for
from microagent_mq.outbox import SQLIdempotencyStore
from microagent_mq.transport import Delivery

from .conftest import REDIS_DSN, Calls, cleanup, make_broker, unique, wait_until
from .outbox_support import db_url


@pytest.fixture(params=['memory', pytest.param('redis', marks=pytest.mark.redis),
                        pytest.param('redis_cluster', marks=pytest.mark.redis_cluster)])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[AbstractQueueBroker]:
    namespace = unique('ns')
    if request.param == 'redis_cluster':
        request.getfixturevalue('redis_cluster_dsn')
    made = make_broker(request.param, namespace)
    yield made
    await made.close(grace=1)
    if request.param == 'redis_cluster':
        await cleanup('redis_cluster', namespace, [made])
    if request.param == 'redis':
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_DSN)
        keys = [k async for k in client.scan_iter(match=f'test:{namespace}:*', count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def agent_class(queue: Queue, calls: Calls, **options: object) -> type[MicroAgent]:
    class Agent(MicroAgent):
        @consumer(queue, **options)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})

    return Agent


async def drained(broker: AbstractQueueBroker, agent: MicroAgent, calls: Calls, handled: int,
                  duplicates: int) -> None:
    def done() -> bool:
        entry = agent.info()['consumers'][0]
        return len(calls) >= handled and entry['duplicates'] >= duplicates

    await wait_until(done, what=f'{handled} handled and {duplicates} duplicates')


async def test_a_message_id_seen_before_is_acked_without_the_handler(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    agent = agent_class(queue, calls, idempotent=True)(broker=broker)
    await agent.start()
    await broker.send(queue.name, {'n': 1}, message_id='m-1')
    await broker.send(queue.name, {'n': 1}, message_id='m-1')  # a relay's second publish
    await broker.send(queue.name, {'n': 2}, message_id='m-2')
    await drained(broker, agent, calls, handled=2, duplicates=1)
    await wait_until(lambda: _length_is(broker, queue.name, 0), what='the queue to drain')
    assert agent.info()['consumers'][0]['duplicates'] == 1
    await agent.stop()
    assert [c['n'] for c in calls.items] == [1, 2]


async def _length_is(broker: AbstractQueueBroker, name: str, length: int) -> bool:
    return await broker.queue_length(name) == length


async def test_without_idempotent_both_copies_are_handled(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    agent = agent_class(queue, calls)(broker=broker)
    await agent.start()
    for _ in range(2):
        await broker.send(queue.name, {'n': 1}, message_id='same')
    await calls.wait_for(2)
    assert 'duplicates' not in agent.info()['consumers'][0]
    await agent.stop()


async def test_a_failed_attempt_is_not_recorded(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue, idempotent=True, retry_delay=0)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})
            if len(calls) == 1:
                raise Retry(delay=0)

    agent = Agent(broker=broker)
    await agent.start()
    await broker.send(queue.name, {'n': 1}, message_id='m-1')
    await calls.wait_for(2)  # the retry ran the handler again: the failure was not recorded
    await broker.send(queue.name, {'n': 1}, message_id='m-1')
    await drained(broker, agent, calls, handled=2, duplicates=1)
    await agent.stop()
    assert len(calls) == 2


@pytest.mark.redis
async def test_redis_keeps_a_key_per_id_with_the_window_as_ttl() -> None:
    namespace = unique('ns')
    broker = make_broker('redis', namespace)
    queue, calls = Queue(unique()), Calls()
    agent = agent_class(queue, calls, idempotent=True, idempotency_window=600)(broker=broker)
    await agent.start()
    await broker.send(queue.name, {'n': 1}, message_id='m-1')
    await calls.wait_for(1)
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(REDIS_DSN)
    try:
        key = f'test:{namespace}:done:{queue.name}:m-1'
        await wait_until(lambda: client.exists(key), what='the record')
        assert 590 <= await client.ttl(key) <= 600
    finally:
        await agent.stop()
        keys = [k async for k in client.scan_iter(match=f'test:{namespace}:*')]
        if keys:
            await client.delete(*keys)
        await client.aclose()


class FlakyStore:
    """A store whose record or seen fails, as a process killed at that point would leave it."""

    def __init__(self, fail_record: bool = False, fail_seen: bool = False) -> None:
        self.inner = MemoryIdempotencyStore(unique('store'))
        self.fail_record, self.fail_seen = fail_record, fail_seen

    async def seen(self, queue: str, message_id: str) -> bool:
        if self.fail_seen:
            raise ConnectionError('store down')
        return await self.inner.seen(queue, message_id)

    async def record(self, queue: str, message_id: str, window_s: float) -> None:
        if self.fail_record:
            raise ConnectionError('store down')
        await self.inner.record(queue, message_id, window_s)

    async def close(self) -> None:
        return None


@pytest.mark.parametrize('failure', ['fail_record', 'fail_seen'])
async def test_the_remaining_window_handler_done_record_missing(failure: str) -> None:
    """Handler done, record never written (the process died there): the copy runs again.

    Same when the store cannot be asked: handling twice beats losing the message.
    """
    broker = make_broker('memory', unique('ns'))
    queue, calls = Queue(unique()), Calls()
    store = FlakyStore(**{failure: True})
    agent = agent_class(queue, calls, idempotent=True, idempotency_store=store)(broker=broker)
    await agent.start()
    for _ in range(2):
        await broker.send(queue.name, {'n': 1}, message_id='m-1')
    await calls.wait_for(2)
    assert agent.info()['consumers'][0]['duplicates'] == 0
    await agent.stop()


class HungStore(FlakyStore):
    """A store that never answers (a network partition without a reset)."""

    async def seen(self, queue: str, message_id: str) -> bool:
        await asyncio.Event().wait()
        return False

    async def record(self, queue: str, message_id: str, window_s: float) -> None:
        await asyncio.Event().wait()


async def test_a_hung_store_does_not_hold_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idempotency, 'STORE_TIMEOUT_S', 0.05)
    broker = make_broker('memory', unique('ns'))
    queue, calls = Queue(unique()), Calls()
    agent = agent_class(queue, calls, idempotent=True, idempotency_store=HungStore())(broker=broker)
    await agent.start()
    for n in range(3):
        await broker.send(queue.name, {'n': n})
    assert [item['n'] for item in await calls.wait_for(3)] == [0, 1, 2]
    await wait_until(lambda: _length_is(broker, queue.name, 0), what='every message acked')
    await agent.stop()


async def _length_is(broker: AbstractQueueBroker, name: str, expected: int) -> bool:
    return await broker.queue_length(name) == expected


async def test_the_window_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryIdempotencyStore(unique('store'))
    await store.record('q', 'm-1', 60)
    assert await store.seen('q', 'm-1')
    later = time.monotonic() + 61
    monkeypatch.setattr(idempotency.time, 'monotonic', lambda: later)
    assert not await store.seen('q', 'm-1')


def test_options_are_checked() -> None:
    queue = Queue(unique())
    with pytest.raises(ConfigurationError, match='idempotency_window'):
        consumer(queue, idempotent=True, idempotency_window=0)
    with pytest.raises(ConfigurationError, match='idempotent='):
        consumer(queue, idempotent='yes')
    with pytest.raises(ConfigurationError, match='idempotency_store'):
        consumer(queue, idempotent=True, idempotency_store=42)
    amqp = make_broker('memory', 'x')
    amqp.dsn = 'amqp://guest:guest@127.0.0.1/'
    with pytest.raises(ConfigurationError, match='needs idempotency_store='):
        store_for(None, amqp)


@pytest.mark.parametrize('kind', ['sqlite', 'postgres'])
async def test_sql_store_in_the_outbox_database(kind: str, tmp_path: Path) -> None:
    engine = create_async_engine(db_url(kind, tmp_path))
    store = SQLIdempotencyStore(engine, table=unique('mq_handled'))
    await store.create()
    broker = make_broker('memory', unique('ns'))
    queue, calls = Queue(unique()), Calls()
    agent = agent_class(queue, calls, idempotent=True, idempotency_store=store)(broker=broker)
    try:
        await agent.start()
        for n in (1, 1, 2, 1):
            await broker.send(queue.name, {'n': n}, message_id=f'm-{n}')
        await drained(broker, agent, calls, handled=2, duplicates=2)
        await agent.stop()
        assert [c['n'] for c in calls.items] == [1, 2]
        assert await store.seen(queue.name, 'm-2')
        assert await store.purge() == 0
    finally:
        await store.drop()
        await engine.dispose()



async def test_send_message_id_option(broker: AbstractQueueBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    from microagent_mq.engine import ConsumerRunner

    seen: list[str] = []
    original = ConsumerRunner._process

    async def spy(self: ConsumerRunner, delivery: Delivery) -> None:
        seen.append(delivery.message_id)
        await original(self, delivery)

    monkeypatch.setattr(ConsumerRunner, '_process', spy)
    queue, calls = Queue(unique()), Calls()
    for bad in ('', 'x' * 201, 42):
        with pytest.raises(ConfigurationError, match='invalid message_id'):
            await broker.send(queue.name, {'n': 1}, message_id=bad)
    await broker.send(queue.name, {'n': 1}, message_id='x' * 200)
    await broker.send(queue.name, {'n': 2})
    agent = agent_class(queue, calls)(broker=broker)
    await agent.start()
    await calls.wait_for(2)
    await agent.stop()
    assert seen[0] == 'x' * 200 and seen[1] != seen[0]
