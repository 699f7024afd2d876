"""One consumer of a queue's durable JetStream pull consumer: pull, ack, retry, dead-letter.

Attempts (DESIGN.md, "Attempts: the one rule"). JetStream counts every delivery of a message
(``num_delivered``): a retry (``nak(delay)``) and a crash (``ack_wait`` lapsed) each add one,
and so should they. A message given back without being handled (a graceful stop, a fetch no
handler saw) is ``nak``-ed too, which keeps its place at the head of the queue, but that
delivery must not count: before the ``nak``, ``release`` stores one record per free delivery
in the queue's ``-free`` stream (subject ``<prefix>.<q>.free.<stream sequence>``). A message
delivered more than once is on attempt ``num_delivered - free deliveries``; the records are
purged once the message is settled. A crash between the record and the ``nak`` leaves the
message to ``ack_wait``, still free, which is right: no handler had it.

Pulls: one pull request at a time, for at most what the engine asked; the next is sent only
when the server has ended the last (filled, or a 408/404 status). A stop waits for that end
and gives back what arrived meanwhile, so nothing stays taken by a consumer that is gone.
"""

import asyncio
import json
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NATSSub

from ..transport import Delivery, Subscription, now_s
from .nats_codec import (
    ATTEMPTS,
    CONSUMER,
    ERROR,
    FAILED_AT,
    SYNTHETIC,
    copy_headers,
    delivery_of,
    id_of,
    sent_at_of,
)
from .nats_codec import user_headers_of as user_headers

if TYPE_CHECKING:
    from .nats import NATSBroker

PULL_EXPIRES_S = 0.5  # an idle pull request ends this often, so a stop never waits long
IDLE_WAKE_S = PULL_EXPIRES_S + 2.0  # a request whose end never came (a reconnect) is dropped
HEARTBEAT = '100'
FLUSH_TIMEOUT_S = 5


class Handle:
    """What a delivery needs to be settled: the message and its free deliveries."""

    __slots__ = ('free', 'msg', 'seq')

    def __init__(self, msg: Msg, seq: int, free: int) -> None:
        self.msg, self.seq, self.free = msg, seq, free


