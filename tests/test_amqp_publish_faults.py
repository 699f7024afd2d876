"""RabbitMQ, publishing side under faults: channels, partial batches, errors, dead letters."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractRobustConnection
from yarl import URL

from microagent_mq import BrokerUnavailable, MicroAgent, Queue, Reject, consumer
from microagent_mq.tools.amqp import AMQPBroker
from microagent_mq.tools.amqp_codec import failed_at_of, outgoing_message
from microagent_mq.tools.amqp_errors import is_transient
from microagent_mq.tools.amqp_publisher import Publisher

from .conftest import AMQP_DSN, Calls, free_port, unique, wait_until

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


async def length_is(broker: AMQPBroker, name: str, expected: int) -> bool:
    return await broker.queue_length(name) == expected


async def dlq_length(raw: AbstractRobustConnection, name: str) -> int:
    async with raw.channel() as channel:
        queue = await channel.declare_queue(f'{name}.dlq', passive=True)
        return int(queue.declaration_result.message_count or 0)


class FailOnce:
    """Wraps every publish (``Publisher.enqueue``: a send's; aiormq's ``Channel.basic_publish``:
    through aio-pika's ``Exchange.publish``): the publish of one chosen body raises ``error``
    once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, body: bytes | None,
                 error: BaseException) -> None:
        self.calls, self.body, self.error, self.failed = 0, body, error, False
        publish, enqueue = aiormq.Channel.basic_publish, Publisher.enqueue

        async def wrapped_publish(channel: Any, body: bytes, **kwargs: Any) -> Any:
            self._count(body)
            return await publish(channel, body, **kwargs)

        def wrapped_enqueue(publisher: Publisher, body: bytes, *args: Any, **kwargs: Any) -> Any:
            self._count(body)
            return enqueue(publisher, body, *args, **kwargs)

        monkeypatch.setattr(aiormq.Channel, 'basic_publish', wrapped_publish)
        monkeypatch.setattr(Publisher, 'enqueue', wrapped_enqueue)

    def _count(self, body: bytes) -> None:
        self.calls += 1
        if not self.failed and self.body in (None, body):
            self.failed = True
            raise self.error


# issue 8, item 12 -------------------------------------------------------------------------

async def test_concurrent_first_sends_open_one_publish_channel(broker: AMQPBroker) -> None:
    queue = Queue(unique())
    await asyncio.gather(*(broker.send(queue.name, {'n': i}) for i in range(50)))
    connection = await broker.connection()
    assert connection.transport is not None
    open_channels = [n for n, c in connection.transport.connection.channels.items()
                     if c is not None and not c.is_closed]
    assert len(open_channels) == 1  # the publish channel; throwaway ones are closed
    assert await broker.queue_length(queue.name) == 50


# issue 8, item 15 -------------------------------------------------------------------------

