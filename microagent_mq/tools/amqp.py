"""``AMQPBroker``: RabbitMQ through aio-pika, with publisher confirms, retries and dead letters.

For queue ``q``: a durable queue ``q`` (bound to its exchange, a durable topic exchange,
with each of its topic patterns, or ``#``); dead letters in ``q.dlq``; delayed messages
(retries and ``send(delay=)``) wait in ``q.delay.<ms>``, one queue per delay, whose
messages expire back into ``q``: a long delay never holds up a short one, and no plugin
is needed. Metadata travels in headers: ``x-attempt``, ``x-error``, ``x-failed-at``.
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
    from aio_pika.exceptions import AMQPError, ChannelInvalidStateError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("AMQPBroker needs aio-pika: pip install 'microagent-mq[amqp]'") from exc

from ..broker import AbstractQueueBroker
from ..consumer import Consumer
from ..dsn import mask_dsn, parse_dsn
from ..exceptions import BrokerUnavailable
from ..queue import Queue
from ..transport import DeadLetter, Outgoing, Subscription
from .amqp_codec import attempt_of, outgoing_message
from .amqp_consumer import AMQPSubscription

DELAY_QUEUE_SPARE_MS = 60_000  # a delay queue outlives its last message by this much
ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError, OSError, asyncio.TimeoutError)
# aio-pika says 'the connection is closed, reconnecting' with a bare RuntimeError.
SEND_ERRORS = (*ERRORS, RuntimeError)


@dataclass(repr=False, eq=False)
class AMQPBroker(AbstractQueueBroker):
    """``AMQPBroker('amqp://user:password@host:5672/vhost')``; also ``amqps://``.

    ``connect_timeout``: seconds for one connection attempt.
    ``send_timeout``: seconds a send keeps retrying while RabbitMQ is unreachable
    before it raises ``BrokerUnavailable``.
    ``reconnect_interval``: seconds between attempts to restore a lost connection.
    """

    connect_timeout: float = 5.0
    send_timeout: float = 15.0
    reconnect_interval: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_dsn(self.dsn, ('amqp', 'amqps'))
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._connecting = asyncio.Lock()
        self._declared: set[str] = set()
        self._exchanges: dict[str, AbstractExchange] = {}

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
                    raise BrokerUnavailable(
                        f'RabbitMQ at {mask_dsn(self.dsn)} is unreachable: {exc!r}') from exc
                self._channel = None
                self._declared.clear()
            return self._connection

    async def publish_channel(self) -> AbstractChannel:
        """The channel for sending, with publisher confirms: a publish returns once stored."""
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        connection = await self.connection()
        if self._channel is None or self._channel.is_closed:
            # A message RabbitMQ cannot route to a queue (one deleted behind our back) comes
            # back as an error, so the send declares again and retries instead of losing it.
            self._channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            self._exchanges.clear()
        return self._channel

    async def _disconnect(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._declared.clear()
        self._exchanges.clear()
        if connection is not None:
            await connection.close()

    # declarations -----------------------------------------------------------------------

    async def declare(self, channel: AbstractChannel, queue: Queue) -> AbstractQueue:
        """Declare a durable queue and bind it to its exchange, as declared."""
        declared = await channel.declare_queue(queue.name, durable=True)
        if queue.exchange:
            exchange = await self._exchange(channel, queue.exchange)
            for pattern in queue.topics or ('#',):
                await declared.bind(exchange, routing_key=pattern)
        return declared

    async def _exchange(self, channel: AbstractChannel, name: str) -> AbstractExchange:
        return await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)

    async def _declare_target(self, channel: AbstractChannel, message: Outgoing) -> None:
        # Declared on first use, so a message sent before any consumer started is kept.
        name = message.exchange or message.queues[0]
        if name in self._declared:
            return
        if message.exchange:
            await self._exchange(channel, name)
            for queue in Queue.exchanges().get(name, ()):
                await self.declare(channel, queue)
        else:
            await self.declare(channel, Queue.get(name))
        self._declared.add(name)

    async def delay_queue(self, channel: AbstractChannel, queue: str, delay: float) -> str:
        """Declare (and so keep alive) the queue where messages for ``queue`` wait ``delay`` s."""
        ttl_ms = max(1, round(delay * 1000))
        name = f'{queue}.delay.{ttl_ms}'
        await channel.declare_queue(name, durable=True, arguments={
            'x-message-ttl': ttl_ms,
            'x-dead-letter-exchange': '',
            'x-dead-letter-routing-key': queue,
            'x-expires': ttl_ms + DELAY_QUEUE_SPARE_MS,
        })
        return name

    # sending ----------------------------------------------------------------------------

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        deadline = time.monotonic() + self.send_timeout
        failures = 0
        while True:
            try:
                channel = await self.publish_channel()
                await self._publish_on(channel, batch)
                return
            except BrokerUnavailable:
                raise
            except SEND_ERRORS as exc:
                failures += 1
                self._declared.clear()
                self._exchanges.clear()
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(
                        f'RabbitMQ at {mask_dsn(self.dsn)} did not take the message within '
                        f'{self.send_timeout}s: {exc!r}') from exc
                self.log.warning('Publishing failed (%r); retry %d', exc, failures)
                await asyncio.sleep(min(0.05 * 2 ** failures, 1.0))

    async def _publish_on(self, channel: AbstractChannel, batch: Sequence[Outgoing]) -> None:
        publishes = []
        for message in batch:
            if message.delay > 0:
                for queue in message.queues:
                    target = await self.delay_queue(channel, queue, message.delay)
                    publishes.append(channel.default_exchange.publish(
                        _message(message), target))
                continue
            await self._declare_target(channel, message)
            if message.exchange:
                exchange = self._exchanges.get(message.exchange)
                if exchange is None:
                    exchange = await self._exchange(channel, message.exchange)
                    self._exchanges[message.exchange] = exchange
                publishes.append(exchange.publish(
                    _message(message), message.topic, mandatory=False))
            else:
                publishes.append(channel.default_exchange.publish(
                    _message(message), message.queues[0]))
        if len(publishes) == 1:
            await publishes[0]
        else:  # every confirm awaited together: one wait for the batch
            await asyncio.gather(*publishes)

    async def republish(self, queue: str, body: bytes, message_id: str, attempt: int,
                        delay: float = 0.0, headers: dict[str, Any] | None = None, *,
                        user_headers: dict[str, Any] | None = None, sent_at: float = 0.0,
                        channel: AbstractChannel | None = None) -> None:
        """Publish a message of ``queue`` again (retry, dead letter, requeue), confirmed.

        ``channel``: publish there instead (a consumer's transactional channel: unconfirmed,
        it takes effect at the consumer's commit).
        """
        channel = channel or await self.publish_channel()
        target = await self.delay_queue(channel, queue, delay) if delay > 0 else queue
        await channel.default_exchange.publish(
            outgoing_message(body, message_id, attempt, headers=user_headers, sent_at=sent_at,
                             extra=headers), target)

    # consuming --------------------------------------------------------------------------

    async def _subscribe(self, consumer: Consumer) -> Subscription:
        config = consumer.config
        subscription = AMQPSubscription(self, consumer.queue, config.concurrency + config.prefetch,
                                        hand_out=config.concurrency)
        await subscription.open()
        return subscription

    # inspecting ---------------------------------------------------------------------------

    async def _length(self, name: str, **options: Any) -> int:
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
        # Read without acking; closing the channel puts them back where they were.
        async with connection.channel(publisher_confirms=False) as channel:
            dlq = await channel.declare_queue(f'{name}.dlq', durable=True)
            while len(letters) < limit:
                message = await dlq.get(no_ack=False, fail=False)
                if message is None:
                    break
                letters.append(_dead_letter(name, message))
        return letters

    async def _requeue_dead_letters(self, name: str) -> int:
        connection = await self.connection()
        moved = 0
        async with connection.channel(publisher_confirms=False) as channel:
            dlq = await channel.declare_queue(f'{name}.dlq', durable=True)
            await self.declare(await self.publish_channel(), Queue.get(name))
            while (message := await dlq.get(no_ack=False, fail=False)) is not None:
                await self.republish(name, message.body, message.message_id or '', 1)
                await message.ack()
                moved += 1
        return moved


def _message(message: Outgoing) -> aio_pika.Message:
    return outgoing_message(message.body, message.message_id, 1, headers=message.headers,
                            sent_at=message.sent_at)


def _dead_letter(queue: str, message: AbstractIncomingMessage) -> DeadLetter:
    headers = message.headers
    failed_at = headers.get('x-failed-at', 0)
    return DeadLetter(queue, message.message_id or '', message.body, str(headers.get('x-error', '')),
                      attempt_of(message), float(failed_at) if isinstance(failed_at, int | float) else 0.0)
