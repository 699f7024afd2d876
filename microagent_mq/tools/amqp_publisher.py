"""Publishing on a confirming aiormq channel, concurrent publishes sharing one write.

aiormq's ``basic_publish`` costs each publish a lock, a bounded write-queue slot (10: the
100th of 100 concurrent senders waits for 99 socket writes), a frame object per frame,
futures registered with the channel's and the connection's stores, and one socket write.
Here a publish builds its frames' bytes (``amqp_wire``) and joins the publishes made in the
same turn of the event loop; once per turn they get their delivery tags and enter the
connection's write queue as one item, so the writer makes one socket write for all.

What aiormq does with the confirmations is unchanged: each publish's future waits in the
channel's ``confirmations`` under its delivery tag, resolved by RabbitMQ's ack (one ack
with ``multiple`` confirms many), failed by a nack (``DeliveryError``) or by a return of a
mandatory message (``PublishError``, found through ``message_id_delivery_tag``). A closed
channel fails what waits (as aiormq's future store would).

Delivery tags are the channel's count of publishes, so a tag must be taken and its frames
queued with nothing else published in between: without a pause when the channel's lock is
free and the queue has room, else under the lock (aiormq's publishes take it for the same).

It relies on aiormq's channel internals (``_Channel__lock``, ``write_queue``,
``confirmations``, ``delivery_tag``, ``message_id_delivery_tag``, ``ChannelFrame``), the same
from aiormq 6.8 to 7.2 (read in each release's source); the ``amqp`` extra caps aiormq below 8,
and ``tests/test_amqp_wire.py`` compares the frames with pamqp's.
"""

import asyncio
import weakref
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame
from aiormq.channel import Returning
from aiormq.exceptions import ChannelInvalidStateError

from . import amqp_wire

METHODS_KEPT = 1024  # method frames kept per channel (one per destination)


class Pending:
    """One publish waiting for its turn to be written."""

    __slots__ = ('frames', 'future', 'mandatory', 'message_id', 'tag')

    def __init__(self, frames: bytes, future: 'asyncio.Future[Any]', message_id: str,
                 mandatory: bool) -> None:
        self.frames, self.future = frames, future
        self.message_id, self.mandatory = message_id, mandatory
        self.tag = 0