async def test_send_many_resends_only_what_failed(
        broker: AMQPBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': -1})  # declared; the batch then meets one failure
    FailOnce(monkeypatch, b'{"n":5}', ConnectionError('connection reset in the middle'))
    await broker.send_many(queue.name, [{'n': i} for i in range(10)])
    assert await broker.queue_length(queue.name) == 11  # not 1 + 10 + 9 resent


async def test_a_bug_raising_runtime_error_is_not_retried(
        broker: AMQPBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': 0})
    broker.send_timeout = 5
    spy = FailOnce(monkeypatch, None, RuntimeError('a bug, not a connection problem'))
    with pytest.raises(RuntimeError, match='a bug'):
        await broker.send(queue.name, {'n': 1})
    assert spy.calls == 1


async def test_runtime_error_of_a_reconnecting_connection_is_retried(
        broker: AMQPBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': 0})
    # the very error aio-pika raises when asked for a channel while its connection is down
    down = aio_pika.RobustConnection(URL(AMQP_DSN))
    with pytest.raises(RuntimeError) as raised:
        down.channel()
    assert is_transient(raised.value)
    spy = FailOnce(monkeypatch, None, raised.value)
    await broker.send(queue.name, {'n': 1})
    assert spy.calls == 2
    assert await broker.queue_length(queue.name) == 2


def test_only_connection_wordings_of_runtime_error_are_transient() -> None:
    assert not is_transient(RuntimeError('Collection frozen'))
    assert not is_transient(RuntimeError())
    assert not is_transient(ValueError('Connection was not opened'))
    assert is_transient(RuntimeError('<aiormq.connection.Connection object at 0x7f> closed'))
    assert is_transient(aio_pika.exceptions.ChannelInvalidStateError('No active transport'))


async def test_dead_letter_time_keeps_its_precision(broker: AMQPBroker) -> None:
    queue = Queue(unique())

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            raise Reject('no')

    await Agent(broker=broker).start()
    before = time.time()
    await broker.send(queue.name, {'n': 1})
    await wait_until(lambda: _has_dead_letters(broker, queue.name, 1), what='the dead letter')
    after = time.time()
    [letter] = await broker.dead_letters(queue.name)
    assert before - 0.001 <= letter.failed_at <= after  # a 32-bit float is off by up to 64 s


async def test_dead_letter_time_is_read_in_both_forms(raw: AbstractRobustConnection) -> None:
    name = unique()
    async with raw.channel() as channel:
        amqp_queue = await channel.declare_queue(name, auto_delete=True)
        at = 1_800_000_063.25
        await channel.default_exchange.publish(outgoing_message(
            b'{}', 'new', 2, extra={'x-failed-at': at}), name)
        await channel.default_exchange.publish(aio_pika.Message(
            b'{}', message_id='old', headers={'x-failed-at': 1_800_000_000.0}), name)
        new, old = await amqp_queue.get(), await amqp_queue.get()
        assert failed_at_of(new) == pytest.approx(at, abs=0.001)
        assert failed_at_of(old) == 1_800_000_000.0
        await channel.queue_delete(name)


async def _has_dead_letters(broker: AMQPBroker, name: str, count: int) -> bool:
    return len(await broker.dead_letters(name)) == count


# issue 8, item 8 --------------------------------------------------------------------------

async def test_requeue_moves_the_dead_letters_present_while_a_consumer_rejects_them(
        broker: AMQPBroker, raw: AbstractRobustConnection) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=4)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})
            raise Reject('still no')

    await Agent(broker=broker).start()
    await broker.send_many(queue.name, [{'n': i} for i in range(20)])
    await wait_until(lambda: _dlq_is(raw, queue.name, 20), what='20 dead letters')
    assert await broker.requeue_dead_letters(queue.name) == 20
    await calls.wait_for(40)
    await wait_until(lambda: _dlq_is(raw, queue.name, 20), what='20 dead letters again')
    assert sorted(c['n'] for c in calls.items) == sorted(list(range(20)) * 2)


async def _dlq_is(raw: AbstractRobustConnection, name: str, count: int) -> bool:
    return await dlq_length(raw, name) == count


# issue 8, item 16 -------------------------------------------------------------------------

async def test_a_foreign_message_without_headers_or_id_is_handled_and_dead_lettered(
        broker: AMQPBroker, raw: AbstractRobustConnection) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})
            if n == 2:
                raise Reject('two is refused')

    await Agent(broker=broker).start()
    async with raw.channel() as channel:  # a producer that knows nothing of this library
        for n in (1, 2):
            await channel.default_exchange.publish(aio_pika.Message(f'{{"n": {n}}}'.encode()),
                                                   queue.name)
    assert await calls.wait_for(2) == [{'n': 1}, {'n': 2}]
    await wait_until(lambda: _has_dead_letters(broker, queue.name, 1), what='the dead letter')
    [letter] = await broker.dead_letters(queue.name)
    assert letter.data == {'n': 2}
    assert 'two is refused' in letter.error
    assert letter.attempts == 1


# issue 8, item 17 -------------------------------------------------------------------------

async def test_first_connection_is_retried_within_send_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    Queue('mailer')
    broker = AMQPBroker(f'amqp://guest:guest@127.0.0.1:{free_port()}/', connect_timeout=1,
                        send_timeout=1.5)
    with caplog.at_level(logging.WARNING, logger='microagent_mq.broker'):
        with pytest.raises(BrokerUnavailable):
            await broker.mailer.send({'a': 1})
    attempts = [r for r in caplog.records if r.getMessage().startswith('Connecting to RabbitMQ')]
    assert len(attempts) >= 3
    await broker.close()
