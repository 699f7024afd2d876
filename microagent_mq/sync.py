"""``microagent_mq.sync``: the broker's public API for code without an event loop.

``connect(dsn)`` returns a ``SyncBroker``: one event loop in a daemon thread runs the async
broker; every method hands its coroutine to that loop (``run_coroutine_threadsafe``) and
waits for the result. So it is safe from many threads at once, and works from a thread that
runs a loop of its own (a Jupyter cell, a sync view in an async server): the caller's loop is
never touched, only blocked for the call. ``close()`` ends the thread; ``atexit`` closes what
is left open.
"""

import asyncio
import atexit
import concurrent.futures
import threading
import weakref
from collections.abc import Callable, Coroutine, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

from .broker import AbstractQueueBroker, Message
from .exceptions import QueueException
from .loader import load_queues
from .pull import Received
from .transport import DeadLetter

if TYPE_CHECKING:
    from .messages import Message as TypedMessage

__all__ = ['SyncBroker', 'SyncReceived', 'connect']

T = TypeVar('T')
CLOSE_GRACE_S = 5.0  # what close() gives running consumers of the async broker
_open: 'weakref.WeakSet[SyncBroker]' = weakref.WeakSet()


class BrokerClosed(QueueException):
    """A call on a ``SyncBroker`` after its ``close()``."""


class SyncBroker:
    """The async broker's API as plain functions, queue name first; thread-safe."""

    def __init__(self, broker: AbstractQueueBroker | Callable[[], AbstractQueueBroker]) -> None:
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._closed = False
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name='microagent_mq-sync',
                                        daemon=True)
        self._thread.start()
        started.wait()
        _open.add(self)
        try:
            self._broker = broker if isinstance(broker, AbstractQueueBroker) else self._make(broker)
        except BaseException:
            self.close()
            raise

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(started.set)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    def _make(self, factory: Callable[[], AbstractQueueBroker]) -> AbstractQueueBroker:
        async def make() -> AbstractQueueBroker:  # built in its loop: some bind to the loop
            return factory()

        return self._call(make())

    @property
    def broker(self) -> AbstractQueueBroker:
        """The async broker underneath (use it only in this SyncBroker's loop)."""
        return self._broker

    @property
    def closed(self) -> bool:
        """True once ``close()`` began."""
        return self._closed

    # the public API ---------------------------------------------------------------------

    def send(self, name: str, message: Message, **options: Any) -> None:
        """Send ``message`` to queue (or exchange) ``name``; options as the async ``send``."""
        self._call(self._broker.send(name, message, **options))

    def send_many(self, name: str, messages: Iterable[Message], **options: Any) -> None:
        """Send several messages in one go."""
        self._call(self._broker.send_many(name, list(messages), **options))

    def publish(self, message: 'TypedMessage', **options: Any) -> None:
        """Publish a typed ``Message`` where its class routes it."""
        self._call(self._broker.publish(message, **options))

    def receive(self, name: str, max_count: int = 1, wait: float = 0.0, visibility: float | None = None,
                **options: Any) -> list['SyncReceived']:
        """Pull up to ``max_count`` messages of queue ``name``, waiting up to ``wait`` s."""
        got = self._call(self._broker.receive(name, max_count, wait, visibility, **options))
        return [SyncReceived(self, received) for received in got]

    def length(self, name: str) -> int:
        """Messages waiting in queue ``name``."""
        return self._call(self._broker.queue_length(name))

    def dead_letters(self, name: str, limit: int = 100) -> list[DeadLetter]:
        """The oldest ``limit`` dead letters of queue ``name``."""
        return self._call(self._broker.dead_letters(name, limit))

    def requeue_dead_letters(self, name: str) -> int:
        """Move the dead letters of queue ``name`` back into it; return how many."""
        return self._call(self._broker.requeue_dead_letters(name))

    def close(self) -> None:
        """Wait for calls in progress, close the broker, end the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = set(self._pending)
        _open.discard(self)
        if threading.current_thread() is self._thread:
            raise QueueException('SyncBroker.close() called from its own loop thread')
        concurrent.futures.wait(pending)
        broker = getattr(self, '_broker', None)
        try:
            if broker is not None:
                asyncio.run_coroutine_threadsafe(broker.close(CLOSE_GRACE_S), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = 'closed' if self._closed else 'open'
        return f'<SyncBroker {getattr(self, "_broker", None)!r} {state}>'

    # running a coroutine in the loop ----------------------------------------------------

    def _forget(self, future: 'concurrent.futures.Future[Any]') -> None:
        with self._lock:
            self._pending.discard(future)

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._closed:
                coroutine.close()
                raise BrokerClosed('this SyncBroker is closed: connect() again to send or receive')
            if threading.current_thread() is self._thread:
                coroutine.close()
                raise QueueException('a SyncBroker call from its own loop thread would wait for '
                                     'itself: use the async broker (SyncBroker.broker) there')
            future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
            self._pending.add(future)
        future.add_done_callback(self._forget)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # a KeyboardInterrupt in the caller: the call ends too
            raise


class SyncReceived:
    """A pulled message with synchronous ``ack``, ``retry`` and ``reject``."""

    __slots__ = ('_owner', '_received')

    def __init__(self, owner: SyncBroker, received: Received) -> None:
        self._owner = owner
        self._received = received

    @property
    def data(self) -> dict[str, Any]:
        """The message's body."""
        return self._received.data

    @property
    def message_id(self) -> str:
        """The id the sender gave the message."""
        return self._received.message_id

    @property
    def attempt(self) -> int:
        """1 for the first delivery, 2 for the second..."""
        return self._received.attempt

    @property
    def sent_at(self) -> float:
        """Epoch seconds when it was sent; 0.0 when unknown."""
        return self._received.sent_at

    @property
    def headers(self) -> dict[str, Any]:
        """The metadata sent with the message."""
        return self._received.headers

    def ack(self) -> None:
        """The message was handled: remove it for good."""
        self._owner._call(self._received.ack())

    def retry(self, delay: float | None = None) -> None:
        """Deliver it again after ``delay`` s (None: the backoff)."""
        self._owner._call(self._received.retry(delay))

    def reject(self, reason: str = '') -> None:
        """Move it to the dead letters at once."""
        self._owner._call(self._received.reject(reason))

    def __repr__(self) -> str:
        return f'<SyncReceived {self.message_id} attempt={self.attempt}>'


def connect(dsn: str, queues: str | None = None, **options: Any) -> SyncBroker:
    """A ``SyncBroker`` for ``dsn`` (``memory://``, ``redis://``, ``amqp://``...).

    ``queues``: a declarations file or URL to load first (as ``load_queues``);
    ``options``: passed to the broker class (``prefix=`` for Redis...).
    """
    from .factory import broker_from_dsn

    if queues is not None:
        load_queues(queues)
    return SyncBroker(lambda: broker_from_dsn(dsn, **options))


@atexit.register
def _close_open() -> None:
    for broker in list(_open):
        try:
            broker.close()
        except Exception:  # exiting: nothing to tell anyone
            pass
