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
ALARM_SLACK_S = 0.001  # a fetch woken this close to its deadline returns (timers ring early)


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
        # Wakes a waiting fetch at its deadline. One timer serves the fetches after it while
        # it rings no later than theirs (it is not armed and cancelled for every wait: on a
        # queue that gets one message at a time, that cost a few microseconds a message).
        self._alarm: asyncio.TimerHandle | None = None
        self._alarm_loop: asyncio.AbstractEventLoop | None = None  # where it rings

    async def fetch(self, max_count: int, wait_s: float | None = None) -> Sequence[Delivery]:
        if self._stopped:
            return []
        queue = self._queue
        wait = queue.promote_due()
        ready = queue.ready
        idle = IDLE_WAKE_S if wait_s is None else min(wait_s, IDLE_WAKE_S)
        if not ready and idle > 0:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + min(wait or idle, idle)
            while True:
                await self._wait(loop, deadline)
                if self._stopped:
                    return []
                wait = queue.promote_due()
                # Woken by a put, a release or a delayed send (the alarm is still armed), or
                # at the deadline; an alarm of an earlier fetch ringing before it: wait on.
                if ready or self._alarm is not None or deadline - loop.time() < ALARM_SLACK_S:
                    break
                if wait is not None:  # sent with a delay as the alarm rang, due before the deadline
                    deadline = min(deadline, loop.time() + wait)
        batch = [ready.popleft() for _ in range(min(max_count, len(ready)))]
        queue.in_flight += len(batch)
        now = time.monotonic()
        for delivery in batch:
            delivery.received_at = now
        return batch

    async def _wait(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        """Wait for a put (or a stop) to wake this fetch, or for the alarm."""
        alarm = self._alarm
        if alarm is None or alarm.when() > deadline or self._alarm_loop is not loop:
            if alarm is not None:
                alarm.cancel()
            self._alarm, self._alarm_loop = loop.call_at(deadline, self._ring), loop
        waiter = self._waiter = loop.create_future()
        queue = self._queue
        queue.waiters.append(waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if waiter in queue.waiters:  # not woken by the queue: out, or idle waits pile up
                queue.waiters.remove(waiter)

    def _ring(self) -> None:
        self._alarm = None
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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
        if self._alarm is not None:
            self._alarm.cancel()
            self._alarm = None
