"""``AMQPBroker``: RabbitMQ through aio-pika, with publisher confirms, retries and dead letters.

For queue ``q``: a durable queue ``q``, classic or quorum (``amqp_durability``), bound to its
exchange (a durable topic exchange) with each of its topic patterns, or ``#``; dead letters
in ``q.dlq``, of the queue's type; the record of the bindings we made in ``q.bindings`` (see
``amqp_bindings``: a changed declaration unbinds what it dropped). Delayed messages (retries
and ``send(delay=)``) wait on one ladder of TTL queues shared by every queue (see
``amqp_delay``): a long delay never holds up a short one, no plugin is needed, and the number
of queues is fixed. Metadata travels in headers (``amqp_codec``).
"""

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

try:
    import aio_pika
    from aio_pika.abc import (
        AbstractChannel,
        AbstractExchange,
        AbstractIncomingMessage,
        AbstractQueue,
        AbstractRobustConnection,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("AMQPBroker needs aio-pika: pip install 'microagent-mq[amqp]'") from exc

from ..broker import AbstractQueueBroker
from ..consumer import Consumer
from ..dsn import mask_dsn, parse_dsn
from ..exceptions import BrokerUnavailable
from ..queue import Queue, check_durability
from ..transport import DeadLetter, Outgoing, QueueStats, Retained, Subscription
from . import amqp_admin
from .amqp_bindings import sync_bindings
from .amqp_codec import (
    attempt_of,
    failed_at_of,
    headers_of,
    outgoing_message,
    priority_of,
    sent_at_of,
)
from .amqp_consumer import AMQPSubscription
from .amqp_delay import (
    DESTINATION_HEADER,
    MAX_DELAY_S,
    bind_destination,
    declare_ladder,
    delay_ms,
    entry_exchange,
    routing_key,
)
from .amqp_durability import declare_queue
from .amqp_errors import ERRORS, is_transient
from .amqp_journal import declare_journal
from .amqp_journal import read as read_journal
from .amqp_options import check_options, due_name, queue_arguments, reentry
from .amqp_publish import Copy, check_delay, check_room, copies_of, exchange_of, publish_copies

__all__ = ['ERRORS', 'AMQPBroker']

PEEK_RETURN_S = 5.0  # the longest dead_letters() waits for a quorum .dlq to take its letters back


@dataclass(repr=False, eq=False)
class AMQPBroker(AbstractQueueBroker):
    """``AMQPBroker('amqp://user:password@host:5672/vhost')``; also ``amqps://``.

    ``connect_timeout``: seconds for one connection attempt.
    ``send_timeout``: seconds a send keeps retrying while RabbitMQ is unreachable (the first
    connection included) before it raises ``BrokerUnavailable``.
    ``reconnect_interval``: seconds between attempts to restore a lost connection.
    ``durability``: ``'classic'`` or ``'quorum'``, the type of the queues whose declaration
    does not say (``Queue(..., durability=...)``).
    """

    connect_timeout: float = 5.0
    send_timeout: float = 15.0
    reconnect_interval: float = 1.0
    durability: str = 'classic'

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_dsn(self.dsn, ('amqp', 'amqps'))
        check_durability(self.durability, 'AMQPBroker: ')
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._connecting = asyncio.Lock()
        self._opening = asyncio.Lock()  # one publish channel, however many first sends at once
        self._declaring = asyncio.Lock()
        self._declared: set[str] = set()
        self._exchanges: dict[str, AbstractExchange] = {}
        self._ladder = False
        self._delay_targets: set[str] = set()  # queues bound to the ladder's deliver exchange

    # connection -------------------------------------------------------------------------

    async def connection(self) -> AbstractRobustConnection:
        """The broker's one robust connection (it reconnects by itself), made on first use."""
        async with self._connecting:
            if self._connection is None or self._connection.is_closed:
                try:
                    self._connection = await aio_pika.connect_robust(
                        self.dsn, timeout=self.connect_timeout,
                        reconnect_interval=self.reconnect_interval,
                        client_properties={'connection_name': f'microagent_mq {self.uid}'})
                except ERRORS as exc:
                    self.log.warning('Connecting to RabbitMQ at %s failed: %r',
                                     mask_dsn(self.dsn), exc)
                    raise BrokerUnavailable(
                        f'RabbitMQ at {mask_dsn(self.dsn)} is unreachable: {exc!r}') from exc
                self._channel = None
                self._forget()
            return self._connection

    async def publish_channel(self) -> AbstractChannel:
        """The channel for sending, with publisher confirms: a publish returns once stored."""
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        connection = await self.connection()
        async with self._opening:
            if self._channel is None or self._channel.is_closed:
                # A message RabbitMQ cannot route to a queue (one deleted behind our back) comes
                # back as an error, so the send declares again and retries instead of losing it.
                self._channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=True)
                self._forget()
            return self._channel

    def _forget(self) -> None:
        """Declare again on the next send: after a failure, or on a new channel."""
        self._declared.clear()
        self._exchanges.clear()
        self._ladder = False
        self._delay_targets.clear()

    async def _disconnect(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._forget()
        if connection is not None:
            await connection.close()

    # declarations -----------------------------------------------------------------------

    def durability_of(self, queue: Queue) -> str:
        """``'classic'`` or ``'quorum'``: as the queue was declared, else this broker's default."""
        return queue.durability or self.durability

    def _durability_named(self, name: str) -> str:
        return self.durability_of(Queue.get(name))

    async def declare(self, channel: AbstractChannel, queue: Queue) -> AbstractQueue:
        """Declare a durable queue, bind it to its exchange as declared, unbind what was dropped."""
        durability = self.durability_of(queue)
        check_options(queue, durability)
        declared = await declare_queue(channel, queue.name, durability,
                                       queue_arguments(queue, durability))
        if queue.max_length:  # where accepted messages re-enter it (amqp_options)
            await declare_queue(channel, due_name(queue.name), durability,
                                queue_arguments(queue, durability, bounded=False))
        journal = await declare_journal(channel, queue) if queue.retention_s else None
        wanted: list[tuple[str, str]] = []
        if queue.exchange:
            exchange = await self._exchange(channel, queue.exchange)
            for pattern in queue.topics or ('#',):
                await declared.bind(exchange, routing_key=pattern)
                if journal is not None:  # it takes what the queue takes (amqp_journal)
                    await journal.bind(exchange, routing_key=pattern)
                wanted.append((queue.exchange, pattern))
        connection = await self.connection()
        await sync_bindings(connection, queue.name, wanted)
        if journal is not None:
            await sync_bindings(connection, journal.name, wanted)
        return declared

    async def _exchange(self, channel: AbstractChannel, name: str) -> AbstractExchange:
        return await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)

    async def _exchange_for(self, channel: AbstractChannel, name: str) -> AbstractExchange:
        """A declared exchange (ours or the ladder's: both durable topic exchanges)."""
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = self._exchanges[name] = await self._exchange(channel, name)
        return exchange

    async def _declare_target(self, channel: AbstractChannel, message: Outgoing) -> None:
        # Declared on first use, so a message sent before any consumer started is kept.
        name = message.exchange or message.queues[0]
        if name in self._declared:
            return
        async with self._declaring:
            if name in self._declared:
                return
            if message.exchange:
                self._exchanges[name] = await self._exchange(channel, name)
                for queue in Queue.exchanges().get(name, ()):
                    await self.declare(channel, queue)
            else:
                await self.declare(channel, Queue.get(name))
            self._declared.add(name)

    async def _delay_target(self, channel: AbstractChannel, queue: str) -> None:
        """Make the delay ladder ready to deliver into ``queue`` (a declared queue)."""
        if queue in self._delay_targets:
            return
        async with self._declaring:
            if not self._ladder:
                self._exchanges.update(await declare_ladder(channel))
                self._ladder = True
            if queue not in self._delay_targets:
                await bind_destination(await channel.get_queue(queue, ensure=False))
                self._delay_targets.add(queue)

    # sending ----------------------------------------------------------------------------

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        for message in batch:
            check_delay(message.delay)
        if len(batch) > 1:  # all or none of a batch into a bounded queue (amqp_publish)
            await check_room(self._ready, batch)
        pending = [copy for message in batch for copy in copies_of(message)]
        deadline = time.monotonic() + self.send_timeout
        failures = 0
        while True:
            try:
                channel = await self.publish_channel()
                pending, error = await self._publish_on(channel, pending)
                if not pending:
                    return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                error = exc
            failures += 1
            self._forget()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerUnavailable(
                    f'RabbitMQ at {mask_dsn(self.dsn)} did not take the message within '
                    f'{self.send_timeout}s: {error!r}') from error
            self.log.warning('Publishing %d message(s) failed (%r); retry %d',
                             len(pending), error, failures)
            await asyncio.sleep(min(0.05 * 2 ** failures, 1.0, left))

    async def _publish_on(self, channel: AbstractChannel,
                          copies: list[Copy]) -> tuple[list[Copy], BaseException | None]:
        """Publish every copy; return those that failed (to send again) and the first error.

        Only what failed is sent again, so a batch with one failure does not store the rest twice.
        """
        exchanges: dict[str, AbstractExchange] = {}
        for copy in copies:  # every declaration first: a failure here has published nothing
            await self._declare_target(channel, copy.message)
            if copy.delayed_to:
                await self._delay_target(channel, copy.delayed_to)
            name = exchange_of(copy)
            if name and name not in exchanges:
                exchanges[name] = await self._exchange_for(channel, name)
        return await publish_copies(channel, exchanges, copies)

    async def republish(self, queue: str, body: bytes, message_id: str, attempt: int,
                        delay: float = 0.0, headers: dict[str, Any] | None = None, *,
                        user_headers: dict[str, Any] | None = None, sent_at: float = 0.0,
                        channel: AbstractChannel | None = None, priority: int = 0) -> None:
        """Publish a message of ``queue`` again (retry, dead letter, requeue), confirmed.

        ``headers``: transport headers (``x-error``...); ``user_headers`` and ``sent_at``: the
        sender's metadata (``Delivery.headers`` / ``Delivery.sent_at``), kept as they were.
        A ``delay`` beyond the ladder's longest (``MAX_DELAY_S``) is cut to it.
        ``channel``: publish there instead (a consumer's transactional channel: unconfirmed,
        it takes effect at the consumer's commit); declarations still go through the
        publishing channel, so no exchange object of ours is ever bound to a consumer's channel.
        ``priority``: the message's, kept. Into a bounded queue, through its ``.due``
        (``amqp_options``): a message already accepted never meets the bound again.
        """
        queue = reentry(queue)
        publish_on = channel or await self.publish_channel()
        try:
            if delay <= 0:
                await publish_on.default_exchange.publish(outgoing_message(
                    body, message_id, attempt, headers=user_headers, sent_at=sent_at,
                    extra=headers, priority=priority), queue)
                return
            ms = delay_ms(min(delay, MAX_DELAY_S))
            declaring = await self.publish_channel()
            await self._delay_target(declaring, queue)
            if channel is None:
                entry = await self._exchange_for(declaring, entry_exchange(ms))
            else:
                entry = await channel.get_exchange(entry_exchange(ms), ensure=False)
            await entry.publish(outgoing_message(
                body, message_id, attempt, headers=user_headers, sent_at=sent_at,
                extra={**(headers or {}), DESTINATION_HEADER: queue}, priority=priority),
                routing_key(ms))
        except BaseException:
            self._forget()  # the next try declares again
            raise

    # consuming --------------------------------------------------------------------------

    async def _subscribe(self, consumer: Consumer) -> Subscription:
        config = consumer.config
        subscription = AMQPSubscription(self, consumer.queue, config.concurrency + config.prefetch_range[0],
                                        hand_out=config.concurrency)
        await subscription.open()
        return subscription

    # inspecting ---------------------------------------------------------------------------

    async def _length(self, name: str, **options: Any) -> int:
        due = reentry(name)
        if due != name:  # a bounded queue's accepted messages wait in both (amqp_options)
            return await self._ready(name) + await self._ready(due)
        return await self._ready(name)

    async def _ready(self, name: str) -> int:
        connection = await self.connection()
        # A passive declare of a missing queue closes its channel: use a throwaway one.
        async with connection.channel(publisher_confirms=False) as channel:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return 0
            return int(queue.declaration_result.message_count or 0)

    async def _dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        connection = await self.connection()
        letters: list[DeadLetter] = []
        durability = self._durability_named(name)
        # Read without acking; closing the channel puts them back where they were.
        async with connection.channel(publisher_confirms=False) as channel:
            dlq = await declare_queue(channel, f'{name}.dlq', durability)
            ready = int(dlq.declaration_result.message_count or 0)
            while len(letters) < limit:
                message = await dlq.get(no_ack=False, fail=False)
                if message is None:
                    break
                letters.append(_dead_letter(name, message))
        if letters and durability == 'quorum':
            await self._until_back(f'{name}.dlq', ready)
        return letters

    async def _until_back(self, name: str, ready: int) -> None:
        """Wait (boundedly) until queue ``name`` has ``ready`` messages ready again.

        A quorum queue takes back what a closed channel held a moment after the close, so a
        ``requeue_dead_letters`` right after ``dead_letters`` could miss the letters just read
        (measured: 1 in 30). Letters are only added meanwhile, but a concurrent requeue can
        take some: hence the deadline.
        """
        deadline = time.monotonic() + PEEK_RETURN_S
        while time.monotonic() < deadline:
            if await self._ready(name) >= ready:
                return
            await asyncio.sleep(0.01)  # no event says when RabbitMQ took them back

    async def _requeue_dead_letters(self, name: str) -> int:
        connection = await self.connection()
        moved = 0
        async with connection.channel(publisher_confirms=False) as channel:
            dlq = await declare_queue(channel, f'{name}.dlq', self._durability_named(name))
            # A snapshot: the letters there now. A consumer that rejects them again while we
            # move them sends them back here, and moving those too would never end.
            present = int(dlq.declaration_result.message_count or 0)
            await self.declare(await self.publish_channel(), Queue.get(name))
            while moved < present:
                message = await dlq.get(no_ack=False, fail=False)
                if message is None:
                    break
                await self.republish(name, message.body, message.message_id or '', 1,
                                     user_headers=headers_of(message), sent_at=sent_at_of(message),
                                     priority=priority_of(message))
                await message.ack()
                moved += 1
        return moved

    async def _retained(self, name: str, since: float | None, until: float | None,
                        after: Any, limit: int) -> tuple[list[Retained], Any]:
        return await read_journal(await self.connection(), Queue.get(name), since, until, after,
                                  limit)

    async def _stats(self, name: str) -> QueueStats:
        return await amqp_admin.stats(self, name)

    async def _purge(self, name: str) -> int:
        due = reentry(name)
        purged = await amqp_admin.purge(self, due) if due != name else 0
        return purged + await amqp_admin.purge(self, name)

    async def _purge_dead_letters(self, name: str) -> int:
        return await amqp_admin.purge(self, f'{name}.dlq')

    async def _requeue_dead_letters_by_id(self, name: str, ids: frozenset[str]) -> int:
        return await amqp_admin.requeue_by_id(self, name, ids)


def _dead_letter(queue: str, message: AbstractIncomingMessage) -> DeadLetter:
    return DeadLetter(queue, message.message_id or '', message.body,
                      str(message.headers.get('x-error', '')), attempt_of(message),
                      failed_at_of(message))