class NATSSubscription(Subscription):
    """Pulls from the queue's durable consumer into a buffer the engine fetches from."""

    reads_ahead = True

    def __init__(self, broker: 'NATSBroker', queue: str, visibility_s: float) -> None:
        self._broker = broker
        self._queue = queue
        self._visibility_s = visibility_s
        self._lost = False  # the consumer (or stream) may be gone: declare it again
        self._names = broker.names
        self._stream = broker.names.stream(queue)
        self._inbox = broker.client.new_inbox()
        self._next = f'$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{CONSUMER}'
        self._ready: deque[Msg] = deque()
        self._open = 0  # messages the open pull request may still bring; 0: none open
        self._request = 0
        self._changed = asyncio.Event()
        self._stopped = False
        self._sub: NATSSub | None = None
        self._watchdog: asyncio.TimerHandle | None = None  # ends a request never answered

    async def start(self) -> None:
        """Listen on this subscription's inbox: pulled messages and pull statuses land here."""
        self._sub = await self._broker.client.subscribe(f'{self._inbox}.*', cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get('Status') if msg.headers and not msg.data else None
        if status is not None and msg.subject.startswith(self._inbox):
            if status != HEARTBEAT and msg.subject == f'{self._inbox}.{self._request}':
                self._open = 0  # the server ended the request (expired, no messages, ...)
            if status == '409' and 'deleted' in str((msg.headers or {}).get('Description', '')).lower():
                self._lost = True
        elif msg.reply and msg.reply.startswith('$JS.ACK.'):  # a message of the stream
            self._ready.append(msg)
            if self._open:
                self._open -= 1
        else:  # nothing JetStream sent: someone else published to this inbox
            return
        self._changed.set()

    async def _pull(self, batch: int) -> None:
        self._request += 1
        self._open = batch
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = asyncio.get_running_loop().call_later(
            IDLE_WAKE_S, self._unanswered, self._request)
        request = {'batch': batch, 'expires': int(PULL_EXPIRES_S * 1e9)}
        await self._broker.client.publish(self._next, json.dumps(request).encode(),
                                          reply=f'{self._inbox}.{self._request}')

    async def fetch(self, max_count: int, wait_s: float | None = None) -> Sequence[Delivery]:
        if not self._ready and not self._stopped and (wait_s is None or wait_s > 0):
            if self._lost:
                await self._declare_again()
            if not self._open:
                await self._pull(max_count)
            await self._wait(lambda: bool(self._ready) or not self._open or self._stopped, wait_s)
        if not self._ready:
            return []
        msgs = [self._ready.popleft() for _ in range(min(max_count, len(self._ready)))]
        try:
            return await self._deliveries(msgs)
        except BaseException:
            self._ready.extendleft(reversed(msgs))  # still this consumer's: kept for later
            raise

    def _unanswered(self, request: int) -> None:
        """Pull request ``request`` never ended: a reconnect dropped it, or there is no
        consumer to answer (a pull to a missing consumer gets no reply at all). Pull anew,
        declaring first. One timer per request, not one per wait: most waits are short."""
        if request == self._request and self._open:
            self._open = 0
            self._lost = True
            self._changed.set()

    async def _wait(self, done: Any, wait_s: float | None = None) -> None:
        """Until ``done()``; every wait for an open request ends with it (``_unanswered``
        ends a request the server never did), so only the caller's own bound needs a timer."""
        if wait_s is None:
            while not done():
                self._changed.clear()
                await self._changed.wait()
            return
        try:
            async with asyncio.timeout(wait_s):
                while not done():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:  # the caller's bound (a pull's wait): the request lives on
            return

    async def _declare_again(self) -> None:
        self._broker.forget_stream(self._stream)
        await self._broker.declare_consumer(self._queue, self._visibility_s)
        self._lost = False

    async def _deliveries(self, msgs: list[Msg]) -> list[Delivery]:
        counts = [delivery_of(msg.reply) for msg in msgs]
        free: dict[str, int] = {}
        if any(delivered > 1 for delivered, _ in counts):
            free = await self._free_counts()
        deliveries = []
        for msg, (delivered, seq) in zip(msgs, counts, strict=True):
            spared = free.get(self._names.free_subject(self._queue, seq), 0) if free else 0
            headers = msg.headers
            message_id, synthetic = id_of(headers, f'{self._stream}-{seq}')
            deliveries.append(Delivery(
                msg.data, message_id, max(delivered - spared, 1), Handle(msg, seq, spared),
                user_headers(headers), sent_at_of(headers), synthetic))
        return deliveries

    async def _free_counts(self) -> dict[str, int]:
        js = await self._broker.jetstream()
        try:
            info = await js.stream_info(self._names.free_stream(self._queue),
                                        subjects_filter=self._names.free_subject(self._queue, '>'))
        except nats.js.errors.NotFoundError:
            return {}
        return dict(info.state.subjects or {})

    async def ack(self, delivery: Delivery) -> None:
        handle: Handle = delivery.handle
        await handle.msg.ack()
        await self._forget(handle)

    async def _forget(self, handle: Handle) -> None:
        if handle.free:  # settled: its free-delivery records are no longer needed
            js = await self._broker.jetstream()
            await js.purge_stream(self._names.free_stream(self._queue),
                                  subject=self._names.free_subject(self._queue, handle.seq))

    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        await delivery.handle.msg.nak(delay=max(delay, 0.001))

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        handle: Handle = delivery.handle
        broker = self._broker
        await broker.ensure_dlq(self._queue)
        dedupe = f'{delivery.message_id}@{self._stream}-{handle.seq}'
        headers = copy_headers(handle.msg.headers, dedupe, delivery.message_id)
        if delivery.synthetic_id:  # requeued, it must not pass for the sender's id
            headers[SYNTHETIC] = '1'
        headers.update({ERROR: json.dumps(error), ATTEMPTS: str(delivery.attempt),
                        FAILED_AT: str(int(now_s() * 1000))})
        js = await broker.jetstream()
        # De-duplicated by id and sequence: a dead letter stored twice is stored once.
        await js.publish(self._names.dlq_subject(self._queue), delivery.body, headers=headers)
        await handle.msg.ack()
        await self._forget(handle)

    async def extend(self, delivery: Delivery) -> bool:
        await delivery.handle.msg.in_progress()
        delivery.received_at = time.monotonic()
        return True

    async def stop_fetching(self) -> None:
        self._stopped = True
        self._changed.set()

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        msgs = [d.handle.msg for d in deliveries]
        if self._stopped:
            # Given back while a pull request is open, they would come straight back into it:
            # wait for its end, then give back everything this consumer holds, at once.
            await self._wait(lambda: not self._open)
            msgs.extend(self._ready)
            self._ready.clear()
        await self._give_back(msgs)

    async def _give_back(self, msgs: list[Msg]) -> None:
        if not msgs:
            return
        msgs.sort(key=lambda m: delivery_of(m.reply)[1])  # the queue's own order
        broker = self._broker
        try:
            await broker.ensure_free(self._queue)
            js = await broker.jetstream()
            acks = [await js.publish_async(self._names.free_subject(self._queue, delivery_of(m.reply)[1]))
                    for m in msgs]
            await asyncio.gather(*acks)
        except Exception as exc:
            broker.log.warning('Could not record %d released message(s) of %s as free (%r): they '
                               'will cost an attempt', len(msgs), self._queue, exc)
        for msg in msgs:  # in order: JetStream redelivers them first, in the order given back
            await msg.nak()

    async def close(self) -> None:
        self._stopped = True
        # A pull request still open may bring more: wait for its end, then give all back.
        await self._wait(lambda: not self._open)
        if self._watchdog is not None:
            self._watchdog.cancel()
        leftovers, self._ready = list(self._ready), deque()
        try:
            await self._give_back(leftovers)
        finally:
            if self._sub is not None:
                await self._sub.unsubscribe()
            await self._broker.client.flush(timeout=FLUSH_TIMEOUT_S)  # the last acks out
