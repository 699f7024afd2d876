"""RabbitMQ, publishing side: declarations before delayed sends, the delay ladder, bindings."""

import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection

from microagent_mq import ConfigurationError, MicroAgent, Queue, Retry, consumer
from microagent_mq.tools.amqp import AMQPBroker
from microagent_mq.tools.amqp_codec import attempt_of, headers_of, sent_at_of
from microagent_mq.tools.amqp_delay import LEVELS, MAX_DELAY_S, ladder_queue_names, level_name
from microagent_mq.transport import Outgoing

from .conftest import AMQP_DSN, Calls, unique, wait_until

pytestmark = pytest.mark.amqp


@pytest.fixture
def broker_kind() -> str:
    """conftest's ``broker`` fixture, on RabbitMQ only: it closes and deletes what was declared."""
    return 'amqp'


@pytest.fixture
async def raw() -> AsyncIterator[AbstractRobustConnection]:
    """A plain aio-pika connection of the test's own, to look at RabbitMQ behind the broker."""
    connection = await aio_pika.connect_robust(AMQP_DSN)
    async with connection:
        yield connection


async def start(broker: AMQPBroker, queue: Queue, calls: Calls) -> MicroAgent:
    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, **data: Any) -> None:
            calls.add({**data, 'at': time.monotonic()})

    agent = Agent(broker=broker)
    await agent.start()
    return agent


async def length_is(broker: AMQPBroker, name: str, expected: int) -> bool:
    return await broker.queue_length(name) == expected


# issue 8, item 1 -------------------------------------------------------------------------

async def test_delayed_send_to_a_queue_never_declared_arrives(broker: AMQPBroker) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': 1}, delay=0.2)  # the first thing ever sent to it
    await wait_until(lambda: length_is(broker, queue.name, 1), what='the delayed message')


async def test_delayed_send_to_an_exchange_reaches_each_queue_never_declared(
        broker: AMQPBroker) -> None:
    exchange = unique('ex')
    everything, users, others = (Queue(unique(), exchange), Queue(unique(), exchange, ('user.*',)),
                                 Queue(unique(), exchange, ('order.*',)))
    await broker.send(exchange, {'n': 1}, topic='user.created', delay=0.2)
    await wait_until(lambda: length_is(broker, everything.name, 1), what='the fanout copy')
    await wait_until(lambda: length_is(broker, users.name, 1), what='the topic copy')
    assert await broker.queue_length(others.name) == 0


# issue 8, item 13: the ladder --------------------------------------------------------------

