"""How a batch of ``Outgoing`` messages becomes RabbitMQ publishes: one per copy.

A message is one copy, published to its queue or to its exchange with its topic; a delayed
message is one copy per queue it goes to, published into the delay ladder (``amqp_delay``)
with the queue in its ``mq-delay-to`` header (a bounded queue's ``.due``: ``amqp_options``).
Copies are what a failed batch sends again. A queue with retention takes a journal copy
(``amqp_journal``): in the same publish (``BCC``) when sent directly, else a copy of its own
published into the journal after the message's other copies were confirmed.
"""

import asyncio
import math
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange
from aiormq.exceptions import DeliveryError
from pamqp.commands import Basic

from ..exceptions import ConfigurationError, QueueFull
from ..queue import Queue
from ..transport import Outgoing
from .amqp_codec import outgoing_properties
from .amqp_delay import DESTINATION_HEADER, MAX_DELAY_S, delay_ms, entry_exchange, routing_key
from .amqp_errors import is_transient
from .amqp_journal import has_journal, journal_name
from .amqp_options import is_bounded, reentry
from .amqp_publisher import Pending, Publisher, publisher_of


@dataclass(slots=True)
class Copy:
    """One ``basic.publish`` of a batch: a message, or its delayed copy for one of its queues."""

    message: Outgoing
    delayed_to: str = ''  # the destination queue of a delayed copy
    journal: str = ''  # a journal copy: published there once the message's others are stored


def copies_of(message: Outgoing) -> list[Copy]:
    """The publishes a message takes (none for a delayed send that no queue takes)."""
    if message.delay > 0:
        copies = [Copy(message, reentry(queue)) for queue in message.queues]
        return copies + journal_copies(message)
    if not message.exchange and is_bounded(message.queues[0]):
        return [Copy(message), *journal_copies(message)]  # see amqp_journal: after the confirm
    return [Copy(message)]


def journal_copies(message: Outgoing) -> list[Copy]:
    """A copy for the journal of each of the message's queues that keeps one."""
    return [Copy(message, journal=journal_name(q)) for q in message.queues if has_journal(q)]


def check_delay(delay: float) -> None:
    """Refuse a delay the ladder cannot hold, before anything of a batch is published."""
    if not math.isfinite(delay) or delay > MAX_DELAY_S:
        raise ConfigurationError(
            f'invalid delay {delay!r}: RabbitMQ delays up to {MAX_DELAY_S:.0f} s (49.7 days)')


def exchange_of(copy: Copy) -> str:
    """The exchange a copy is published to: the ladder's entry, the message's, or none."""
    if copy.journal:
        return ''
    if copy.delayed_to:
        return entry_exchange(delay_ms(copy.message.delay))
    return copy.message.exchange


async def send(channel: AbstractChannel, copy: Copy) -> Any:
    """Publish one copy on ``channel`` (a confirming one); return once RabbitMQ confirmed it.

    Straight on aiormq's channel through ``amqp_publisher`` (the copies sent at the same time
    leave in one write), with aio-pika's errors (a nack, an unroutable message with
    ``on_return_raises``: aiormq raises them), minus what concurrent sends pay for nothing:
    an ``aio_pika.Message`` per copy, and the wait until the frames left the socket (the
    confirm, which comes after, is what a send waits for).
    """
    publisher = await publisher_for(channel)
    pending = enqueue(publisher, copy)
    try:
        return await pending.future
    finally:
        publisher.forget(pending)


async def publisher_for(channel: AbstractChannel) -> Publisher:
    """The publisher of the aiormq channel under ``channel`` (a new one after a reconnection)."""
    publisher = _PUBLISHERS.get(channel)
    if publisher is None or publisher.closed:
        underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        publisher = _PUBLISHERS[channel] = publisher_of(underlay)
    return publisher


_PUBLISHERS: 'weakref.WeakKeyDictionary[AbstractChannel, Publisher]' = weakref.WeakKeyDictionary()


def enqueue(publisher: Publisher, copy: Copy) -> Pending:
    """Hand one copy to the publisher: to its queue, exchange, delay ladder or journal."""
    message = copy.message
    if copy.journal:
        return publisher.enqueue(message.body, properties_of(message), message.message_id,
                                 exchange='', routing_key=copy.journal, mandatory=True)
    if copy.delayed_to:
        ms = delay_ms(message.delay)
        return publisher.enqueue(
            message.body, properties_of(message, {DESTINATION_HEADER: copy.delayed_to}),
            message.message_id, exchange=entry_exchange(ms), routing_key=routing_key(ms),
            mandatory=True)
    if message.exchange:
        return publisher.enqueue(message.body, properties_of(message), message.message_id,
                                 exchange=message.exchange, routing_key=message.topic,
                                 mandatory=False)
    queue = message.queues[0]
    # One publish to the queue and its journal (see amqp_journal); a bounded queue's copy
    # is a Copy of its own instead.
    extra = {'BCC': [journal_name(queue)]} if has_journal(queue) and not is_bounded(queue) else None
    return publisher.enqueue(message.body, properties_of(message, extra), message.message_id,
                             exchange='', routing_key=queue, mandatory=True)


