"""The topic bindings we made for a queue, remembered in RabbitMQ, so stale ones can be unbound.

AMQP 0-9-1 cannot list a queue's bindings, and a binding outlives the declaration that made it:
a queue declared again with other topics would keep taking the old ones. So for queue ``q`` we
keep a record, ``q.bindings``: a durable queue of at most one persistent message
(``x-max-length`` 1: a new record pushes the old one out), whose body is the JSON list of the
``[exchange, pattern]`` pairs we bound. On each declaration (a consumer's start, a broker's
first send to the queue) ``sync_bindings`` reads the record, unbinds every pair the declaration
no longer has, and writes the new record. A queue that never had an exchange gets no record;
one whose exchange was dropped loses its bindings and its record. The last declaration wins:
during a rolling deploy, old and new code each restore their own bindings when they declare.
Bindings made by hand (not recorded) are never touched.
"""

from collections.abc import Iterable

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import ChannelNotFoundEntity

Pair = tuple[str, str]
RECORD_ARGUMENTS = {'x-max-length': 1}


def record_name(queue: str) -> str:
    """The queue that holds the record of ``queue``'s bindings."""
    return f'{queue}.bindings'


async def sync_bindings(connection: AbstractRobustConnection, queue: str,
                        wanted: Iterable[Pair]) -> None:
    """Unbind from ``queue`` what an earlier declaration bound and ``wanted`` lacks; record ``wanted``.

    ``wanted`` must already be bound. Throwaway channels: a missing record or exchange closes one.
    """
    wanted = set(wanted)
    async with connection.channel() as channel:
        try:
            record = await channel.declare_queue(
                record_name(queue), durable=True, passive=not wanted, arguments=RECORD_ARGUMENTS)
        except ChannelNotFoundEntity:
            return  # never bound by us, and nothing to bind now
        held = await record.get(no_ack=False, fail=False)
        recorded = _pairs(held)
        if wanted and recorded == wanted:
            if held is not None:
                await held.reject(requeue=True)
            return
        await _unbind(connection, queue, recorded - wanted)
        if not wanted:  # the queue left its exchange: nothing more to remember
            await channel.queue_delete(record.name)
            return
        await channel.default_exchange.publish(_record(wanted), record.name)
        if held is not None:
            await held.ack()


async def _unbind(connection: AbstractRobustConnection, queue: str, pairs: set[Pair]) -> None:
    channel: AbstractChannel | None = None
    try:
        for exchange, pattern in sorted(pairs):
            if channel is None or channel.is_closed:
                channel = await connection.channel(publisher_confirms=False)
            try:
                amqp_queue = await channel.get_queue(queue, ensure=False)
                await amqp_queue.unbind(exchange, pattern)
            except ChannelNotFoundEntity:
                # The exchange (or queue) is gone, and its bindings with it. RabbitMQ 3.10
                # answers such an unbind with ok; the AMQP spec lets a server close the channel.
                pass
    finally:
        if channel is not None and not channel.is_closed:
            await channel.close()


def _pairs(message: AbstractIncomingMessage | None) -> set[Pair]:
    if message is None:
        return set()
    try:
        value = orjson.loads(message.body)
        return {(str(exchange), str(pattern)) for exchange, pattern in value}
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return set()  # unreadable: start a fresh record


def _record(pairs: set[Pair]) -> aio_pika.Message:
    return aio_pika.Message(orjson.dumps(sorted(pairs)), content_type='application/json',
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
