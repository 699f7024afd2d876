"""Retention on RabbitMQ: a stream queue ``<q>.journal`` beside queue ``q``, read back in order.

The journal is a stream (``x-queue-type: stream``) whose ``x-max-age`` is the queue's
retention. It receives a copy of every message sent to ``q``, however it was sent:

- **through an exchange**: the journal is bound to ``q``'s exchange with ``q``'s patterns
  (``AMQPBroker.declare``, its bindings kept in step by ``amqp_bindings`` like ``q``'s), so
  RabbitMQ routes one publish to both (a foreign producer's messages too);
- **directly**: the publish carries ``BCC: [<q>.journal]`` (sender-selected distribution:
  RabbitMQ routes the one publish to both queues, one confirm, and strips the header);
- **delayed**: a second publish straight into the journal when sent (the ladder's copy
  reaches ``q`` later; history lists messages by their send time);
- **to a bounded queue directly**: the journal copy is published only once ``q`` confirmed
  its own, since a publish refused by a full queue would still be stored by the journal
  (measured: a ``BCC`` copy survives ``q``'s nack). Through an exchange this cannot be
  avoided: a message refused by a full bounded queue may still be in its journal.

Retries, releases and dead letters are no new sends: they are not journaled.

Reading (``read``): a consumer on a channel of its own, ``basic.qos`` as large as a page,
from ``x-stream-offset`` = the window's start (a timestamp; RabbitMQ starts at the chunk
holding it, so earlier messages are filtered here) or just after the last position read.
A stream has no end and RabbitMQ 3.10 tells no message count for it, so a read first
publishes a *mark* (a confirmed, empty message with a header of its own) into the journal:
everything sent before the read comes before the mark, and the read ends when it sees it.
Marks are skipped by every read and age out with the rest. Positions are stream offsets.

Trimming: RabbitMQ deletes a stream a whole segment at a time, once every message of that
segment is older than ``x-max-age``, and only when a new segment is started. So reads also
hide what is older than the retention: a message past its window is gone from ``history``
at once, whatever the segment size. Segments are sized by the window
(``segment_bytes``) so a short retention really frees its disk soon.
"""

import asyncio
import math
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import ChannelPreconditionFailed
from aiormq.abc import FieldTable

from ..exceptions import ConfigurationError, QueueException, QueueNotFound
from ..queue import Queue
from ..transport import Retained
from .amqp_codec import headers_of, id_of, priority_of, sent_at_of

if TYPE_CHECKING:
    from aio_pika.abc import AbstractRobustConnection

JOURNAL_SUFFIX = '.journal'
MARK_HEADER = 'mq-journal-mark'
OFFSET_HEADER = 'x-stream-offset'
SKEW_S = 2.0  # read from this much before ``since``: the chunk times are RabbitMQ's clock
READ_TIMEOUT_S = 30.0  # a read that does not reach its mark in this long fails
MIN_SEGMENT_BYTES = 100_000
MAX_SEGMENT_BYTES = 500_000_000  # RabbitMQ's default segment size
SEGMENT_BYTES_PER_S = 20_000


def journal_name(name: str) -> str:
    """The stream queue that keeps queue ``name``'s messages."""
    return f'{name}{JOURNAL_SUFFIX}'


def has_journal(name: str) -> bool:
    """True for a declared queue with a ``retention`` (an exchange or unknown name: False)."""
    try:
        return Queue.get(name).retention_s > 0
    except QueueNotFound:
        return False


def segment_bytes(retention_s: float) -> int:
    """A segment for about a twentieth of the window at 1 KB/s: short windows trim soon."""
    return int(min(max(retention_s * SEGMENT_BYTES_PER_S, MIN_SEGMENT_BYTES), MAX_SEGMENT_BYTES))


