"""``AbstractQueueBroker``: the public API, concrete; transports implement a few primitives."""

import asyncio
import itertools
import logging
import math
import os
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self
from uuid import uuid4

from .consumer import Consumer
from .dsn import mask_dsn
from .engine import ConsumerRunner
from .exceptions import ConfigurationError, QueueException, QueueNotFound, SerializingError
from .idempotency import Idempotency
from .messages import check_headers, is_message_class, publication_of, publications
from .middleware.base import Middleware, before_send
from .queue import MAX_PRIORITY, Queue, decode, encode
from .routing import is_valid_topic
from .transport import DeadLetter, Outgoing, QueueStats, Retained, Subscription

__all__ = ['AbstractQueueBroker', 'BoundQueue', 'Consumer']

if TYPE_CHECKING:
    from .messages import Message as TypedMessage
    from .pull import Received

SEND_OPTIONS = frozenset({'topic', 'delay', 'message_id', 'priority'})
MAX_MESSAGE_ID = 200  # characters: a caller's own stable id (an outbox row's, say)
MAX_DELAY_S = 365 * 24 * 3600  # a year: beyond that a delay is a mistake, not a schedule
_NO_OPTIONS: dict[str, Any] = {}  # read only
Message = str | bytes | dict[str, Any]


_live: 'weakref.WeakSet[AbstractQueueBroker]' = weakref.WeakSet()


