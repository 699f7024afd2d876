"""Operators' primitives of ``AMQPBroker`` (admin commands): counts, purges, requeue by id.

RabbitMQ tells a queue's ready count (a passive declare) but neither how many of its
messages are unacknowledged nor how many wait in the delay ladder (shared by every queue):
those two are None. A purge deletes the ready messages; delayed ones still arrive when due.
"""

from typing import TYPE_CHECKING

import aio_pika
from aio_pika.abc import AbstractChannel

from ..queue import Queue
from ..transport import QueueStats
from .amqp_codec import headers_of, priority_of, sent_at_of

if TYPE_CHECKING:
    from .amqp import AMQPBroker


async def _count(channel: AbstractChannel, name: str) -> int:
    # A passive declare of a missing queue closes its channel: callers use a throwaway one.
    try:
        queue = await channel.declare_queue(name, passive=True)
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return 0
    return int(queue.declaration_result.message_count or 0)


async def stats(broker: 'AMQPBroker', name: str) -> QueueStats:
    """Ready and dead-letter counts of queue ``name``."""
    connection = await broker.connection()
    ready = await broker._length(name)  # a bounded queue's .due included
    async with connection.channel(publisher_confirms=False) as channel:
        dead = await _count(channel, f'{name}.dlq')
    return QueueStats(name, ready, None, None, dead)


async def purge(broker: 'AMQPBroker', name: str) -> int:
    """Delete the ready messages of queue ``name`` (a missing queue has none)."""
    connection = await broker.connection()
    async with connection.channel(publisher_confirms=False) as channel:
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return 0
        result = await queue.purge()
        return int(result.message_count or 0)


async def requeue_by_id(broker: 'AMQPBroker', name: str, ids: frozenset[str]) -> int:
    """Move the dead letters whose message id is in ``ids`` back to queue ``name``."""
    connection = await broker.connection()
    moved = 0
    async with connection.channel(publisher_confirms=False) as channel:
        dlq = await channel.declare_queue(f'{name}.dlq', durable=True)
        present = int(dlq.declaration_result.message_count or 0)
        await broker.declare(await broker.publish_channel(), Queue.get(name))
        # Every letter present is read once; those not chosen stay unacknowledged and go
        # back, in their order, when the channel closes (a nack would hand them out again).
        for _ in range(present):
            message = await dlq.get(no_ack=False, fail=False)
            if message is None:
                break
            if (message.message_id or '') in ids:
                await broker.republish(name, message.body, message.message_id or '', 1,
                                       user_headers=headers_of(message), sent_at=sent_at_of(message),
                                       priority=priority_of(message))
                await message.ack()
                moved += 1
    return moved