async def test_many_distinct_delays_use_only_the_ladder_queues(
        broker: AMQPBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = Queue(unique())
    declared: set[str] = set()
    declare_queue = aio_pika.RobustChannel.declare_queue

    async def spy(self: aio_pika.RobustChannel, name: str | None = None, **kwargs: Any) -> Any:
        declared.add(str(name))
        return await declare_queue(self, name, **kwargs)

    monkeypatch.setattr(aio_pika.RobustChannel, 'declare_queue', spy)
    for i in range(200):  # 200 distinct delays between 30 and 60 s
        await broker.send(queue.name, {'n': i}, delay=30 + i * 0.15)
    delay_queues = declared - {queue.name, f'{queue.name}.bindings'}
    assert delay_queues <= set(ladder_queue_names())
    assert len(delay_queues) <= LEVELS
    assert await broker.queue_length(queue.name) == 0  # all still waiting


async def test_delay_ladder_queues_are_durable_fixed_and_never_expire(
        broker: AMQPBroker, raw: AbstractRobustConnection) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': 1}, delay=5)
    for level in range(LEVELS):
        below = level_name(level - 1) if level else 'microagent_mq.delay.deliver'
        arguments = {'x-message-ttl': 2 ** level, 'x-dead-letter-exchange': below}
        async with raw.channel() as channel:
            # RabbitMQ refuses a declaration that differs from the queue's own (durable,
            # x-message-ttl, x-dead-letter-exchange, x-expires): this one must be equal.
            await channel.declare_queue(level_name(level), durable=True, arguments=arguments)
    for differing in ({'durable': False, 'arguments': arguments},
                      {'durable': True, 'arguments': {**arguments, 'x-expires': 3_600_000}}):
        channel = await raw.channel()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
            await channel.declare_queue(level_name(LEVELS - 1), **differing)  # type: ignore[arg-type]
    assert await broker.queue_length(queue.name) == 0


@pytest.mark.parametrize('delay', [float('inf'), MAX_DELAY_S + 0.001])
async def test_a_delay_beyond_the_ladder_is_refused_and_nothing_is_sent(
        broker: AMQPBroker, delay: float) -> None:
    queue = Queue(unique())
    with pytest.raises(ConfigurationError, match='invalid delay'):
        await broker.send_many(queue.name, [{'n': 1}, {'n': 2}], delay=delay)
    await broker.send(queue.name, {'n': 3})
    assert await broker.queue_length(queue.name) == 1


async def test_a_long_delay_does_not_hold_up_a_short_one(broker: AMQPBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    await start(broker, queue, calls)
    sent = time.monotonic()
    await broker.send(queue.name, {'n': 'slow'}, delay=60)
    await broker.send(queue.name, {'n': 'fast'}, delay=0.2)
    items = await calls.wait_for(1)
    assert [c['n'] for c in items] == ['fast']
    assert items[0]['at'] - sent >= 0.2


async def test_delays_never_arrive_before_their_time(broker: AMQPBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    await start(broker, queue, calls)
    delays = [1.3, 0.75, 0.511, 0.25, 0.05, 0.001]
    sent: dict[float, float] = {}
    for delay in delays:
        sent[delay] = time.monotonic()
        await broker.send(queue.name, {'n': delay}, delay=delay)
    items = await calls.wait_for(len(delays))
    assert sorted(c['n'] for c in items) == sorted(delays)
    for item in items:
        assert item['at'] - sent[item['n']] >= item['n'], item


async def test_delayed_and_exchange_sends_carry_headers_and_sent_at(
        broker: AMQPBroker, raw: AbstractRobustConnection) -> None:
    exchange = unique('ex')
    direct, bound = Queue(unique()), Queue(unique(), exchange)
    headers, sent_at = {'trace': 'abc', 'list': [1, 2.5, None]}, 1_800_000_000.123
    await broker._publish([
        Outgoing(b'{"n": 1}', 'm1', (direct.name,), delay=0.1, headers=headers, sent_at=sent_at),
        Outgoing(b'{"n": 2}', 'm2', (bound.name,), exchange, headers=headers, sent_at=sent_at),
        Outgoing(b'{"n": 3}', 'm3', (bound.name,), exchange, delay=0.1, headers=headers,
                 sent_at=sent_at),
    ])
    await wait_until(lambda: length_is(broker, direct.name, 1), what='the delayed message')
    await wait_until(lambda: length_is(broker, bound.name, 2), what='the exchange messages')
    async with raw.channel() as channel:
        for name, count in ((direct.name, 1), (bound.name, 2)):
            amqp_queue = await channel.get_queue(name)
            for _ in range(count):
                message = await amqp_queue.get()
                assert headers_of(message) == headers
                assert sent_at_of(message) == pytest.approx(sent_at, abs=0.001)
                assert message.message_id in {'m1', 'm2', 'm3'}


async def test_retries_wait_on_the_ladder_too(
        broker: AMQPBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    queue, calls = Queue(unique()), Calls()
    declared: set[str] = set()
    declare_queue = aio_pika.RobustChannel.declare_queue

    async def spy(self: aio_pika.RobustChannel, name: str | None = None, **kwargs: Any) -> Any:
        declared.add(str(name))
        return await declare_queue(self, name, **kwargs)

    monkeypatch.setattr(aio_pika.RobustChannel, 'declare_queue', spy)

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            calls.add({'n': n, 'at': time.monotonic()})
            if len(calls) == 1:
                raise Retry(delay=0.3)

    await Agent(broker=broker).start()
    await broker.send(queue.name, {'n': 1})
    first, second = await calls.wait_for(2)
    assert second['at'] - first['at'] >= 0.3
    own = {queue.name, f'{queue.name}.dlq', f'{queue.name}.bindings'}
    assert declared - own <= set(ladder_queue_names())


async def test_republish_keeps_the_senders_metadata_and_adds_transport_headers(
        broker: AMQPBroker, raw: AbstractRobustConnection) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': 0})
    async with raw.channel() as channel:
        amqp_queue = await channel.get_queue(queue.name)
        await amqp_queue.get()  # the declaring send, out of the way
        for delay in (0.0, 0.1):
            await broker.republish(queue.name, b'{"n": 1}', 'm1', 3, delay, {'x-error': 'boom'},
                                   user_headers={'trace': 't1'}, sent_at=1_800_000_000.5)
            await wait_until(lambda: length_is(broker, queue.name, 1), what='the republished copy')
            message = await amqp_queue.get()
            assert (message.body, message.message_id) == (b'{"n": 1}', 'm1')
            assert headers_of(message) == {'trace': 't1'}
            assert sent_at_of(message) == 1_800_000_000.5
            assert attempt_of(message) == 3
            assert message.headers['x-error'] == 'boom'


# issue 8, item 10: stale bindings ------------------------------------------------------------

async def test_a_queue_declared_again_with_other_topics_loses_the_old_bindings() -> None:
    exchange, name = unique('ex'), unique()
    Queue(name, exchange, ('user.*',))
    first = AMQPBroker(AMQP_DSN)
    try:
        await first.send(exchange, {'n': 1}, topic='user.created')
        assert await first.queue_length(name) == 1
    finally:
        await first.close()
    Queue.reset()  # the next release of the service declares the queue with other topics
    Queue(name, exchange, ('order.*',))
    second = AMQPBroker(AMQP_DSN)
    try:
        await second.send(exchange, {'n': 2}, topic='order.paid')
        await second.send(exchange, {'n': 3}, topic='user.created')  # no longer taken
        assert await second.queue_length(name) == 2
    finally:
        await second.close()
        await _delete([name, f'{name}.bindings'], [exchange])


async def test_a_queue_that_left_its_exchange_loses_its_bindings() -> None:
    exchange, name, other = unique('ex'), unique(), unique()
    Queue(name, exchange)
    Queue(other, exchange)  # keeps the exchange declared in the second release
    first = AMQPBroker(AMQP_DSN)
    try:
        await first.send(exchange, {'n': 1})
    finally:
        await first.close()
    Queue.reset()
    Queue(name)
    Queue(other, exchange)
    second = AMQPBroker(AMQP_DSN)
    try:
        await second.send(name, {'n': 2})
        await second.send(exchange, {'n': 3})
        assert await second.queue_length(name) == 2  # 1 and 2, not 3
        assert await second.queue_length(other) == 2  # 1 and 3
    finally:
        await second.close()
        await _delete([name, other, f'{name}.bindings', f'{other}.bindings'], [exchange])


async def test_bindings_to_an_exchange_deleted_meanwhile_are_skipped() -> None:
    old_exchange, new_exchange, name = unique('ex'), unique('ex'), unique()
    Queue(name, old_exchange, ('a.*',))
    first = AMQPBroker(AMQP_DSN)
    try:
        await first.send(old_exchange, {'n': 1}, topic='a.b')
    finally:
        await first.close()
    await _delete([], [old_exchange])  # its bindings went with it; the record still has them
    Queue.reset()
    Queue(name, new_exchange, ('b.*',))
    second = AMQPBroker(AMQP_DSN)
    try:
        await second.send(new_exchange, {'n': 2}, topic='b.c')
        await second.send(name, {'n': 3})
        assert await second.queue_length(name) == 3
    finally:
        await second.close()
    third = AMQPBroker(AMQP_DSN)  # the record now holds only the new binding: nothing to undo
    try:
        await third.send(new_exchange, {'n': 4}, topic='b.d')
        assert await third.queue_length(name) == 4
    finally:
        await third.close()
        await _delete([name, f'{name}.bindings'], [new_exchange])


async def _delete(queues: list[str], exchanges: list[str]) -> None:
    connection = await aio_pika.connect(AMQP_DSN)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)
