"""A consumer on its own RabbitMQ channel: RabbitMQ pushes, the engine fetches.

How the attempt rule (DESIGN.md "Attempts: the one rule") holds on RabbitMQ (classic
queues; a quorum queue counts returns itself, and its crash redeliveries are handled in place:
see ``amqp_durability`` for what differs there):

- **Crashes count.** A classic queue does not count deliveries. RabbitMQ redelivers a
  message (``redelivered`` set) only when a channel holding it closed without settling it:
  its consumer died, or lost its connection, maybe with the handler running. That is an
  attempt: ``fetch`` publishes the message again with ``x-attempt`` + 1 and acks the
  original, so ``max_attempts`` holds across SIGKILLs. The copy goes to the back of the
  queue (recovery waits for the backlog): RabbitMQ cannot rewrite a message in place, and
  handing it on with the flag alone would forget the count at the next crash.
- **Nothing graceful leaves a message to that rule.** Since a redelivery counts, a graceful
  path never nacks and never closes a channel holding unsettled messages. A stop first
  cancels the consumer (``stop_fetching``: ``basic.cancel``), so RabbitMQ pushes nothing
  more; then every message fetched but not handled (the engine's buffer, then what is
  still buffered here) is *released*: published again with the same attempt, then acked.
  Released messages move to the back of the queue, in their order: the price of not
  counting them (a nack would keep their place but set ``redelivered``, which cannot be
  told from a crash). ``release`` and ``close`` cancel first themselves, for an engine
  that does not call ``stop_fetching``.
- **A copy and its ack commit together.** Retry, dead letter, release and the crash count
  publish a copy and ack the original in one transaction on the consumer's channel
  (``amqp_tx``), so a dropped connection cannot split a message in two. The channel is
  a plain one (not aio-pika's robust channel, which could reopen and send the copy on a
  new channel while the ack goes to the dead one): when it closes, ``fetch`` opens a new
  one, and everything buffered from the old one is stale. A dead letter declares its
  ``.dlq`` first: in a transaction an unroutable copy would be dropped, not refused.
- **A failed settle requeues.** When a retry, dead letter or release fails (a publish
  error; the transaction is rolled back), the original is nacked with requeue: not
  stranded, and its prefetch slot is freed. Its redelivery counts an attempt (the handler
  did run; for a release this is the one case where an unhandled message pays one).
- **Stale deliveries are dropped.** Messages buffered from a channel that has since closed
  were requeued by RabbitMQ already: ``fetch`` drops them, and settling one does nothing
  but log. To keep that buffer here (where it is checked), a fetch hands out at most
  ``concurrency`` messages. A dropped message was never handled, so when it comes back to
  this consumer its ``redelivered`` flag is not counted (to another consumer it is: an
  over-count, never an under-count).
- **Foreign messages.** A message without ``message_id`` gets ``body-<hash of the body>``:
  stable across redeliveries and the copies we publish (which carry it; a delivery tag is
  per channel, so no use), but two identical bodies share it, so the delivery is marked
  ``synthetic_id`` and an idempotent consumer handles it whatever its id; a producer that
  needs duplicates recognised sets ``message_id``.

Where a duplicate handling can still come from (each time counted as an attempt):
a handler running when its consumer dies or loses its connection (its ack is lost); the
plain acks of the last 5 ms, not yet committed (``amqp_tx``), when that happens; up to
``concurrency`` messages already handed to the engine but not started when the connection
drops (the engine does not ask before starting a handler); a RabbitMQ node failing in the
middle of a commit (RabbitMQ makes a transaction atomic per queue only).
"""

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractChannel
from aiormq.abc import AbstractChannel as Underlay
from aiormq.abc import DeliveredMessage

from ..queue import Queue
from ..transport import Delivery, Subscription, now_s
from .amqp_codec import attempt_of, headers_of, id_of, priority_of, sent_at_of
from .amqp_durability import declare_queue, delivery_count
from .amqp_incoming import Pushed
from .amqp_options import due_name
from .amqp_tx import Step, Transactions

if TYPE_CHECKING:
    from .amqp import AMQPBroker

# An idle fetch returns this often (a closing channel wakes it at once): 200 idle consumers
# cost 20 wake-ups a second, not 200.
IDLE_WAKE_S = 10.0
MAX_DROPPED_IDS = 10_000  # ids of stale deliveries remembered until they come back


