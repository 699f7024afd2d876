"""A consumer on its own RabbitMQ channel: RabbitMQ pushes, the engine fetches.

How the attempt rule (DESIGN.md "Attempts: the one rule") holds on RabbitMQ:

- **Crashes count.** A classic queue does not count deliveries. RabbitMQ redelivers a
  message (``redelivered`` set) only when a channel holding it closed without settling it:
  its consumer died, or lost its connection, maybe with the handler running. That is an
  attempt: ``fetch`` publishes the message again with ``x-attempt`` + 1 and acks the
  original, so ``max_attempts`` holds across SIGKILLs. The copy goes to the back of the
  queue: RabbitMQ cannot rewrite a message in place, and handing it on with the flag alone
  would forget the count at the next crash.
- **Nothing graceful leaves a message to that rule.** Since a redelivery counts, a graceful
  path never nacks and never closes a channel holding unsettled messages. A stop first
  cancels the consumer (``stop_fetching``: ``basic.cancel``), so RabbitMQ pushes nothing
  more; then every message fetched but not handled (the engine's buffer, then what is
  still buffered here) is *released*: published again with the same attempt, then acked.
  Released messages move to the back of the queue, in their order: the price of not
  counting them (a nack would keep their place but set ``redelivered``, which cannot be
  told from a crash).
- **A failed settle requeues.** When a retry, dead letter or release cannot publish its
  copy (a ``.dlq`` deleted behind our back, a publish error), the original is nacked with
  requeue: not stranded, and its prefetch slot is freed. Its redelivery counts an attempt
  (the handler did run; for a release this is the one case where an unhandled message
  pays one).
- **Stale deliveries are dropped.** Messages buffered from a channel that has since closed
  were requeued by RabbitMQ already: ``fetch`` drops them, and settling one does nothing
  but log, so the handler never sees them twice because of us. To keep that buffer here
  (where it is checked), a fetch hands out at most ``concurrency`` messages. A dropped
  message was never handled, so when it comes back to this consumer its ``redelivered``
  flag is not counted (to another consumer it is: a known over-count, never an under-count).
- **Foreign messages.** A message without ``message_id`` gets ``body-<hash of the body>``:
  stable across redeliveries and the copies we publish (which carry it), but two identical
  bodies share it; a producer that needs them told apart sets ``message_id``.
- **The remaining duplicate window.** Retry, dead letter, release and the crash count
  publish a copy (confirmed) and then ack the original. If the connection drops between
  the confirm and the ack, the original comes back as well as the copy: the message is
  then handled once more than it should (and may be dead-lettered twice).
"""

import asyncio
import hashlib
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from ..transport import Delivery, Subscription, now_s
from .amqp_codec import attempt_of, headers_of, sent_at_of

if TYPE_CHECKING:
    from .amqp import AMQPBroker

IDLE_WAKE_S = 1.0  # an idle fetch returns this often, so the engine can look around
MAX_DROPPED_IDS = 10_000  # ids of stale deliveries remembered until they come back