def journal_arguments(retention_s: float) -> FieldTable:
    """The stream's declaration: its age limit in whole seconds (RabbitMQ wants a unit)."""
    return {'x-queue-type': 'stream', 'x-max-age': f'{max(1, math.ceil(retention_s))}s',
            'x-stream-max-segment-size-bytes': segment_bytes(retention_s)}


async def declare_journal(channel: AbstractChannel, queue: Queue) -> AbstractQueue:
    """Declare the journal of ``queue`` (a queue with retention); a clash is a clear error."""
    name = journal_name(queue.name)
    try:
        return await channel.declare_queue(name, durable=True,
                                           arguments=journal_arguments(queue.retention_s))
    except ChannelPreconditionFailed as exc:
        raise ConfigurationError(
            f'the journal {name!r} of queue {queue.name!r} exists on RabbitMQ with another '
            f'retention or type ({exc.args[-1] if exc.args else exc}): delete it first') from exc


def mark() -> aio_pika.Message:
    """The message a read publishes into a journal to know where the journal ends."""
    return aio_pika.Message(b'', message_id=f'mark-{uuid.uuid4().hex}',
                            headers={MARK_HEADER: 1})


async def read(connection: 'AbstractRobustConnection', queue: Queue, since: float | None,
               until: float | None, after: Any, limit: int) -> tuple[list[Retained], Any]:
    """Up to ``limit`` journaled messages of ``queue`` in the window, after ``after``."""
    low = max(since or 0.0, time.time() - queue.retention_s)  # older ones are gone
    name = journal_name(queue.name)
    end = mark()
    async with connection.channel(publisher_confirms=True) as channel:
        await declare_journal(channel, queue)
        await channel.default_exchange.publish(end, name)
    # Never from a time to come: the mark, written now, would be skipped and never seen.
    start: Any = after + 1 if isinstance(after, int) else datetime.fromtimestamp(
        max(min(low, time.time()) - SKEW_S, 0), tz=UTC)
    reader = _Reader(queue.name, end.message_id or '', low, until, after, limit)
    reader.keep_unknown = since is None
    async with connection.channel(publisher_confirms=False) as channel:
        await channel.set_qos(prefetch_count=max(min(limit, 1000), 10))
        stream = await channel.get_queue(name, ensure=False)
        tag = await stream.consume(reader.on_message, arguments={OFFSET_HEADER: start})
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                await reader.done.wait()
        except TimeoutError:
            raise QueueException(f'reading the journal {name!r} did not reach its end in '
                                 f'{READ_TIMEOUT_S:.0f} s') from None
        finally:
            if not channel.is_closed:
                await stream.cancel(tag)
    return reader.entries, reader.next_position


class _Reader:
    """Collects a window's messages from a stream consumer until the mark or the limit."""

    def __init__(self, queue: str, end: str, low: float, until: float | None, after: Any,
                 limit: int) -> None:
        self._queue, self._end, self._low, self._until, self._limit = queue, end, low, until, limit
        # A foreign producer's message has no send time: listed only when no window is asked.
        self.keep_unknown = True
        self._after = after if isinstance(after, int) else -1
        self.entries: list[Retained] = []
        self.next_position: Any = None
        self.done = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()  # a stream keeps it: the ack only lets RabbitMQ send more
        if self.done.is_set():
            return
        position = message.headers.get(OFFSET_HEADER)
        if not isinstance(position, int) or position <= self._after:
            return  # before the start: the first chunk may hold earlier offsets
        if MARK_HEADER in message.headers:
            if message.message_id == self._end:
                self.done.set()  # the end: nothing more to read
            return
        sent_at = sent_at_of(message)
        if not sent_at:
            if not self.keep_unknown:
                return
        elif sent_at < self._low or (self._until is not None and sent_at > self._until):
            return
        message_id, _ = id_of(message)
        self.entries.append(Retained(self._queue, message_id, message.body, sent_at,
                                     headers_of(message), priority_of(message), position))
        if len(self.entries) >= self._limit:
            self.next_position = position
            self.done.set()