class AMQPSubscription(Subscription):
    """A consumer on its own transactional channel; RabbitMQ pushes up to the QoS prefetch."""

    def __init__(self, broker: 'AMQPBroker', queue: Queue, capacity: int, hand_out: int) -> None:
        self._broker = broker
        self._queue = queue
        self._name = queue.name
        # A quorum queue counts returns itself: see ``amqp_durability`` for that rule.
        self._durability = broker.durability_of(queue)
        self._quorum = self._durability == 'quorum'
        self._capacity = capacity  # the QoS prefetch
        self._hand_out = hand_out  # most messages one fetch hands to the engine
        self._incoming: deque[Pushed] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._channel: AbstractChannel | None = None
        self._underlay: Underlay | None = None  # the channel's aiormq channel
        # The consumer tag of each queue consumed: the queue, and a bounded one's ``.due``
        self._tags: list[str] = []
        self._fetching = True
        self._tx = Transactions(broker.log, queue.name, eager=capacity // 2)
        # Ids of messages dropped as stale: never handled, so their redelivery is no attempt.
        self._dropped: set[str] = set()

    async def open(self) -> None:
        """Open a transactional channel, declare the queues, start the push into the buffer."""
        connection = await self._broker.connection()
        channel = aio_pika.Channel(connection, publisher_confirms=False)
        await channel.initialize()
        try:
            await channel.set_qos(prefetch_count=self._capacity)
            queues = [await self._broker.declare(channel, self._queue)]
            if self._queue.max_length:  # accepted messages re-enter there (amqp_options)
                queues.append(await channel.get_queue(due_name(self._name), ensure=False))
            await declare_queue(channel, f'{self._name}.dlq', self._durability)
            underlay = await channel.get_underlay_channel()
            await self._tx.select(underlay)
            channel.close_callbacks.add(lambda *_: self._wake())
            channel.return_callbacks.add(self._on_return)
            # On aiormq's channel: aio-pika's consume wraps each delivery (see amqp_incoming).
            tags = [str((await underlay.basic_consume(queue.name, self._on_delivered,
                                                      no_ack=False)).consumer_tag)
                    for queue in queues]
        except BaseException:
            await _close(channel)
            raise
        self._channel, self._underlay, self._tags = channel, underlay, tags
        if not self._fetching:  # stopped while this opened
            await self._cancel()

    def _closed(self) -> bool:
        return self._channel is None or self._channel.is_closed

    async def _on_delivered(self, delivered: DeliveredMessage) -> None:
        message = Pushed(delivered)
        # Noted on its own channel: it may come before open() has noted the channel.
        self._tx.delivered(delivered.channel, message.delivery_tag)
        self._incoming.append(message)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _on_return(self, *args: Any) -> None:
        message = args[-1]  # declared before publishing, so this takes a queue deleted since
        self._broker.log.error('A copy of message %s for %s was returned as unroutable: lost',
                               getattr(message, 'message_id', '?'), self._name)

    async def fetch(self, max_count: int, wait_s: float | None = None) -> Sequence[Delivery]:
        incoming = self._incoming
        if self._fetching and self._closed():
            await self.open()  # raises while RabbitMQ is away: the engine retries, backing off
        idle = IDLE_WAKE_S if wait_s is None else min(wait_s, IDLE_WAKE_S)
        if not incoming and self._fetching:
            if idle <= 0:
                return []
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(idle):
                    await self._waiter
            except TimeoutError:
                return []
            finally:
                self._waiter = None
        batch: list[Delivery] = []
        limit = min(max_count, self._hand_out)
        while self._fetching and incoming and len(batch) < limit:
            message = incoming.popleft()
            if self._underlay_of(message) is None:
                self._drop(message)
            elif message.redelivered and not self._quorum and not self._was_dropped(message):
                try:
                    await self._count_redelivery(message)
                except BaseException:
                    # Never orphan what was collected: hand it out, keep this one first.
                    incoming.appendleft(message)
                    if batch:
                        self._broker.log.warning('Counting a redelivery on %s failed; will retry',
                                                 self._name, exc_info=True)
                        return batch
                    raise
            else:
                batch.append(self._delivery(message))
        return batch

    async def _count_redelivery(self, message: Pushed) -> None:
        # See the module's docstring: a redelivery is a crash, recorded in the message itself.
        delivery = self._delivery(message)
        await self._move(delivery, self._name, delivery.attempt + 1, 'crash count', requeue=False)

    async def stop_fetching(self) -> None:
        self._fetching = False
        self._wake()
        await self._cancel()

    async def _cancel(self) -> None:
        underlay, tags, self._tags = self._underlay, self._tags, []
        if underlay is None:
            return
        for tag in tags:
            if self._closed():
                return
            try:
                await underlay.basic_cancel(tag)
            except Exception as exc:  # the channel is gone: RabbitMQ pushes nothing either
                self._broker.log.info('Cancelling the consumer of %s failed: %r', self._name, exc)

    async def ack(self, delivery: Delivery) -> None:
        message: Pushed = delivery.handle
        underlay = self._underlay_of(message)
        if underlay is None:
            self._log_stale(message, 'not acked')
            return
        await self._tx.ack(underlay, message.delivery_tag)

    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        await self._move(delivery, self._name, delivery.attempt + 1, 'retry', max(delay, 0.001))

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        await self._move(delivery, f'{self._name}.dlq', delivery.attempt, 'dead letter', headers={
            'x-error': error, 'x-failed-at': now_s(), 'x-queue': self._name})

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        # Before anything is given back: RabbitMQ must not push the copies (or more) to us.
        await self.stop_fetching()
        for delivery in deliveries:
            await self._move(delivery, self._name, delivery.attempt, 'release')

    async def _move(self, delivery: Delivery, target: str, attempt: int, what: str,
                    delay: float = 0.0, headers: dict[str, Any] | None = None,
                    requeue: bool = True) -> None:
        """Publish a copy of ``delivery`` to ``target`` and ack the original, atomically."""
        message: Pushed = delivery.handle
        underlay, channel = self._underlay_of(message), self._channel
        if underlay is None or channel is None:
            self._log_stale(message, f'{what} skipped')
            return
        steps: list[Step] = []
        if target != self._name:  # a copy to a queue deleted behind our back would be lost
            steps.append(lambda: declare_queue(channel, target, self._durability))
        steps.append(lambda: self._broker.republish(
            target, delivery.body, delivery.message_id, attempt, delay, headers=headers,
            user_headers=delivery.headers, sent_at=delivery.sent_at, channel=channel,
            priority=delivery.priority))
        steps.append(message.ack)
        try:
            await self._tx.atomically(underlay, *steps)
            self._tx.settled(underlay, message.delivery_tag)
        except Exception as exc:
            if not requeue:
                raise
            # Requeued rather than stranded: unsettled, it would also hold a prefetch slot.
            self._broker.log.warning('%s of message %s on %s failed (%r): requeued; its '
                                     'redelivery counts an attempt', what.capitalize(),
                                     delivery.message_id, self._name, exc)
            await self._requeue(message, underlay)

    async def _requeue(self, message: Pushed, underlay: Underlay) -> None:
        if underlay.is_closed:
            return  # RabbitMQ requeued it with the channel
        try:
            await self._tx.atomically(underlay, lambda: message.nack(requeue=True))
            self._tx.settled(underlay, message.delivery_tag)
        except Exception as exc:
            self._broker.log.info('Requeueing a message of %s failed: %r', self._name, exc)

    async def close(self) -> None:
        try:
            await self.stop_fetching()
            # Pushed but never fetched: released, as the engine's buffer was.
            while self._incoming:
                message = self._incoming.popleft()
                if self._underlay_of(message) is None:
                    continue
                delivery = self._delivery(message)  # on a quorum queue, counted already
                # A crash's count is still owed; a stale copy's never was.
                if not self._quorum and message.redelivered and not self._was_dropped(message):
                    delivery.attempt += 1
                await self._move(delivery, self._name, delivery.attempt, 'release')
            await self._tx.close()
        finally:
            if self._channel is not None:
                await _close(self._channel)

    def _delivery(self, message: Pushed) -> Delivery:
        delivery = _delivery(message)
        if self._quorum and message.redelivered:  # a producer's own header is no count
            returns = delivery_count(message)
            if returns and self._was_dropped(message):
                returns -= 1  # that return was ours, of a message never handed out
            delivery.attempt += returns
        return delivery

    def _underlay_of(self, message: Pushed) -> Underlay | None:
        """The open channel ``message`` came on; None when stale (RabbitMQ requeued it)."""
        underlay = self._underlay
        try:
            return underlay if message.channel is underlay and underlay is not None else None
        except Exception:  # aio-pika raises ChannelInvalidStateError for a closed channel
            return None

    def _drop(self, message: Pushed) -> None:
        self._log_stale(message, 'dropped from the buffer')
        if len(self._dropped) >= MAX_DROPPED_IDS:  # those went to other consumers
            self._dropped.clear()
        self._dropped.add(_message_id(message))

    def _was_dropped(self, message: Pushed) -> bool:
        dropped = self._dropped
        if not dropped:
            return False
        message_id = _message_id(message)
        if message_id in dropped:
            dropped.discard(message_id)
            return True
        return False

    def _log_stale(self, message: Pushed, what: str) -> None:
        self._broker.log.info('Message %s of %s came from a closed channel (RabbitMQ delivers '
                              'it again): %s', _message_id(message), self._name, what)


def _delivery(message: Pushed) -> Delivery:
    message_id, synthetic = id_of(message)
    return Delivery(message.body, message_id, attempt_of(message), message,
                    headers_of(message), sent_at_of(message), synthetic, priority_of(message))


def _message_id(message: Pushed) -> str:
    """The sender's id; for a foreign message without one, a stable id from its body."""
    return id_of(message)[0]


async def _close(channel: AbstractChannel) -> None:
    try:
        await channel.close()
    except Exception:  # closed already, with its connection
        pass
