"""``MemoryBroker``: in-process queues with the full delivery contract, for tests and demos."""

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..broker import AbstractQueueBroker
from ..consumer import Consumer
from ..dsn import parse_dsn
from ..in_process import InProcessPrimitives
from ..in_process_options import Journal, configure, store
from ..transport import DeadLetter, Delivery, Outgoing, QueueStats, Subscription, now_s

IDLE_WAKE_S = 1.0  # an idle fetch returns this often, so the engine can look around


@dataclass(eq=False)
class MemoryQueue:
    """One queue: ready messages, delayed ones by due time, and dead letters."""

    ready: deque[Delivery] = field(default_factory=deque)
    delayed: list[tuple[float, int, Delivery]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    waiters: list['asyncio.Future[None]'] = field(default_factory=list)
    in_flight: int = 0  # fetched by a consumer, not settled yet (for stats)
    # The declaration's options (in_process_options.configure): none by default.
    journal: Journal | None = None
    max_length: int = 0
    drop_oldest: bool = False
    plain: bool = True  # no journal, no bound: see in_process_options.store

    def put(self, delivery: Delivery, delay: float = 0.0) -> None:
        if delay > 0:
            heapq.heappush(self.delayed, (time.monotonic() + delay, next(_order), delivery))
        else:
            self.ready.append(delivery)
        self.wake()

    def wake(self) -> None:
        if not self.waiters:
            return
        waiters, self.waiters = self.waiters, []
        for waiter in waiters:
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)

    def promote_due(self) -> float | None:
        """Move due delayed messages to ready; return seconds until the next one is due."""
        delayed = self.delayed
        now = time.monotonic()
        while delayed and delayed[0][0] <= now:
            self.ready.append(heapq.heappop(delayed)[2])
        return delayed[0][0] - now if delayed else None


_order = itertools.count()
_hubs: dict[str, dict[str, MemoryQueue]] = {}


@dataclass(repr=False, eq=False)
class MemoryBroker(InProcessPrimitives, AbstractQueueBroker):
    """``MemoryBroker('memory://NAME')``: brokers with the same DSN share their queues."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parts = parse_dsn(self.dsn, ('memory',))
        self._queues = _hubs.setdefault(parts.netloc + parts.path, {})

    def _get(self, name: str) -> MemoryQueue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = MemoryQueue()
            configure(queue, name)
        return queue

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        store(self._get, batch)

    async def _subscribe(self, consumer: Consumer) -> Subscription:
        return MemorySubscription(self._get(consumer.queue.name), consumer.queue.name)

    async def _length(self, name: str, **options: Any) -> int:
        queue = self._get(name)
        queue.promote_due()
        return len(queue.ready)

    # operators' primitives ----------------------------------------------------------------

    async def _stats(self, name: str) -> QueueStats:
        queue = self._get(name)
        queue.promote_due()
        return QueueStats(name, len(queue.ready), len(queue.delayed), queue.in_flight, len(queue.dead))


class MemorySubscription(Subscription):
    """A consumer's view of a ``MemoryQueue``."""

    def __init__(self, queue: MemoryQueue, name: str) -> None:
        self._queue = queue
        self._name = name
        self._waiter: asyncio.Future[None] | None = None
        self._stopped = False

    async def fetch(self, max_count: int, wait_s: float | None = None) -> Sequence[Delivery]:
        if self._stopped:
            return []
        queue = self._queue
        wait = queue.promote_due()
        ready = queue.ready
        idle = IDLE_WAKE_S if wait_s is None else min(wait_s, IDLE_WAKE_S)
        if not ready and idle > 0:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            queue.waiters.append(waiter)
            try:
                async with asyncio.timeout(min(wait or idle, idle)):
                    await waiter
            except TimeoutError:
                pass
            finally:
                self._waiter = None
                if waiter in queue.waiters:  # not woken: take it out, or idle waits pile up
                    queue.waiters.remove(waiter)
            if self._stopped:
                return []
            queue.promote_due()
        batch = [ready.popleft() for _ in range(min(max_count, len(ready)))]
        queue.in_flight += len(batch)
        now = time.monotonic()
        for delivery in batch:
            delivery.received_at = now
        return batch

    async def stop_fetching(self) -> None:
        self._stopped = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def ack(self, delivery: Delivery) -> None:
        self._queue.in_flight -= 1

    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        self._queue.in_flight -= 1
        self._queue.put(Delivery(delivery.body, delivery.message_id, delivery.attempt + 1, None,
                                 delivery.headers, delivery.sent_at, priority=delivery.priority),
                        delay)

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        self._queue.in_flight -= 1
        self._queue.dead.append(DeadLetter(self._name, delivery.message_id, delivery.body,
                                           error, delivery.attempt, now_s(), delivery.headers,
                                           delivery.sent_at, delivery.priority))

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        self._queue.in_flight -= len(deliveries)
        self._queue.ready.extendleft(reversed(deliveries))
        self._queue.wake()

    async def close(self) -> None:
        return None