def properties_of(message: Outgoing, extra: dict[str, Any] | None = None) -> bytes:
    """A first attempt, with the sender's metadata; ``extra``: transport headers."""
    return outgoing_properties(message.message_id, 1, headers=message.headers,
                               sent_at=message.sent_at, extra=extra, priority=message.priority)


async def publish_copies(channel: AbstractChannel, exchanges: dict[str, AbstractExchange],
                         copies: list[Copy]) -> tuple[list[Copy], BaseException | None]:
    """Publish every copy: the messages, then the journal copies of those stored.

    Returns the copies that failed for a transient reason (to send again) and the first such
    error. Raises ``QueueFull`` when a full bounded queue refused a message (its journal
    copy is not published; the rest of the batch is).
    """
    if len(copies) == 1 and not copies[0].journal:
        try:
            await send(channel, copies[0])
        except DeliveryError as exc:
            _raise_if_refused(copies[0], exc)
            raise
        return [], None
    first = [copy for copy in copies if not copy.journal]
    failed, error, refused = await _publish_all(channel, exchanges, first)
    later: list[Copy] = []
    if len(first) < len(copies):
        unsent = {id(copy.message) for copy in failed}  # their journal copies go with them
        dropped = unsent | {id(copy.message) for copy in refused}
        for copy in copies:
            if copy.journal:
                (failed if id(copy.message) in unsent else later).append(copy)
        later = [copy for copy in later if id(copy.message) not in dropped]
    if later:
        again, second_error, _ = await _publish_all(channel, exchanges, later)
        failed += again
        error = error or second_error
    if refused:
        raise queue_full(refused[0].message)
    return failed, error


async def _publish_all(channel: AbstractChannel, exchanges: dict[str, AbstractExchange],
                       copies: list[Copy]) -> tuple[list[Copy], BaseException | None, list[Copy]]:
    """Publish copies, every confirm awaited together: failed, first error, refused."""
    publisher = await publisher_for(channel)
    handed: list[Pending | BaseException] = []
    for copy in copies:
        try:
            handed.append(enqueue(publisher, copy))
        except Exception as exc:  # as a failed publish of this copy
            handed.append(exc)
    pending = [each for each in handed if isinstance(each, Pending)]
    try:  # the futures themselves: no task per copy
        await asyncio.gather(*(each.future for each in pending), return_exceptions=True)
    finally:
        for each in pending:
            publisher.forget(each)
    results = [each if isinstance(each, BaseException) else each.future.exception()
               for each in handed]
    failed: list[Copy] = []
    refused: list[Copy] = []
    error: BaseException | None = None
    for copy, result in zip(copies, results, strict=True):
        if not isinstance(result, BaseException):
            continue
        if isinstance(result, DeliveryError) and _refused(copy, result):
            refused.append(copy)
        elif is_transient(result):
            failed.append(copy)
            error = error or result
        else:
            raise result
    return failed, error, refused


def _refused(copy: Copy, exc: DeliveryError) -> bool:
    """A nack of a message for a bounded queue: RabbitMQ's ``reject-publish`` answer."""
    return (isinstance(exc.frame, Basic.Nack) and not copy.journal and not copy.delayed_to
            and any(refuses(queue) for queue in copy.message.queues))


def _raise_if_refused(copy: Copy, exc: DeliveryError) -> None:
    if _refused(copy, exc):
        raise queue_full(copy.message) from exc


def refuses(name: str) -> bool:
    """True for a bounded queue whose overflow is ``reject``."""
    return is_bounded(name) and Queue.get(name).overflow == 'reject'


def queue_full(message: Outgoing) -> QueueFull:
    """The error of a send a full queue refused (it stored nothing there)."""
    full = [name for name in message.queues if refuses(name)]
    where = (f'queue {full[0]!r} is full' if len(full) == 1 and not message.exchange else
             f'a queue of exchange {message.exchange!r} is full ({", ".join(full)} may be)')
    return QueueFull(f'{where} (max_length reached): message {message.message_id} was refused')


async def check_room(ready: Callable[[str], Awaitable[int]], batch: Sequence[Outgoing]) -> None:
    """Refuse a whole batch that does not fit in a bounded ``reject`` queue, before publishing.

    RabbitMQ confirms each message of a batch by itself, so a full queue would take the
    first messages and refuse the rest; counting first makes the batch all or none, except
    when other senders fill the queue between this count and the publish (then the messages
    that fit are stored and ``QueueFull`` is raised: see docs/brokers/rabbitmq.md).
    """
    wanted = Counter(name for message in batch if message.delay <= 0
                     for name in message.queues if refuses(name))
    for name, count in wanted.items():
        waiting = await ready(name)
        limit = Queue.get(name).max_length
        if waiting + count > limit:
            raise QueueFull(f'queue {name!r} is full: {count} message(s) do not fit beside the '
                            f'{waiting} waiting (max_length {limit}); none was sent')
