"""The TestBroker's queues and subscriptions: on a virtual clock, fetched only while processing."""

import asyncio
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..exceptions import QueueException
from ..in_process_options import Journal
from ..transport import DeadLetter, Delivery, Subscription, now_s
from .clock import VirtualClock

_order = itertools.count()  # ties between equal due times keep the order they were put in


def _nothing() -> None:
    return None


@dataclass(eq=False)
class VirtualQueue:
    """Ready messages, delayed ones by virtual due time, and dead letters."""

    clock: VirtualClock
    ready: deque[Delivery] = field(default_factory=deque)
    delayed: list[tuple[float, int, Delivery]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    on_ready: Callable[[], None] = _nothing  # the wake of the subscription reading it
    # The declaration's options (in_process_options.configure): none by default.
    journal: Journal | None = None
    max_length: int = 0
    drop_oldest: bool = False
    plain: bool = True  # no journal, no bound: see in_process_options.store

    def put(self, delivery: Delivery, delay: float = 0.0) -> None:
        if delay > 0:
            heapq.heappush(self.delayed, (self.clock.now() + delay, next(_order), delivery))
        else:
            self.ready.append(delivery)
            self.on_ready()

    def promote_due(self) -> int:
        """Move the delayed messages due by now to the ready ones; return how many are ready."""
        delayed, now = self.delayed, self.clock.now()
        moved = False
        while delayed and delayed[0][0] <= now:
            self.ready.append(heapq.heappop(delayed)[2])
            moved = True
        if moved:
            self.on_ready()
        return len(self.ready)

    def next_due(self) -> float | None:
        """The virtual time the next delayed message is due, if any."""
        return self.delayed[0][0] if self.delayed else None

    def take(self, max_count: int) -> list[Delivery]:
        self.promote_due()
        ready = self.ready
        return [ready.popleft() for _ in range(min(max_count, len(ready)))]


class Activity:
    """What the broker and its subscriptions share: the processing switch and the counts."""

    def __init__(self) -> None:
        self.processing = False
        self.delivered = self.handled = self.retried = self.dead_lettered = 0
        self.errors: list[Exception] = []
        self._changed: asyncio.Event | None = None

    def start(self) -> None:
        self.processing = True
        self.delivered = self.handled = self.retried = self.dead_lettered = 0
        self.errors = []
        self._changed = asyncio.Event()

    def stop(self) -> None:
        self.processing = False
        self._changed = None

    def changed(self) -> None:
        """Something settled or arrived: the broker looks again whether all is idle."""
        if self._changed is not None:
            self._changed.set()

    async def wait_for_change(self, idle: Callable[[], bool], max_deliveries: int) -> None:
        """Return once ``idle()`` holds, looking again after every change."""
        changed = self._changed
        assert changed is not None, 'wait_for_change outside processing'
        while True:
            changed.clear()
            if idle():
                return
            if self.delivered > max_deliveries:
                raise QueueException(
                    f'still busy after {self.delivered} deliveries (max_deliveries={max_deliveries}): '
                    'do handlers keep sending to each other?')
            await changed.wait()


class VirtualSubscription(Subscription):
    """A consumer's view of a ``VirtualQueue``: its fetch waits until the test processes.

    ``in_flight`` counts what the engine fetched and has not settled yet: buffered or being
    handled. Zero, with nothing due in the queue, is this consumer being idle.
    """

    def __init__(self, queue: VirtualQueue, name: str, activity: Activity,
                 on_close: Callable[['VirtualSubscription'], None]) -> None:
        self.queue = queue
        self.name = name
        self.in_flight = 0
        self._activity = activity
        self._on_close = on_close
        self.loop = asyncio.get_running_loop()  # its consumer's, which may end without a close
        self._wake = asyncio.Event()
        self._stopped = False  # stop_fetching or close: fetch returns at once
        queue.on_ready = self.wake

    def wake(self) -> None:
        self._wake.set()

    def idle(self) -> bool:
        return not self.in_flight and (self._stopped or not self.queue.promote_due())

    async def fetch(self, max_count: int, wait_s: float | None = None) -> Sequence[Delivery]:
        # Real time bounds ``wait_s`` (a pull's wait); the virtual clock moves only in advance().
        deadline = None if wait_s is None else asyncio.get_running_loop().time() + wait_s
        while not self._stopped:
            if self._activity.processing and (batch := self.queue.take(max_count)):
                self.in_flight += len(batch)
                self._activity.delivered += len(batch)
                now = time.monotonic()  # real time: the engine measures its renewals with it
                for delivery in batch:
                    delivery.received_at = now
                return batch
            self._wake.clear()
            if deadline is None:
                await self._wake.wait()
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return []
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return []
        return []

    async def ack(self, delivery: Delivery) -> None:
        self._activity.handled += 1
        self._settled(1)

    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        self.queue.put(Delivery(delivery.body, delivery.message_id, delivery.attempt + 1, None,
                                delivery.headers, delivery.sent_at, priority=delivery.priority),
                       delay)
        self._activity.retried += 1
        self._settled(1)

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        self.queue.dead.append(DeadLetter(self.name, delivery.message_id, delivery.body, error,
                                          delivery.attempt, now_s(), delivery.headers,
                                          delivery.sent_at, delivery.priority))
        self._activity.dead_lettered += 1
        self._settled(1)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        self.queue.ready.extendleft(reversed(deliveries))
        self._settled(len(deliveries))
        self.wake()

    async def stop_fetching(self) -> None:
        self._stopped = True
        self.wake()

    async def close(self) -> None:
        if self.queue.on_ready == self.wake:
            self.queue.on_ready = _nothing
        self._stopped = True
        self.wake()
        self._on_close(self)
        self._activity.changed()

    def _settled(self, count: int) -> None:
        self.in_flight -= count
        self._activity.changed()