class Publisher:
    """The publisher of one confirming aiormq channel (``publisher_of``)."""

    def __init__(self, channel: aiormq.Channel) -> None:
        # Weak: the channel keeps its publisher (``publisher_of``), not the other way round.
        self._channel = weakref.ref(channel)
        self.loop = channel.loop
        # The asyncio.Lock behind aiormq's ``Channel.lock`` (a context manager that also
        # refuses a closed channel): whether it is held says if a tag may be taken now.
        self._lock: asyncio.Lock = vars(channel)['_Channel__lock']
        self._methods: dict[tuple[str, str, bool], bytes] = {}
        self._pending: list[Pending] = []
        self._scheduled = False
        self._writer: asyncio.Task[None] | None = None
        # One future in the channel's store: rejected when the channel closes, it fails
        # the publishes of ours still waiting (theirs are each in that store).
        self._watch = channel.create_future()
        self._watch.add_done_callback(self._on_close)

    @property
    def channel(self) -> aiormq.Channel:
        channel = self._channel()
        if channel is None:
            raise ChannelInvalidStateError('the publishing channel is gone')
        return channel

    @property
    def closed(self) -> bool:
        """True once its channel closed: publish on the channel that replaced it."""
        return self._watch.done()

    async def publish(self, body: bytes, properties: bytes, message_id: str, *, exchange: str,
                      routing_key: str, mandatory: bool) -> Any:
        """Publish; return RabbitMQ's ack once it confirmed (raise on a nack or a return).

        ``properties``: ``amqp_wire.properties`` of the message, whose id is ``message_id``.
        """
        pending = self.enqueue(body, properties, message_id, exchange=exchange,
                               routing_key=routing_key, mandatory=mandatory)
        try:
            return await pending.future
        finally:
            self.forget(pending)

    def enqueue(self, body: bytes, properties: bytes, message_id: str, *, exchange: str,
                routing_key: str, mandatory: bool) -> Pending:
        """``publish`` without waiting: await its ``future``, then ``forget`` it.

        For many publishes at once (``send_many``): futures to wait for, no task each.
        """
        channel = self.channel
        if self._watch.done():
            raise self._closed_error()
        key = (exchange, routing_key, mandatory)
        method = self._methods.get(key)
        if method is None:
            if len(self._methods) >= METHODS_KEPT:
                self._methods.clear()
            method = self._methods[key] = amqp_wire.method_frame(
                channel.number, exchange, routing_key, mandatory)
        frames = method + amqp_wire.content_frames(channel.number, properties, body,
                                                   channel.max_content_size)
        pending = Pending(frames, self.loop.create_future(), message_id, mandatory)
        self._pending.append(pending)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._flush)
        return pending

    def forget(self, pending: Pending) -> None:
        """Drop what aiormq keeps to find a returned message, once its publish is answered."""
        channel = self._channel()
        if pending.mandatory and pending.tag and channel is not None:
            tags = channel.message_id_delivery_tag
            if tags.get(pending.message_id) == pending.tag:
                del tags[pending.message_id]

    def _flush(self) -> None:
        self._scheduled = False
        if self._writer is not None:  # it takes these too
            return
        channel = self._channel()
        if channel is None or self._lock.locked() or channel.write_queue.full():
            self._writer = self.loop.create_task(self._write_under_lock())
            return
        batch = self._take()
        if batch:
            channel.write_queue.put_nowait(self._tagged(channel, batch))

    async def _write_under_lock(self) -> None:
        """Write what waits, taking each batch's tags under the channel's lock."""
        batch: list[Pending] = []
        try:
            while self._pending:
                channel = self.channel
                async with channel.lock:  # raises once the channel is closed
                    batch = self._take()
                    if batch:
                        await self._put(channel, batch)
                    batch = []
        except BaseException as exc:  # a closed channel; cancelled with the loop
            self._fail(batch + self._pending, exc)
            self._pending = []
            if not isinstance(exc, Exception):
                raise
        finally:
            self._writer = None

    async def _put(self, channel: aiormq.Channel, batch: list[Pending]) -> None:
        first = channel.delivery_tag
        try:
            await channel.write_queue.put(self._tagged(channel, batch))
        except BaseException:
            # Not written: give the tags back (the lock is held, nobody took more), as
            # aiormq does for a publish of its own.
            channel.delivery_tag = first
            for pending in batch:
                channel.confirmations.pop(pending.tag, None)
                if channel.message_id_delivery_tag.get(pending.message_id) == pending.tag:
                    del channel.message_id_delivery_tag[pending.message_id]
                pending.tag = 0
            raise

    def _take(self) -> list[Pending]:
        """The publishes to write now: the waiting ones whose sender still waits."""
        batch, self._pending = self._pending, []
        if self._watch.done():
            self._fail(batch, None)
            return []
        return [pending for pending in batch if not pending.future.done()]

    @staticmethod
    def _tagged(channel: aiormq.Channel, batch: list[Pending]) -> ChannelFrame:
        """Give each publish its delivery tag; the frames of all, as one write."""
        confirmations = channel.confirmations
        ids = channel.message_id_delivery_tag
        tag = channel.delivery_tag
        for pending in batch:
            tag += 1
            pending.tag = tag
            confirmations[tag] = pending.future
            if pending.mandatory:  # how aiormq finds a returned message's publish
                ids[pending.message_id] = tag
        channel.delivery_tag = tag
        return ChannelFrame(payload=b''.join([pending.frames for pending in batch]),
                            should_close=False)

    def _on_close(self, _: 'asyncio.Future[Any]') -> None:
        channel = self._channel()
        confirmations = channel.confirmations.values() if channel is not None else ()
        # aiormq's own publishes were failed by its store; a ``Returning`` marks a returned one
        waiting = [Pending(b'', future, '', False) for future in confirmations
                   if not isinstance(future, Returning) and not future.done()]
        self._fail(self._pending + waiting, None)
        self._pending = []

    def _fail(self, batch: list[Pending], error: BaseException | None) -> None:
        """Fail the publishes of ``batch`` still waiting: with ``error``, or as closed."""
        if not isinstance(error, Exception):  # none, or a cancellation: the channel is gone
            error = self._closed_error()
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(error)

    def _closed_error(self) -> Exception:
        """What a publish on the closed channel raises: why it closed, when aiormq says."""
        reason = None if self._watch.cancelled() or not self._watch.done() else \
            self._watch.exception()
        if isinstance(reason, Exception):
            return reason
        return ChannelInvalidStateError(f'the publishing channel closed ({reason!r})')


_PUBLISHERS: 'weakref.WeakKeyDictionary[aiormq.Channel, Publisher]' = weakref.WeakKeyDictionary()


def publisher_of(channel: aiormq.Channel) -> Publisher:
    """The one ``Publisher`` of a confirming channel, made on first use."""
    publisher = _PUBLISHERS.get(channel)
    if publisher is None:
        publisher = _PUBLISHERS[channel] = Publisher(channel)
    return publisher
