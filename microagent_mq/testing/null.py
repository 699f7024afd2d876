"""``NullBroker``: accepts and records every message, delivers none."""

import asyncio
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..broker import AbstractQueueBroker
from ..consumer import Consumer
from ..transport import DeadLetter, Delivery, Outgoing, QueueStats, Subscription

# The message objects a publish is sending, paired in order with the records it makes.
# Per task (a context variable), so concurrent publishes cannot swap their messages.
_publishing: ContextVar['deque[Any] | None'] = ContextVar('null_broker_publishing', default=None)


@dataclass(frozen=True, slots=True)
class Published:
    """One message a ``NullBroker`` accepted.

    ``queue``: the name it was sent to (a queue, or an exchange); ``queues``: the queues that
    take a copy of it (for an exchange: those whose topics match); ``data``: the body parsed
    back from JSON, exactly as a consumer would get it; ``message``: the ``Message`` object
    when one was published (None for a dict sent); ``delay``: seconds, 0.0 when none;
    ``priority``: as sent (0 when none).
    """

    queue: str
    topic: str
    data: dict[str, Any]
    message: Any = None
    headers: dict[str, Any] | None = None
    delay: float = 0.0
    queues: tuple[str, ...] = ()
    message_id: str = ''
    priority: int = 0


@dataclass(repr=False, eq=False)
class NullBroker(AbstractQueueBroker):
    """A broker for unit tests of code that sends: nothing is delivered, all is recorded.

    Sends go through the same checks and serialisation as on a real broker (a message that
    is not JSON-able, an unknown queue or a bad option fails here too); each accepted message
    becomes a ``Published`` in ``broker.published``. Agents may start on it: they get nothing.
    """

    dsn: str = 'null://'
    published: list[Published] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._loop: asyncio.AbstractEventLoop | None = None  # where its consumers run

    def published_to(self, name: str) -> list[Published]:
        """The records sent to ``name`` or of which queue ``name`` takes a copy."""
        return [p for p in self.published if p.queue == name or name in p.queues]

    def clear(self) -> None:
        """Forget what was published."""
        self.published.clear()

    async def publish(self, message: Any, delay: float | None = None,
                      headers: dict[str, Any] | None = None, priority: int | None = None) -> None:
        """As on every broker; the record keeps ``message`` itself."""
        with self._publishing([message]):
            await super().publish(message, delay, headers, priority)

    async def publish_many(self, messages: Iterable[Any], delay: float | None = None,
                           headers: dict[str, Any] | None = None,
                           priority: int | None = None) -> None:
        """As on every broker; each record keeps its message."""
        messages = list(messages)
        with self._publishing(messages):
            await super().publish_many(messages, delay, headers, priority)

    @contextmanager
    def _publishing(self, messages: Sequence[Any]) -> Iterator[None]:
        """Inside, the records ``_publish`` makes get ``messages`` as ``message``, in order.

        For the typed layer's ``publish`` / ``publish_many``: wrap the base call in it.
        """
        token = _publishing.set(deque(messages))
        try:
            yield
        finally:
            _publishing.reset(token)

    def _record(self, outgoing: Outgoing, message: Any = None) -> Published:
        """Turn one message that passed the send path into a ``Published``."""
        record = Published(
            queue=outgoing.exchange or outgoing.queues[0],
            topic=outgoing.topic,
            data=orjson.loads(outgoing.body),
            message=message,
            # A copy: the sender may reuse its dict for the next message.
            headers=dict(outgoing.headers) if outgoing.headers is not None else None,
            delay=outgoing.delay,
            queues=outgoing.queues,
            message_id=outgoing.message_id,
            priority=outgoing.priority,
        )
        self.published.append(record)
        return record

    # primitives -------------------------------------------------------------------------

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        pending = _publishing.get()
        for outgoing in batch:
            self._record(outgoing, pending.popleft() if pending else None)

    async def _subscribe(self, consumer: Consumer) -> Subscription:
        self._loop = asyncio.get_running_loop()
        return _NothingSubscription()

    async def _length(self, name: str, **options: Any) -> int:
        return 0

    async def _dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        return []

    async def _requeue_dead_letters(self, name: str) -> int:
        return 0

    async def _stats(self, name: str) -> QueueStats:
        return QueueStats(name, 0, 0, 0, 0)

    async def _purge(self, name: str) -> int:
        return 0

    async def _purge_dead_letters(self, name: str) -> int:
        return 0

    async def _requeue_dead_letters_by_id(self, name: str, ids: frozenset[str]) -> int:
        return 0

    async def _disconnect(self) -> None:
        return None


class _NothingSubscription(Subscription):
    """A subscription that never has a message: its fetch waits until the consumer stops."""

    def __init__(self) -> None:
        self._stopped = asyncio.Event()

    async def fetch(self, max_count: int, wait_s: float | None = None) -> Sequence[Delivery]:
        if wait_s is None:
            await self._stopped.wait()
            return []
        try:
            async with asyncio.timeout(wait_s):
                await self._stopped.wait()
        except TimeoutError:
            pass
        return []

    async def ack(self, delivery: Delivery) -> None:
        raise AssertionError('a NullBroker delivers nothing to settle')

    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        raise AssertionError('a NullBroker delivers nothing to settle')

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        raise AssertionError('a NullBroker delivers nothing to settle')

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        return None

    async def stop_fetching(self) -> None:
        self._stopped.set()

    async def close(self) -> None:
        self._stopped.set()
