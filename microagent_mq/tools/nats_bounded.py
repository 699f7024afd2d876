"""Bounded queues (``max_length``) on JetStream, counting what ``queue_length`` counts: waiting messages.

JetStream's own ``max_msgs`` counts every message a stream holds: also those being handled and
retries waiting for their delay (a ``nak`` keeps a message stored), and ``discard: old`` would
drop exactly those. So the bound is kept here, atomically all the same: a store to a bounded
queue carries ``Nats-Expected-Last-Sequence``, the stream's last sequence when the waiting
count was read, and the server refuses it if anything else was stored meanwhile (another
sender, a delayed move, a requeue); the count is then read again. Consumption only lowers the
count, so while the last sequence has not moved a count read earlier is an upper bound: a
broker keeps it between its own stores, which then cost one round trip, like any send.

The count: the stream's last sequence is read first, then the durable consumer's
``num_pending`` (never delivered; before any consumer, every message of the stream). Retries
waiting and messages given back are not counted, as in ``queue_length``; a retry or release is
a ``nak``, never a store, so it can never be refused.

``overflow='reject'``: a store that does not fit raises ``QueueFull``, nothing stored.
``'drop_oldest'``: stored, then the oldest waiting messages (after the consumer's last
delivered sequence) are deleted down to the bound. Deleting is not atomic with delivery: a
message delivered in that instant may be deleted while it is handled (its ack then does
nothing; a retry of it is lost).
"""

import asyncio
from typing import TYPE_CHECKING, Any

import nats.js.errors

from ..exceptions import QueueException, QueueFull
from .nats_codec import CONSUMER

if TYPE_CHECKING:
    from .nats import NATSBroker
    from .nats_options import QueuePlan

EXPECTED_LAST_SEQ = 'Nats-Expected-Last-Sequence'
WRONG_LAST_SEQ = 10071  # "wrong last sequence": something else was stored first
CONFLICTS_MAX = 100  # stores refused in a row by other stores: give up (never seen in practice)


class Bound:
    """The waiting count of one bounded queue as this broker last knew it, and its stores."""

    def __init__(self, broker: 'NATSBroker', plan: 'QueuePlan') -> None:
        self._broker, self._plan = broker, plan
        self._stream = broker.names.stream(plan.queue)
        self._lock = asyncio.Lock()  # this broker's stores to the queue, one at a time
        self._last: int | None = None  # the stream's last sequence when _waiting was right
        self._waiting = 0  # an upper bound while _last is the stream's last sequence
        self._delivered = 0  # the consumer's last delivered stream sequence, when read

    async def admit(self, count: int) -> None:
        """Raise ``QueueFull`` unless ``count`` more messages fit now (a batch, before storing)."""
        async with self._lock:
            if not self._fits(count):
                await self._read()
                if not self._fits(count):
                    raise full(self._plan, f'{count} messages do not fit beside the {self._waiting} '
                                   f'waiting; none was stored')

    async def store(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """Store one message within the bound, as its overflow says (``QueueFull`` or a drop)."""
        js = await self._broker.jetstream()
        async with self._lock:
            for _ in range(CONFLICTS_MAX):
                if self._last is None or (self._plan.reject and not self._fits(1)):
                    await self._read()
                    if self._plan.reject and not self._fits(1):
                        raise full(self._plan, 'the message was not stored')
                try:
                    guarded = {**headers, EXPECTED_LAST_SEQ: str(self._last)}
                    ack = await js.publish(subject, body, headers=guarded)
                except nats.js.errors.APIError as exc:
                    if exc.err_code != WRONG_LAST_SEQ:
                        raise
                    self._last = None  # stored by someone else first: count again
                    continue
                if not ack.duplicate:  # a repeated send stored nothing new
                    self._last, self._waiting = ack.seq, self._waiting + 1
                if self._waiting > self._plan.max_length:
                    await self._drop_oldest()
                return
        raise QueueException(f'queue {self._plan.queue!r}: {CONFLICTS_MAX} stores in a row were '
                             f'overtaken by others; nothing stored')

    def _fits(self, count: int) -> bool:
        return self._last is not None and self._waiting + count <= self._plan.max_length

    async def _read(self) -> None:
        js = await self._broker.jetstream()
        state = (await js.stream_info(self._stream)).state  # first: see the module docstring
        try:
            info = await js.consumer_info(self._stream, CONSUMER)
            waiting, delivered = int(info.num_pending or 0), int(info.delivered.stream_seq or 0)
        except nats.js.errors.NotFoundError:
            waiting, delivered = int(state.messages), 0
        self._last, self._waiting, self._delivered = int(state.last_seq), waiting, delivered

    async def _drop_oldest(self) -> None:
        await self._read()  # exact: the count and where delivery stands
        js = await self._broker.jetstream()
        seq = self._delivered + 1
        while self._waiting > self._plan.max_length:
            try:
                subject = self._broker.names.subject(self._plan.queue)
                msg: Any = await js.get_msg(self._stream, seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return  # taken meanwhile: nothing older is waiting
            try:
                await js.delete_msg(self._stream, msg.seq)
                self._waiting -= 1
            except nats.js.errors.NotFoundError:
                pass  # handled meanwhile: that made room too, the next read will see it
            seq = msg.seq + 1
        self._broker.log.debug('Dropped the oldest of %s down to %d', self._plan.queue, self._plan.max_length)


def full(plan: 'QueuePlan', what: str) -> QueueFull:
    return QueueFull(f'queue {plan.queue!r} is full (max_length {plan.max_length}): {what}')