@dataclass(repr=False, eq=False)
class AbstractQueueBroker(ABC):
    """Broker is an abstract interface with two basic methods - send and bind.

    Every declared queue is an attribute: ``await broker.user_created.send({...})``.
    A transport implements ``_publish``, ``_subscribe``, ``_length``, ``_dead_letters``,
    ``_requeue_dead_letters`` and ``_disconnect``; delivery semantics live in the engine.
    """

    dsn: str
    uid: str = field(default_factory=lambda: str(uuid4()))
    log: logging.Logger = field(default=logging.getLogger('microagent_mq.broker'))
    _bindings: dict[str, Consumer] = field(default_factory=dict)
    # Hooks around every message sent and handled through this broker (see ``Middleware``).
    middlewares: list[Middleware] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._runners: dict[str, ConsumerRunner] = {}
        # Runners whose stop began and has not completed: an agent must not close the broker
        # under them (their handlers still ack, their buffers are still being released).
        self._stopping: dict[str, ConsumerRunner] = {}
        self._forgetting: set[asyncio.Future[None]] = set()
        self._binding = asyncio.Lock()  # two binds of one queue at once must start one runner
        _live.add(self)
        # Message ids: random per broker, then a counter; unique without a uuid per message.
        self._ids = itertools.count(1)
        self._id_prefix = os.urandom(6).hex() + '-'
        # Layers above (pull sessions) register here what close() must end first.
        self._closers: list[Callable[[], Awaitable[None]]] = []

    @staticmethod
    def live_brokers() -> list['AbstractQueueBroker']:
        """Every broker of this process not yet garbage-collected (test tools look here)."""
        return list(_live)

    # public API -----------------------------------------------------------------------

    async def send(self, name: str, message: Message, headers: dict[str, Any] | None = None,
                   **kwargs: Any) -> None:
        """Write a message to queue ``name`` (or to every queue bound to exchange ``name``).

        ``message``: serialized JSON object (a dict is serialized for you).
        ``topic=``: routing key for an exchange; ``delay=``: seconds before it is delivered;
        ``message_id=``: the caller's stable id (1 to 200 characters) instead of a fresh one,
        so a message sent again (an outbox relay's retry) is known as the same message.
        ``priority=``: 0 to the queue's ``max_priority``; higher is delivered first.
        ``headers=``: metadata beside the body (str keys, JSON values; ``mq-*`` is reserved).
        Raises ``QueueFull`` when the queue is at its ``max_length`` (``overflow='reject'``).
        """
        queue = Queue.get(name)
        # _encode and _outgoing inlined for the common case, one Queue.get: a queue (not an
        # exchange) of the JSON format, no option (what _outgoing checks when there is one).
        if type(queue) is Queue or type(queue).serialize is Queue.serialize:  # the first: cheaper
            body = _body(message)
        else:
            body = _serialized(queue, message)
        if kwargs or queue.exchange == name:  # queue.is_exchange, without its call
            outgoing = self._outgoing(name, body, kwargs)
        else:
            outgoing = Outgoing(body, f'{self._id_prefix}{next(self._ids):x}', (name,), '', '', 0.0,
                                None, time.time())
        if headers is not None:
            outgoing.headers = check_headers(headers)
        if self.middlewares:  # tested here, not in a helper: no extra call per send without them
            await before_send(self.middlewares, [outgoing])
        await self._publish([outgoing])

    async def send_many(self, name: str, messages: Iterable[Message],
                        headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Write several messages in one go, with the same guarantees as ``send``."""
        if 'message_id' in kwargs:  # one id for several messages: the receivers keep only one
            raise ConfigurationError('send_many() takes no message_id= (it would give every message '
                                     'of the batch the same id): send() each message with its own')
        try:
            queue: Queue | None = Queue.get(name)
        except QueueNotFound:  # refused at the first message, as send() would (none: no error)
            queue = None
        if queue is None or kwargs or queue.is_exchange or type(queue).serialize is not Queue.serialize:
            batch = [self._outgoing(name, self._encode(name, m), kwargs) for m in messages]
        else:  # the common case, as in send: the Outgoing _outgoing makes without options
            targets, prefix, ids = (name,), self._id_prefix, self._ids
            batch = [Outgoing(_body(m), f'{prefix}{next(ids):x}', targets, '', '', 0.0, None,
                              time.time()) for m in messages]
        if headers is not None:
            checked = check_headers(headers)
            for outgoing in batch:
                outgoing.headers = checked
        if batch:
            if self.middlewares:
                await before_send(self.middlewares, batch)
            await self._publish(batch)

    async def publish(self, message: 'TypedMessage', delay: float | None = None,
                      headers: dict[str, Any] | None = None, priority: int | None = None) -> None:
        """Publish a ``Message`` where its class routes it (a queue, or an exchange and topic)."""
        outgoing = self._typed_outgoing(message, delay, headers, priority)
        if self.middlewares:
            await before_send(self.middlewares, [outgoing])
        await self._publish([outgoing])

    async def publish_many(self, messages: Iterable['TypedMessage'], delay: float | None = None,
                           headers: dict[str, Any] | None = None,
                           priority: int | None = None) -> None:
        """Publish several messages, each routed by its class, in one go."""
        batch = [self._typed_outgoing(m, delay, headers, priority) for m in messages]
        if batch:
            if self.middlewares:
                await before_send(self.middlewares, batch)
            await self._publish(batch)

    async def send_stored(self, name: str, body: bytes, *, exchange: bool = False, topic: str = '',
                          delay: float = 0.0, headers: dict[str, Any] | None = None,
                          message_id: str | None = None, priority: int = 0) -> None:
        """Send a message encoded and checked earlier (an outbox row), exactly as it was then.

        ``name`` is a queue, or an exchange when ``exchange``; ``headers`` may carry the library's
        own names (a typed message's type), so they are not checked again. A queue or exchange
        this process has not declared is taken as the stored message names it.
        """
        options = {key: value for key, value in
                   (('topic', topic), ('delay', delay), ('message_id', message_id),
                    ('priority', priority)) if value}
        try:
            outgoing = self._outgoing(name, body, options)
        except QueueNotFound:
            if exchange:
                outgoing = self._outgoing_unbound(name, body, options)
            else:
                Queue(name)
                outgoing = self._outgoing(name, body, options)
        outgoing.headers = headers
        if self.middlewares:
            await before_send(self.middlewares, [outgoing])
        await self._publish([outgoing])

    async def receive(self, name: str, max_count: int = 1, wait: float = 0.0,
                      visibility: float | None = None, **options: Any) -> list['Received']:
        """Pull up to ``max_count`` messages of queue ``name``, waiting up to ``wait`` s for one.

        Settle each with ``ack()``, ``retry(delay=None)`` or ``reject(reason)`` within
        ``visibility`` seconds, or it is given back as a failed attempt (docs/pull.md).
        ``options``: ``max_attempts``, ``retry_delay``, ``retry_delay_max`` (as for agents).
        """
        from .pull import receive

        return await receive(self, name, max_count, wait, visibility, **options)

    def queue(self, name: str) -> 'BoundQueue':
        """Queue ``name`` seen through this broker; for names that are no identifier too."""
        return BoundQueue(self, Queue.get(name))

    def on_close(self, closer: Callable[[], Awaitable[None]]) -> None:
        """Have ``close()`` await ``closer()`` before it stops consumers and disconnects."""
        self._closers.append(closer)

    async def bind(self, name: str) -> None:
        """Start reading queue ``name`` with the consumer bound to it."""
        consumer = self._bindings.get(name)
        if consumer is None:
            raise QueueException(f'no consumer is bound to queue {name!r}')
        async with self._binding:
            if name in self._runners:
                return
            guard = Idempotency(consumer, self, self.log) if consumer.config.idempotent else None
            middlewares = [*self.middlewares, *getattr(consumer.agent, 'middlewares', ())]
            subscription = await self._subscribe(consumer)
            if self._bindings.get(name) is not consumer:
                # Unbound (or the broker closed) while subscribing: nobody will stop a runner
                # started now, so the subscription is closed instead of consumed.
                try:
                    await subscription.close()
                    if guard is not None:
                        await guard.close()
                except Exception:
                    self.log.warning('Closing the unwanted subscription to %s failed', name,
                                     exc_info=True)
                self.log.info('Not consuming %s: unbound while binding', name)
                return
            runner = ConsumerRunner(consumer, subscription, self.log, guard, middlewares)
            self._runners[name] = runner
            runner.start()
        self.log.info('Consuming %s with %s', name, consumer.name)

    async def bind_consumer(self, consumer: Consumer) -> None:
        """Bind a consumer of an agent to this broker and start reading its queue."""
        name = consumer.queue.name
        bound = self._bindings.get(name)
        if bound is not None and bound is not consumer:
            raise QueueException(f'queue {name!r} is already consumed by {bound.name}')
        self._bindings[name] = consumer
        try:
            await self.bind(name)
        except BaseException:
            del self._bindings[name]
            raise

    async def unbind(self, name: str, grace: float | None = None) -> None:
        """Stop reading queue ``name``: running handlers get ``grace`` seconds to finish."""
        runner = self._runners.pop(name, None)
        if runner is None:
            runner = self._stopping.get(name)  # stopping already: wait for that stop too
        consumer = self._bindings.get(name)
        if runner is None:  # not consuming, or a bind in progress: that bind sees it and gives up
            self._bindings.pop(name, None)
            return
        # The binding and the runner leave only once the stop completed: until then an agent
        # stopping with us must not take the broker for unused and close it under our handlers.
        self._stopping[name] = runner
        try:
            await runner.stop(grace)
        finally:
            if runner.closed:
                self._stop_done(name, runner, consumer)
            else:  # stopped by its own handler, which settles its message after this, on the
                # runner's subscription: the stop is over only once that is closed
                forget = asyncio.ensure_future(self._forget_when_closed(name, runner, consumer))
                self._forgetting.add(forget)
                forget.add_done_callback(self._forgetting.discard)
        self.log.info('Stopped consuming %s', name)

    async def _forget_when_closed(self, name: str, runner: ConsumerRunner, consumer: Consumer | None) -> None:
        await runner.wait_closed()
        self._stop_done(name, runner, consumer)

    def _stop_done(self, name: str, runner: ConsumerRunner, consumer: Consumer | None) -> None:
        """A stop of ``name`` completed: its runner and binding leave (unless replaced)."""
        if self._stopping.get(name) is runner:
            del self._stopping[name]
        if consumer is not None and self._bindings.get(name) is consumer:
            del self._bindings[name]

    async def queue_length(self, name: str, **options: Any) -> int:
        """Messages waiting in queue ``name`` (not those being handled, nor delayed)."""
        return await self._length(self._queue(name).name, **options)

    async def dead_letters(self, name: str, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters of queue ``name``, left where they are."""
        return await self._dead_letters(self._queue(name).name, limit)

    async def requeue_dead_letters(self, name: str, ids: Collection[str] | None = None) -> int:
        """Move the dead letters of queue ``name`` back into it, as first attempts.

        ``ids``: only the dead letters with these message ids (the others stay).
        """
        queue = self._queue(name).name
        if ids is None:
            count = await self._requeue_dead_letters(queue)
        else:
            count = await self._requeue_dead_letters_by_id(queue, frozenset(ids)) if ids else 0
        if count:
            self.log.info('Requeued %d dead letters into %s', count, name)
        return count

    async def queue_stats(self, name: str) -> QueueStats:
        """How many messages of queue ``name`` are ready, delayed, in flight and dead."""
        return await self._stats(self._queue(name).name)

    async def purge(self, name: str) -> int:
        """Delete the messages waiting in queue ``name`` (ready and, where it can, delayed).

        Messages being handled are not touched. Returns how many were deleted.
        """
        count = await self._purge(self._queue(name).name)
        self.log.warning('Purged %d message(s) from %s', count, name)
        return count

    async def purge_dead_letters(self, name: str) -> int:
        """Delete every dead letter of queue ``name``; returns how many."""
        count = await self._purge_dead_letters(self._queue(name).name)
        self.log.warning('Purged %d dead letter(s) of %s', count, name)
        return count

    async def history(self, name: str, since: 'datetime | float | str | None' = None,
                      limit: int = 100) -> list[Retained]:
        """The oldest ``limit`` messages queue ``name`` retained, sent at ``since`` or later.

        Nothing is sent or removed. The queue must be declared with ``retention``.
        """
        from .replay import history

        return await history(self, name, since, limit)

    async def replay(self, name: str, since: 'datetime | float | str | None' = None,
                     from_id: str | None = None, until: 'datetime | float | str | None' = None) -> int:
        """Send the messages queue ``name`` retained again, in their order; returns how many.

        ``since``/``until``: only those sent in that window (datetimes, epoch seconds or ISO
        strings; ``until`` defaults to now, so what this replay sends is not replayed again).
        ``from_id``: start at the message with this id (inclusive). Each is sent as a new
        message (a new id, a first attempt) with the header ``replayed_from``: the original's id.
        """
        from .replay import replay

        return await replay(self, name, since, from_id, until)

    def _new_message_id(self) -> str:
        return f'{self._id_prefix}{next(self._ids):x}'

    async def close(self, grace: float | None = None) -> None:
        """Stop every consumer at once (see ``unbind``), then close the connections.

        A cancelled ``close()`` still finishes before the cancellation goes on: connections
        closed under consumers that are still giving messages back would strand them.
        """
        task = asyncio.ensure_future(self._close(grace))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                await asyncio.wait({task})
            raise

    async def _close(self, grace: float | None) -> None:
        try:
            closers, self._closers = self._closers, []
            for closer in closers:
                try:
                    await closer()
                except Exception:
                    self.log.exception('Closing %r failed', closer)
            # Also the bindings (a bind in progress gives up) and the stops already under way
            # (closed under them, their handlers' acks and releases would fail).
            names = {*self._runners, *self._bindings, *self._stopping}
            results = await asyncio.gather(*(self.unbind(name, grace) for name in sorted(names)),
                                           return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    self.log.error('Stopping a consumer failed: %r', result)
        finally:
            await self._disconnect()

    def info(self) -> dict[str, Any]:
        """What this broker is, without secrets."""
        return {
            'broker': type(self).__name__,
            'dsn': mask_dsn(self.dsn),
            'uid': self.uid,
            'consuming': sorted(self._runners),
        }

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def __getattr__(self, name: str) -> 'BoundQueue':
        if name.startswith('_'):
            raise AttributeError(name)
        return BoundQueue(self, Queue.get(name))

    def __repr__(self) -> str:
        return f'{type(self).__name__}({mask_dsn(self.dsn)!r}, uid={self.uid!r})'

    # primitives -------------------------------------------------------------------------

    @abstractmethod
    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        """Store every message of ``batch`` durably before returning."""

    @abstractmethod
    async def _subscribe(self, consumer: Consumer) -> Subscription:
        """Declare what the consumer's queue needs and open a subscription to it."""

    @abstractmethod
    async def _length(self, name: str, **options: Any) -> int:
        """Messages ready for delivery in queue ``name``."""

    @abstractmethod
    async def _dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        """Read dead letters without removing them."""

    @abstractmethod
    async def _requeue_dead_letters(self, name: str) -> int:
        """Move dead letters back to their queue; return how many."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close connections; a later call may connect again."""

    # Operators' primitives (admin commands): not abstract, so a transport without them
    # still works for everything else and says so when one is asked for.

    async def _stats(self, name: str) -> QueueStats:
        """Counts of queue ``name``."""
        raise self._unsupported('queue stats')

    async def _purge(self, name: str) -> int:
        """Delete what waits in queue ``name`` (not what is being handled); how many."""
        raise self._unsupported('purge')

    async def _purge_dead_letters(self, name: str) -> int:
        """Delete the dead letters of queue ``name``; how many."""
        raise self._unsupported('dead-letter purge')

    async def _requeue_dead_letters_by_id(self, name: str, ids: frozenset[str]) -> int:
        """Move the dead letters with message ids in ``ids`` back to their queue; how many."""
        raise self._unsupported('requeue by id')

    async def _retained(self, name: str, since: float | None, until: float | None,
                        after: Any, limit: int) -> tuple[list[Retained], Any]:
        """Up to ``limit`` retained messages of ``name`` in send order, sent from ``since`` to
        ``until`` (epoch seconds; None: no bound), after position ``after`` (None: from the
        oldest). Also where to read on: a position, or None when the window holds no more.
        """
        raise self._unsupported('retention and replay')

    def _unsupported(self, what: str) -> QueueException:
        return QueueException(f'{type(self).__name__} does not support {what}')

    # helpers ----------------------------------------------------------------------------

    def _queue(self, name: str) -> Queue:
        queue = Queue.get(name)
        if queue.is_exchange:
            raise QueueException(f'{name!r} is an exchange, not a queue')
        return queue

    def _typed_outgoing(self, message: 'TypedMessage', delay: float | None,
                        headers: dict[str, Any] | None, priority: int | None = None) -> Outgoing:
        how = publications.get(type(message))
        if how is None:
            if not is_message_class(type(message)):
                raise ConfigurationError(f'publish() takes a Message instance, and {type(message).__name__} '
                                         f'is not a Message: send(queue, data) sends a dict')
            how = publication_of(type(message))
        body = how.encode(message)
        options = _NO_OPTIONS
        if delay or how.topic or priority is not None:
            options = {'delay': delay, 'topic': how.topic}
            if priority is not None:
                options['priority'] = priority
        try:
            outgoing = self._outgoing(how.target, body, options)
        except QueueNotFound:
            if how.to_exchange:  # no queue of this process is bound to it (yet)
                outgoing = self._outgoing_unbound(how.target, body, options)
            else:  # registered on first use, as queues.json would have
                Queue(how.target)
                outgoing = self._outgoing(how.target, body, options)
        outgoing.headers = how.headers if headers is None else how.headers_with(headers)
        return outgoing

    def _outgoing_unbound(self, exchange: str, body: bytes, options: dict[str, Any]) -> Outgoing:
        # RabbitMQ routes by its own bindings; the other transports by the registry, so
        # there the message is not stored, as RabbitMQ does with one no queue asked for.
        self.log.debug('No queue of exchange %s is declared here', exchange)
        delay = _checked_delay(options.get('delay') or 0.0)
        message_id = options.get('message_id') or f'{self._id_prefix}{next(self._ids):x}'
        priority = options.get('priority')
        if priority is not None:  # no queue here to check it against: its range only
            priority = _checked_priority(exchange, priority, ())
            if priority > MAX_PRIORITY:
                raise ConfigurationError(f'invalid priority {priority}: 0 to {MAX_PRIORITY} '
                                         f'expected')
        return Outgoing(body, message_id, (), exchange, options.get('topic', ''), float(delay),
                        sent_at=time.time(), priority=priority or 0)

    def _encode(self, name: str, message: Message) -> bytes:
        queue = Queue.get(name)
        # A Queue subclass may define its own data format (the seed's serialize hook).
        return _body(message) if type(queue).serialize is Queue.serialize else _serialized(queue, message)

    def _outgoing(self, name: str, body: bytes, options: dict[str, Any]) -> Outgoing:
        queue = Queue.get(name)
        if not options and queue.exchange != name:  # the common case, checked cheaply (no property call)
            return Outgoing(body, f'{self._id_prefix}{next(self._ids):x}', (name,),
                            sent_at=time.time())
        if unknown := options.keys() - SEND_OPTIONS:
            raise ConfigurationError(f'unknown send options {sorted(unknown)}')
        topic = options.get('topic') or ''
        delay = options.get('delay') or 0.0
        if not isinstance(topic, str) or not is_valid_topic(topic):
            raise ConfigurationError(f'invalid topic {topic!r}: dot-separated words expected')
        delay = _checked_delay(delay)
        if topic and not queue.is_exchange:
            raise ConfigurationError(f'topic {topic!r}: {name!r} is a queue; topics route '
                                     f'messages sent to an exchange')
        if queue.is_exchange:
            targets = tuple(q.name for q in Queue.bound_to(name, topic))
            exchange = name
            if not targets:  # as RabbitMQ does: a message no queue asked for is not stored
                self.log.debug('No queue of exchange %s takes topic %r: not stored', name, topic)
        else:
            targets, exchange = (name,), ''
        message_id = options.get('message_id')
        if message_id is None:
            message_id = f'{self._id_prefix}{next(self._ids):x}'
        elif not isinstance(message_id, str) or not 0 < len(message_id) <= MAX_MESSAGE_ID:
            shown = repr(message_id)[:60]
            raise ConfigurationError(f'invalid message_id {shown}: a non-empty str of at most '
                                     f'{MAX_MESSAGE_ID} characters expected')
        priority = _checked_priority(name, options['priority'], targets) if 'priority' in options else 0
        return Outgoing(body, message_id, targets, exchange, topic, float(delay),
                        sent_at=time.time(), priority=priority)


@dataclass(frozen=True, slots=True)
class BoundQueue:
    """A queue seen through a broker: ``broker.<queue name>``."""

    broker: AbstractQueueBroker
    queue: Queue

    async def send(self, message: dict[str, Any], **options: Any) -> None:
        """Send ``message`` (a dict); options as in ``AbstractQueueBroker.send``."""
        await self.broker.send(self.queue.name, message, **options)

    async def send_many(self, messages: Iterable[dict[str, Any]], **options: Any) -> None:
        """Send several dicts in one go."""
        await self.broker.send_many(self.queue.name, messages, **options)

    async def length(self) -> int:
        """Messages waiting in this queue."""
        return await self.broker.queue_length(self.queue.name)

    async def receive(self, max_count: int = 1, wait: float = 0.0, visibility: float | None = None,
                      **options: Any) -> list['Received']:
        """Pull messages of this queue (see ``AbstractQueueBroker.receive``)."""
        return await self.broker.receive(self.queue.name, max_count, wait, visibility, **options)

    def iterate(self, batch: int = 1, wait: float = 1.0, visibility: float | None = None,
                **options: Any) -> AsyncIterator['Received']:
        """``async for r in broker.<queue>.iterate():`` every message as it comes; break to stop."""
        from .pull import iterate

        return iterate(self.broker, self.queue.name, batch, wait, visibility, **options)


def _body(message: Message) -> bytes:
    if isinstance(message, dict):
        return encode(message)
    if isinstance(message, str):
        message = message.encode()
    elif not isinstance(message, bytes):
        raise SerializingError(f'a message must be str, bytes or dict, not {type(message).__name__}')
    decode(message)  # refuse what no consumer could read, at the sender
    return message


def _serialized(queue: Queue, message: Message) -> bytes:
    if not isinstance(message, dict):  # already serialised by the caller: check it reads back
        body = message.encode() if isinstance(message, str) else message
        if not isinstance(body, bytes):
            raise SerializingError(f'a message must be str, bytes or dict, not {type(body).__name__}')
        queue.deserialize(body)
        return body
    data = queue.serialize(message)
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes):
        return data
    raise SerializingError(f'{type(queue).__name__}.serialize must return str or bytes, '
                           f'not {type(data).__name__}')


def _checked_priority(name: str, priority: Any, targets: tuple[str, ...]) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 0:
        raise ConfigurationError(f'invalid priority {priority!r}: an integer from 0 to the '
                                 f"queue's max_priority expected")
    for target in targets:
        top = Queue.get(target).max_priority
        if not top:
            raise ConfigurationError(f'priority {priority}: queue {target!r} has no priorities '
                                     f'(declare it with max_priority)')
        if priority > top:
            raise ConfigurationError(f'invalid priority {priority} for queue {target!r}: 0 to '
                                     f'{top} expected (its max_priority)')
    return priority


def _checked_delay(delay: Any) -> float:
    if (isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0
            or not math.isfinite(delay) or delay > MAX_DELAY_S):
        raise ConfigurationError(f'invalid delay {delay!r}: seconds from 0 to {MAX_DELAY_S} expected')
    return float(delay)
