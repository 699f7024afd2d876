"""A consumer on its own RabbitMQ channel: RabbitMQ pushes, the engine fetches."""

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from ..transport import Delivery, Subscription, now_s
from .amqp_codec import attempt_of, headers_of, sent_at_of

if TYPE_CHECKING:
    from .amqp import AMQPBroker

IDLE_WAKE_S = 1.0  # an idle fetch returns this often, so the engine can look around


class AMQPSubscription(Subscription):
    """A consumer on its own channel; RabbitMQ pushes up to the QoS prefetch."""

    def __init__(self, broker: 'AMQPBroker', queue: str, channel: AbstractChannel) -> None:
        self._broker = broker
        self._queue = queue
        self._channel = channel
        self._incoming: deque[AbstractIncomingMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._amqp_queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, queue: AbstractQueue) -> None:
        """Start the push of messages into this subscription's buffer."""
        self._amqp_queue = queue
        self._tag = await queue.consume(self._on_message, no_ack=False)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._incoming.append(message)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        incoming = self._incoming
        if not incoming:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(IDLE_WAKE_S):
                    await self._waiter
            except TimeoutError:
                return []
            finally:
                self._waiter = None
        batch: list[Delivery] = []
        while incoming and len(batch) < max_count:
            message = incoming.popleft()
            if message.redelivered:
                await self._count_redelivery(message)
                continue
            batch.append(Delivery(message.body, message.message_id or '', attempt_of(message),
                                  message, headers_of(message), sent_at_of(message)))
        return batch

    async def _count_redelivery(self, message: AbstractIncomingMessage) -> None:
        # A classic queue does not count deliveries, and RabbitMQ redelivers a message when
        # its consumer died holding it. Record that as an attempt, in the message itself, so
        # that max_attempts holds across crashes: publish it again with x-attempt + 1.
        try:
            await self._broker.republish(self._queue, message.body, message.message_id or '',
                                         attempt_of(message) + 1)
            await message.ack()
        except Exception:
            await message.nack(requeue=True)
            raise

    async def ack(self, delivery: Delivery) -> None:
        await delivery.handle.ack()

    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        await self._broker.republish(self._queue, delivery.body, delivery.message_id,
                                     delivery.attempt + 1, max(delay, 0.001))
        await delivery.handle.ack()

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        await self._broker.republish(
            f'{self._queue}.dlq', delivery.body, delivery.message_id, delivery.attempt,
            headers={'x-error': error, 'x-failed-at': now_s(), 'x-queue': self._queue})
        await delivery.handle.ack()

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        # Republished, not nacked: a redelivered message counts as a crash (see fetch).
        for delivery in deliveries:
            await self._broker.republish(self._queue, delivery.body, delivery.message_id,
                                         delivery.attempt)
            await delivery.handle.ack()

    async def close(self) -> None:
        try:
            if self._amqp_queue is not None and self._tag is not None:
                await self._amqp_queue.cancel(self._tag)
        finally:
            # Unacked messages, buffered or not, go back to the queue when the channel closes.
            self._incoming.clear()
            await self._channel.close()
