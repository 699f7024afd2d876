"""Pull consumption: ``await broker.receive(name)`` returns messages to settle by hand.

Built on the broker's ``_subscribe`` and the ``Subscription`` primitives only. Each receive
opens a short-lived *session* (a subscription whose capacity is that receive's
``max_count``), fetches until it has something or its ``wait`` is over, then stops fetching;
the session closes once every message it handed out is settled. So nothing stays reserved
for a process that no longer asks (RabbitMQ pushes at most ``max_count`` into a session, and
what it pushed beyond what was handed out is released, without an attempt, at that close),
and on Redis each session is its own member of the consumer group.

Visibility is the pull layer's own, the same on every broker: a ``Received`` not settled
within ``visibility`` seconds is given back as a failed attempt (or dead-lettered when it
was the last one). A process that dies holding messages is covered by the transport:
Redis takes them over once its visibility timeout passes without the session's heartbeat,
RabbitMQ requeues them when the channel closes.
"""

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from .consumer import Consumer
from .exceptions import ConfigurationError, QueueException, SerializingError
from .handling import queue_decoder
from .options import ConsumerOptions
from .queue import Queue, decode
from .transport import Delivery, Subscription

if TYPE_CHECKING:
    from .broker import AbstractQueueBroker

__all__ = ['DEFAULT_VISIBILITY_S', 'PULL_OPTIONS', 'Received', 'iterate', 'receive']

DEFAULT_VISIBILITY_S = 30.0
# A session just opened gets at least this long for its first fetch, even with wait=0:
# RabbitMQ pushes to a new consumer a round trip later (elsewhere a ready message returns
# at once, so this costs nothing when there is one).
FIRST_FETCH_S = 0.1
# Once a receive has a message, it takes more for max_count while they come this often.
BATCH_LINGER_S = 0.01
# Options of ConsumerOptions that mean something to a pull consumer.
PULL_OPTIONS = frozenset({'max_attempts', 'retry_delay', 'retry_delay_max'})
log = logging.getLogger('microagent_mq.pull')
_members = itertools.count(1)
_by_broker: 'weakref.WeakKeyDictionary[AbstractQueueBroker, dict[str, _Puller]]' = weakref.WeakKeyDictionary()


class SettledError(QueueException):
    """A received message was settled already, or given back when its visibility lapsed."""


@dataclass(eq=False)
class _PullConsumer:
    """What a transport's ``_subscribe`` reads from a consumer, for a pull session."""

    queue: Queue
    config: ConsumerOptions
    timeout: float
    member: str  # Redis: this session's name in the consumer group
    name: str = 'pull'


class Received:
    """A message received by ``receive``; settle it with ``ack``, ``retry`` or ``reject``."""

    __slots__ = ('_delivery', '_outcome', '_session', '_timer', 'data')

    def __init__(self, session: '_Session', delivery: Delivery, data: dict[str, Any]) -> None:
        self._session = session
        self._delivery = delivery
        self._outcome: str | None = None  # set at once when settling starts
        self._timer: asyncio.TimerHandle | None = None
        self.data = data

    @property
    def message_id(self) -> str:
        """The id the sender gave the message."""
        return self._delivery.message_id

    @property
    def attempt(self) -> int:
        """1 for the first delivery, 2 for the second..."""
        return self._delivery.attempt

    @property
    def sent_at(self) -> float:
        """Epoch seconds when it was sent; 0.0 when unknown (a foreign producer)."""
        return self._delivery.sent_at

    @property
    def headers(self) -> dict[str, Any]:
        """The metadata sent with the message."""
        return dict(self._delivery.headers or {})

    @property
    def settled(self) -> bool:
        """True once acked, retried, rejected, or given back at the end of its visibility."""
        return self._outcome is not None

    async def ack(self) -> None:
        """The message was handled: remove it for good."""
        self._begin('ack')
        await self._session.settle(self, self._session.sub.ack, self._delivery)

    async def retry(self, delay: float | None = None) -> None:
        """Deliver it again after ``delay`` s (None: the backoff), or dead-letter the last attempt."""
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int | float)
                                  or not delay >= 0):
            raise ConfigurationError(f'retry delay={delay!r}: expected seconds >= 0 or None')
        self._begin('retry')
        await self._session.failed(self, 'retry asked by the receiver', delay)

    async def reject(self, reason: str = '') -> None:
        """Move it to the dead letters at once."""
        self._begin('reject')
        await self._session.dead_letter(self, f'rejected: {reason}')

    def _begin(self, outcome: str) -> None:
        if self._outcome == 'expired':
            raise SettledError(f'message {self.message_id} was not settled within its visibility '
                               f'({self._session.visibility}s) and was given back; {outcome} refused')
        if self._outcome is not None:
            raise SettledError(f'message {self.message_id} is settled already ({self._outcome})')
        self._outcome = outcome
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def __repr__(self) -> str:
        return f'<Received {self.message_id} attempt={self.attempt}>'


