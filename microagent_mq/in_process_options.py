"""Queue options on in-process queues (memory, TestBroker): priorities, bounds, retention.

Chosen when a queue is first used, from its declaration; a queue without options keeps a
plain deque and pays nothing for them.
"""

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

from .exceptions import QueueFull, QueueNotFound
from .queue import Queue
from .transport import Delivery, Outgoing, Retained


class LeveledReady:
    """Ready messages of a queue with priorities: a FIFO per level, taken highest first.

    Quacks like the ``deque`` plain queues use (append, popleft, extendleft, len, clear).
    """

    __slots__ = ('_count', '_levels', '_top')

    def __init__(self, max_priority: int) -> None:
        self._levels: list[deque[Delivery]] = [deque() for _ in range(max_priority + 1)]
        self._top = max_priority
        self._count = 0

    def _level(self, delivery: Delivery) -> deque[Delivery]:
        return self._levels[min(max(delivery.priority, 0), self._top)]

    def append(self, delivery: Delivery) -> None:
        self._level(delivery).append(delivery)
        self._count += 1

    def extendleft(self, deliveries: Iterable[Delivery]) -> None:
        """Each goes back to the front of its own level (a release, in reverse order)."""
        for delivery in deliveries:
            self._level(delivery).appendleft(delivery)
            self._count += 1

    def popleft(self) -> Delivery:
        for level in reversed(self._levels):
            if level:
                self._count -= 1
                return level.popleft()
        raise IndexError('pop from an empty queue')

    def clear(self) -> None:
        for level in self._levels:
            level.clear()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def __iter__(self) -> Iterator[Delivery]:
        for level in reversed(self._levels):
            yield from level


class Journal:
    """What a queue with ``retention`` received, in send order, for history and replay."""

    def __init__(self, retention_s: float) -> None:
        self.retention_s = retention_s
        self._entries: deque[Retained] = deque()
        self._positions = itertools.count(1)

    def add(self, queue: str, message: Outgoing, body: bytes) -> None:
        self._trim()
        self._entries.append(Retained(queue, message.message_id, body, message.sent_at,
                                      message.headers, message.priority, next(self._positions)))

    def read(self, since: float | None, until: float | None, after: Any,
             limit: int) -> tuple[list[Retained], Any]:
        self._trim()
        found: list[Retained] = []
        for entry in self._entries:
            if after is not None and entry.position <= after:
                continue
            if until is not None and entry.sent_at > until:
                return found, None
            if since is not None and entry.sent_at < since:
                continue
            if len(found) == limit:
                return found, found[-1].position
            found.append(entry)
        return found, None

    def _trim(self) -> None:
        oldest = time.time() - self.retention_s
        entries = self._entries
        while entries and entries[0].sent_at < oldest:
            entries.popleft()


class OptionedQueue(Protocol):
    """The part of an in-process queue the options work on."""

    ready: Any  # deque[Delivery] or LeveledReady
    journal: Journal | None
    max_length: int
    drop_oldest: bool
    plain: bool  # none of the options above: a send only puts the message (``store``)

    def put(self, delivery: Delivery, delay: float = 0.0) -> None: ...

    def promote_due(self) -> Any: ...


def configure(queue: OptionedQueue, name: str) -> None:
    """Give a new in-process queue what its declaration asks for."""
    try:
        declared = Queue.get(name)
    except QueueNotFound:  # a pull session's queue declared later, say: plain
        return
    if declared.max_priority:
        queue.ready = LeveledReady(declared.max_priority)
    if declared.retention_s:
        queue.journal = Journal(declared.retention_s)
    queue.max_length = declared.max_length
    # As RabbitMQ's x-overflow: no bound, nothing to drop (not every message dropped at once).
    queue.drop_oldest = declared.max_length > 0 and declared.overflow == 'drop_oldest'
    queue.plain = queue.journal is None and not queue.max_length


def store(get: Callable[[str], OptionedQueue], batch: Sequence[Outgoing]) -> None:
    """Put every message of ``batch`` in its queues, or none when one would overflow."""
    if len(batch) == 1 and len(batch[0].queues) == 1:  # one message to one queue: every send
        message = batch[0]
        name = message.queues[0]
        queue = get(name)
        if queue.plain:
            # Without a bound nor a journal, only the put: _delivery's, in line (every plain
            # send pays for no more than that).
            headers = message.headers
            queue.put(Delivery(bytes(memoryview(message.body)), message.message_id, 1, None,
                               None if headers is None else dict(headers), message.sent_at,
                               False, message.priority), message.delay)
            return
        if queue.max_length:
            _refuse_overflow({name: queue}, batch)
        _put(queue, name, message)
        return
    _store_all(get, batch)


def _store_all(get: Callable[[str], OptionedQueue], batch: Sequence[Outgoing]) -> None:
    # Apart from ``store``: its comprehension would make ``get`` a cell there, made on every call.
    queues = {name: get(name) for message in batch for name in message.queues}  # once each
    for queue in queues.values():
        if queue.max_length:  # counted first, only where a queue has a bound
            _refuse_overflow(queues, batch)
            break
    for message in batch:
        for name in message.queues:
            _put(queues[name], name, message)


def _put(queue: OptionedQueue, name: str, message: Outgoing) -> None:
    """Put ``message`` in ``queue``, then what its options want: a journal entry, a drop."""
    delivery = _delivery(message)
    queue.put(delivery, message.delay)
    if queue.plain:
        return
    if queue.journal is not None:
        queue.journal.add(name, message, delivery.body)
    if queue.drop_oldest and not message.delay:
        ready = queue.ready
        while len(ready) > queue.max_length:
            ready.popleft()


def _delivery(message: Outgoing) -> Delivery:
    """What a queue holds of ``message``: its first attempt."""
    # A copy of exact size (orjson's output keeps a 4 KiB buffer behind it), and headers
    # per queue, as a real broker's wire gives: the sender may reuse its dict.
    headers = message.headers
    return Delivery(bytes(memoryview(message.body)), message.message_id, 1, None,
                    None if headers is None else dict(headers), message.sent_at, False,
                    message.priority)


def _refuse_overflow(queues: dict[str, OptionedQueue], batch: Sequence[Outgoing]) -> None:
    incoming: dict[str, int] = {}
    for message in batch:
        if not message.delay:  # a delayed message counts once it is due
            for name in message.queues:
                incoming[name] = incoming.get(name, 0) + 1
    for name, count in incoming.items():
        queue = queues[name]
        if queue.max_length and not queue.drop_oldest:
            queue.promote_due()
            if len(queue.ready) + count > queue.max_length:
                raise QueueFull(f'queue {name!r} is full ({queue.max_length} messages waiting): '
                                f'nothing of this send was stored')
