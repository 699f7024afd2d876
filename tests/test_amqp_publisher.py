"""RabbitMQ, ``amqp_publisher``: concurrent publishes in one write, each confirmed on its own."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import ChannelNotFoundEntity, PublishError
from pamqp.commands import Basic

from microagent_mq import Queue
from microagent_mq.tools import amqp_wire
from microagent_mq.tools.amqp import AMQPBroker
from microagent_mq.tools.amqp_codec import CONTENT_TYPE, PERSISTENT
from microagent_mq.tools.amqp_errors import is_transient
from microagent_mq.tools.amqp_publisher import Publisher, publisher_of

from .conftest import AMQP_DSN, unique

pytestmark = pytest.mark.amqp


@pytest.fixture
def broker_kind() -> str:
    """conftest's ``broker`` fixture, on RabbitMQ only: it closes and deletes what was declared."""
    return 'amqp'


@dataclass
class Setup:
    """A confirming channel of the test's own (as the broker's publish channel), a queue."""

    connection: AbstractRobustConnection
    channel: AbstractChannel
    queue: str

    async def ready(self) -> int:
        """The messages in the queue (a robust channel keeps its first declare: a new one)."""
        async with self.connection.channel() as counting:
            queue = await counting.declare_queue(self.queue, passive=True)
            return int(queue.declaration_result.message_count or 0)


@pytest.fixture
async def setup() -> AsyncIterator[Setup]:
    connection: AbstractRobustConnection = await aio_pika.connect_robust(AMQP_DSN)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(unique(), durable=True)
        try:
            yield Setup(connection, channel, queue.name)
        finally:
            async with connection.channel() as cleaning:
                await cleaning.queue_delete(queue.name)


async def publisher(channel: AbstractChannel) -> Publisher:
    return publisher_of(await channel.get_underlay_channel())  # type: ignore[arg-type]


def publish(publisher: Publisher, routing_key: str, i: int, exchange: str = '') -> Any:
    message_id = f'm-{i}'
    properties = amqp_wire.properties(CONTENT_TYPE, {'x-attempt': 1}, PERSISTENT, 0, message_id)
    return publisher.publish(f'{{"n":{i}}}'.encode(), properties, message_id,
                             exchange=exchange, routing_key=routing_key, mandatory=True)


async def test_concurrent_sends_leave_in_one_write(broker: AMQPBroker,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': -1})  # connected, declared
    connection = await broker.connection()
    assert connection.transport is not None
    write_queue = connection.transport.connection.write_queue
    items: list[Any] = []
    put_nowait = write_queue.put_nowait
    monkeypatch.setattr(write_queue, 'put_nowait', lambda item: (items.append(item),
                                                                 put_nowait(item))[1])
    await asyncio.gather(*(broker.send(queue.name, {'n': i}) for i in range(100)))
    assert len(items) <= 3  # aiormq's own publish: one write-queue item, one write, each
    assert await broker.queue_length(queue.name) == 101


async def test_each_publish_gets_its_own_answer_among_concurrent_ones(
        setup: Setup) -> None:
    """Every 10th publish is unroutable (returned); only those fail: tags and ids line up."""
    channel, name = setup.channel, setup.queue
    ours = await publisher(channel)
    results = await asyncio.gather(
        *(publish(ours, name if i % 10 else unique('missing'), i) for i in range(100)),
        return_exceptions=True)
    for i, result in enumerate(results):
        if i % 10:
            assert isinstance(result, Basic.Ack), (i, result)
        else:
            assert isinstance(result, PublishError), (i, result)
    assert await setup.ready() == 90
    underlay = await channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)
    assert not underlay.confirmations and not underlay.message_id_delivery_tag  # nothing kept


async def test_publishes_beside_aiormq_ones_on_the_same_channel_are_confirmed(
        setup: Setup) -> None:
    """aiormq's publishes (aio-pika's ``Exchange.publish``: a retry, a dead letter) take tags
    from the same count, and hold the channel's lock: ours wait for it, then line up."""
    channel, name = setup.channel, setup.queue
    ours = await publisher(channel)
    underlay = await channel.get_underlay_channel()
    assert isinstance(underlay, aiormq.Channel)

    async def theirs(i: int) -> Any:
        return await channel.default_exchange.publish(
            aio_pika.Message(b'{}', message_id=f't-{i}'), name if i % 2 else unique('missing'))

    async with underlay.lock:  # ours meanwhile: under the lock once it is free
        held = [asyncio.ensure_future(publish(ours, name, i)) for i in range(20)]
        await asyncio.sleep(0.05)
        assert not any(future.done() for future in held)
    mixed = [publish(ours, name if i % 3 else unique('missing'), i) for i in range(100, 160)]
    mixed += [theirs(i) for i in range(40)]
    results = await asyncio.gather(*held, *mixed, return_exceptions=True)
    assert all(isinstance(result, Basic.Ack) for result in results[:20])
    for i, result in zip(range(100, 160), results[20:80], strict=True):
        assert isinstance(result, Basic.Ack if i % 3 else PublishError), (i, result)
    for i, result in enumerate(results[80:]):
        assert isinstance(result, Basic.Ack if i % 2 else PublishError), (i, result)
    assert await setup.ready() == 20 + 40 + 20


async def test_publishes_after_one_that_closes_the_channel_fail_instead_of_waiting(
        setup: Setup) -> None:
    """A publish to a missing exchange closes the channel: RabbitMQ confirms nothing after
    it, so the publishes written with it must fail (a transient error: sent again), not hang."""
    channel, name = setup.channel, setup.queue
    ours = await publisher(channel)
    results = await asyncio.wait_for(asyncio.gather(
        *(publish(ours, name, i, exchange=unique('no_such_exchange') if i == 50 else '')
          for i in range(100)), return_exceptions=True), 10)
    failed = [result for result in results if isinstance(result, BaseException)]
    assert failed and all(is_transient(error) for error in failed)
    assert any(isinstance(error, ChannelNotFoundEntity) for error in failed)
    with pytest.raises(Exception) as raised:  # the closed channel's publisher refuses at once
        await asyncio.wait_for(publish(ours, name, 200), 5)
    assert is_transient(raised.value)


async def test_a_cancelled_send_is_not_written(setup: Setup) -> None:
    channel, name = setup.channel, setup.queue
    ours = await publisher(channel)
    cancelled = asyncio.ensure_future(publish(ours, name, 0))
    kept = asyncio.ensure_future(publish(ours, name, 1))
    await asyncio.sleep(0)  # both wait for the turn's write
    cancelled.cancel()
    assert isinstance(await kept, Basic.Ack)
    assert await setup.ready() == 1