class _Session:
    """One receive's subscription; closed when all it handed out is settled."""

    def __init__(self, pull: '_Puller', sub: Subscription, options: ConsumerOptions,
                 visibility: float) -> None:
        self.pull = pull
        self.sub = sub
        self.options = options
        self.visibility = visibility
        self.open: set[Received] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.fetching = True
        self.closed = False

    async def fetch(self, max_count: int, wait: float) -> list[Received]:
        deadline = time.monotonic() + max(wait, FIRST_FETCH_S)
        received: list[Received] = []
        try:
            while True:
                remaining = max(deadline - time.monotonic(), 0.0)
                batch = await self.sub.fetch(max_count, remaining)
                received += [r for d in batch if (r := await self._accept(d)) is not None]
                # Then more while they keep coming: RabbitMQ pushes a batch in several
                # frames, and what this session holds beyond this receive waits for its close.
                while batch and len(received) < max_count:
                    batch = await self.sub.fetch(max_count - len(received), BATCH_LINGER_S)
                    received += [r for d in batch if (r := await self._accept(d)) is not None]
                if received or time.monotonic() >= deadline:
                    return received
        except BaseException:  # cancelled, say: never handed out, so back with no attempt
            await self._give_back(received)
            raise
        finally:
            self.fetching = False
            await self.sub.stop_fetching()
            await self.close_if_done()

    async def _give_back(self, received: list[Received]) -> None:
        for one in received:
            one._begin('released')
            self.open.discard(one)
        if received:
            await self._settle_quietly(self.sub.release, [one._delivery for one in received])

    async def _accept(self, delivery: Delivery) -> Received | None:
        try:
            data = self.pull.decoder(delivery.body)
        except SerializingError as exc:
            await self._settle_quietly(self.sub.dead_letter, delivery, f'poison message: {exc}')
            return None
        if delivery.attempt > self.options.max_attempts:
            await self._settle_quietly(self.sub.dead_letter, delivery, 'delivered more than '
                                       'max_attempts times (its receivers died holding it)')
            return None
        received = Received(self, delivery, data)
        self.open.add(received)
        received._timer = asyncio.get_running_loop().call_later(
            self.visibility, self._expire_soon, received)
        return received

    async def _settle_quietly(self, action: Callable[..., Any], *args: object) -> None:
        try:
            await action(*args)
        except Exception:
            log.exception('Settling a message of %s failed; it will be delivered again', self.pull.name)

    def _expire_soon(self, received: Received) -> None:
        received._timer = None
        if received._outcome is not None:
            return
        received._outcome = 'expired'
        task = asyncio.create_task(self._settle_quietly(
            self.failed, received, f'not settled within visibility ({self.visibility}s)', 0.0))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def failed(self, received: Received, error: str, delay: float | None) -> None:
        attempt = received.attempt
        if attempt >= self.options.max_attempts:
            await self.dead_letter(received, f'{error} (attempt {attempt} of {self.options.max_attempts})')
            return
        delay = self.options.backoff(attempt) if delay is None else delay
        await self.settle(received, self.sub.retry_later, received._delivery, delay, error)

    async def dead_letter(self, received: Received, error: str) -> None:
        log.error('Message %s of %s dead-lettered after %d attempt(s): %s', received.message_id,
                  self.pull.name, received.attempt, error)
        await self.settle(received, self.sub.dead_letter, received._delivery, error)

    async def settle(self, received: Received, action: Callable[..., Any], *args: object) -> None:
        try:
            await action(*args)
        finally:
            self.open.discard(received)
            await self.close_if_done()

    async def close_if_done(self) -> None:
        if self.fetching or self.open or self.closed:
            return
        self.closed = True
        self.pull.sessions.discard(self)
        await self._settle_quietly(self.sub.close)

    async def abandon(self) -> None:
        """The broker closes: what is still open may have been handled, so it costs an attempt."""
        for received in list(self.open):
            if received._outcome is None:
                received._begin('closed')
                await self._settle_quietly(self.failed, received, 'broker closed before it was '
                                           'settled', 0.0)
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.fetching = False
        self.open.clear()
        await self.close_if_done()