class AMQPSubscription(Subscription):
    """A consumer on its own channel; RabbitMQ pushes up to the QoS prefetch."""

    def __init__(self, broker: 'AMQPBroker', queue: str, channel: AbstractChannel,
                 hand_out: int = 1) -> None:
        self._broker = broker
        self._queue = queue
        self._channel = channel
        self._hand_out = hand_out  # most messages one fetch hands to the engine
        self._incoming: deque[AbstractIncomingMessage] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._amqp_queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._fetching = True
        # Ids of messages dropped as stale: never handled, so their redelivery is no attempt.
        self._dropped: set[str] = set()

    async def start(self, queue: AbstractQueue) -> None:
        """Start the push of messages into this subscription's buffer."""
        self._amqp_queue = queue
        self._tag = await queue.consume(self._on_message, no_ack=False)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._incoming.append(message)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        incoming = self._incoming
        if not incoming and self._fetching:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(IDLE_WAKE_S):
                    await self._waiter
            except TimeoutError:
                return []
            finally:
                self._waiter = None
        batch: list[Delivery] = []
        limit = min(max_count, self._hand_out)
        while self._fetching and incoming and len(batch) < limit:
            message = incoming.popleft()
            if _stale(message):
                self._drop(message)
            elif message.redelivered and not self._was_dropped(message):
                try:
                    await self._count_redelivery(message)
                except BaseException:
                    # Never orphan what was collected: hand it out, keep this one first.
                    incoming.appendleft(message)
                    if batch:
                        self._broker.log.warning('Counting a redelivery on %s failed; will retry',
                                                 self._queue, exc_info=True)
                        return batch
                    raise
            else:
                batch.append(Delivery(message.body, _message_id(message), attempt_of(message),
                                      message, headers_of(message), sent_at_of(message)))
        return batch

    async def _count_redelivery(self, message: AbstractIncomingMessage) -> None:
        # See the module's docstring: a redelivery is a crash, recorded in the message itself.
        await self._broker.republish(
            self._queue, message.body, _message_id(message), attempt_of(message) + 1,
            user_headers=headers_of(message), sent_at=sent_at_of(message))
        await message.ack()

    async def stop_fetching(self) -> None:
        if not self._fetching:
            return
        self._fetching = False
        self._wake()
        if self._amqp_queue is not None and self._tag is not None:
            try:
                await self._amqp_queue.cancel(self._tag)
            except Exception as exc:  # the channel is gone: RabbitMQ pushes nothing either
                self._broker.log.info('Cancelling the consumer of %s failed: %r', self._queue, exc)

    async def ack(self, delivery: Delivery) -> None:
        message = delivery.handle
        if _stale(message):
            self._log_stale(message, 'not acked')
            return
        await message.ack()

    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        await self._move(delivery, self._queue, delivery.attempt + 1, 'retry', max(delay, 0.001))

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        await self._move(delivery, f'{self._queue}.dlq', delivery.attempt, 'dead letter', headers={
            'x-error': error, 'x-failed-at': now_s(), 'x-queue': self._queue})

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        # Before anything is given back: RabbitMQ must not push the copies (or more) to us.
        await self.stop_fetching()
        for delivery in deliveries:
            await self._move(delivery, self._queue, delivery.attempt, 'release')

    async def _move(self, delivery: Delivery, target: str, attempt: int, what: str,
                    delay: float = 0.0, headers: dict[str, Any] | None = None) -> None:
        """Publish a copy of ``delivery`` to ``target``, then ack the original."""
        message: AbstractIncomingMessage = delivery.handle
        if _stale(message):
            self._log_stale(message, f'{what} skipped')
            return
        try:
            await self._broker.republish(target, delivery.body, delivery.message_id, attempt, delay,
                                         headers=headers, user_headers=delivery.headers,
                                         sent_at=delivery.sent_at)
            await message.ack()
        except Exception as exc:
            # Requeued rather than stranded: unsettled, it would also hold a prefetch slot.
            self._broker.log.warning('%s of message %s on %s failed (%r): requeued; its '
                                     'redelivery counts an attempt', what.capitalize(),
                                     delivery.message_id, self._queue, exc)
            await _nack(message)

    async def close(self) -> None:
        try:
            await self.stop_fetching()
            # Pushed but never fetched: released, as the engine's buffer was.
            while self._incoming:
                message = self._incoming.popleft()
                if _stale(message):
                    continue
                # A crash's count is still owed; a stale copy's never was.
                crashed = 1 if message.redelivered and not self._was_dropped(message) else 0
                delivery = Delivery(message.body, _message_id(message),
                                    attempt_of(message) + crashed, message,
                                    headers_of(message), sent_at_of(message))
                await self._move(delivery, self._queue, delivery.attempt, 'release')
        finally:
            await self._channel.close()

    def _drop(self, message: AbstractIncomingMessage) -> None:
        self._log_stale(message, 'dropped from the buffer')
        if len(self._dropped) >= MAX_DROPPED_IDS:  # those went to other consumers
            self._dropped.clear()
        self._dropped.add(_message_id(message))

    def _was_dropped(self, message: AbstractIncomingMessage) -> bool:
        dropped = self._dropped
        if not dropped:
            return False
        message_id = _message_id(message)
        if message_id in dropped:
            dropped.discard(message_id)
            return True
        return False

    def _log_stale(self, message: AbstractIncomingMessage, what: str) -> None:
        self._broker.log.info('Message %s of %s came from a closed channel (RabbitMQ delivers '
                              'it again): %s', _message_id(message), self._queue, what)


def _stale(message: AbstractIncomingMessage) -> bool:
    """True when ``message`` came on a channel that has closed since (RabbitMQ requeued it)."""
    try:
        return bool(message.channel.is_closed)
    except Exception:  # aio-pika raises ChannelInvalidStateError for a closed channel
        return True


def _message_id(message: AbstractIncomingMessage) -> str:
    """The sender's id; for a foreign message without one, a stable id from its body."""
    return message.message_id or f'body-{hashlib.blake2b(message.body, digest_size=12).hexdigest()}'


async def _nack(message: AbstractIncomingMessage) -> None:
    try:
        await message.nack(requeue=True)
    except Exception:  # the channel is gone: RabbitMQ requeues by itself
        pass