class _Puller:
    """The pull consumer of one queue on one broker: its sessions."""

    def __init__(self, broker: 'AbstractQueueBroker', queue: Queue) -> None:
        self.broker = broker
        self.queue = queue
        self.name = queue.name
        self.decoder = queue_decoder(queue) or decode
        self.sessions: set[_Session] = set()

    async def open(self, max_count: int, options: ConsumerOptions, visibility: float) -> _Session:
        # visibility_timeout None: the transport's own crash recovery (Redis: its default,
        # a live session's hold renewed by its heartbeat; NATS: ack_wait = timeout + margin).
        config = ConsumerOptions(max_attempts=options.max_attempts, concurrency=max_count, prefetch=0,
                                 retry_delay=options.retry_delay, retry_delay_max=options.retry_delay_max)
        member = f'{self.broker.uid}-pull-{next(_members)}'
        spec = _PullConsumer(self.queue, config, visibility, member)
        # The broker's protected primitive, as the engine's bind() uses it.
        sub: Subscription = await self.broker._subscribe(cast(Consumer, spec))
        session = _Session(self, sub, options, visibility)
        self.sessions.add(session)
        return session

    async def close(self) -> None:
        for session in list(self.sessions):
            await session.abandon()


def _pullers(broker: 'AbstractQueueBroker') -> dict[str, _Puller]:
    pullers = _by_broker.get(broker)
    if pullers is None:
        pullers = _by_broker[broker] = {}

        async def close_all() -> None:
            for puller in list(pullers.values()):
                await puller.close()
            pullers.clear()

        broker.on_close(close_all)
    return pullers


def check_options(max_count: int, wait: float, visibility: float | None,
                  options: dict[str, Any]) -> tuple[ConsumerOptions, float]:
    """Validate receive()'s arguments; return the delivery options and the visibility."""
    if isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1:
        raise ConfigurationError(f'max_count={max_count!r}: expected an int >= 1')
    if isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0:
        raise ConfigurationError(f'wait={wait!r}: expected seconds >= 0')
    if unknown := sorted(set(options) - PULL_OPTIONS):
        raise ConfigurationError(f'unknown receive options {unknown}; known: {sorted(PULL_OPTIONS)}')
    if visibility is None:
        visibility = DEFAULT_VISIBILITY_S
    if isinstance(visibility, bool) or not isinstance(visibility, int | float) or not visibility > 0:
        raise ConfigurationError(f'visibility={visibility!r}: expected seconds > 0')
    parsed = ConsumerOptions.parse(options, 0.0)
    return parsed, float(visibility)


async def receive(broker: 'AbstractQueueBroker', name: str, max_count: int = 1, wait: float = 0.0,
                  visibility: float | None = None, **options: Any) -> list[Received]:
    """Up to ``max_count`` messages of queue ``name``, waiting up to ``wait`` s for the first."""
    parsed, visibility = check_options(max_count, wait, visibility, options)
    queue = broker._queue(name)
    pullers = _pullers(broker)
    puller = pullers.get(queue.name)
    if puller is None:
        puller = pullers[queue.name] = _Puller(broker, queue)
    session = await puller.open(max_count, parsed, visibility)
    return await session.fetch(max_count, float(wait))


async def iterate(broker: 'AbstractQueueBroker', name: str, batch: int = 1, wait: float = 1.0,
                  visibility: float | None = None, **options: Any) -> AsyncIterator[Received]:
    """Every message of queue ``name``, as it comes, forever (break out of the loop to stop)."""
    check_options(batch, wait, visibility, options)
    while True:
        for received in await receive(broker, name, batch, wait, visibility, **options):
            yield received

