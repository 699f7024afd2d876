"""``TestBroker``: the full delivery contract, run on demand, on a virtual clock.

(Not named ``test_broker.py``: pytest would take the module for a test file.)
"""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..broker import AbstractQueueBroker
from ..consumer import Consumer
from ..exceptions import QueueException
from ..in_process import InProcessPrimitives
from ..in_process_options import configure, store
from ..transport import Outgoing, QueueStats, Subscription
from .capture import HandlerErrorLog
from .clock import VirtualClock, check_seconds
from .queues import Activity, VirtualQueue, VirtualSubscription


@dataclass(frozen=True, slots=True)
class ProcessReport:
    """What one ``process_messages()`` or ``advance()`` did.

    ``handled``: messages acknowledged; ``retried``: failed attempts given another one (a
    handler's ``Retry`` included); ``dead_lettered``: messages given up on (poison, ``Reject``,
    out of attempts); ``errors``: the exceptions handlers raised, first first (not ``Retry``,
    ``Reject`` or timeouts).
    """

    handled: int = 0
    retried: int = 0
    dead_lettered: int = 0
    errors: tuple[Exception, ...] = ()


@dataclass(repr=False, eq=False)
class TestBroker(InProcessPrimitives, AbstractQueueBroker):
    """A broker for tests: nothing runs until the test says so, and time is virtual.

    Agents start on it as on any broker; the real engine runs their handlers, but only inside
    ``await broker.process_messages()`` (everything due now) and ``await broker.advance(s)``
    (everything due within the next ``s`` virtual seconds, in time order). Delays, backoff and
    ``Retry(delay=...)`` follow ``broker.clock``; handler timeouts keep real time. Each
    ``TestBroker`` has queues of its own.
    ``max_deliveries``: a run that delivers more gives up with an error (a message loop).
    """

    __test__ = False  # named Test*, yet no test class: pytest must not collect it

    dsn: str = 'test://'
    clock: VirtualClock = field(default_factory=VirtualClock)
    # Deliveries one process_messages()/advance() may make before it gives up: a guard
    # against handlers that keep sending to each other, which would otherwise never settle.
    max_deliveries: int = 100_000

    def __post_init__(self) -> None:
        super().__post_init__()
        self._queues: dict[str, VirtualQueue] = {}
        self._subscriptions: dict[str, VirtualSubscription] = {}
        self._activity = Activity()
        self.log = HandlerErrorLog(self.log, self._activity)
        self._checked: set[str] = set()  # queues already looked for on other brokers
        self._loop: asyncio.AbstractEventLoop | None = None  # where its consumers run

    async def process_messages(self, *, raise_errors: bool = False) -> ProcessReport:
        """Deliver everything due now; return once nothing is due and no handler runs.

        ``raise_errors=True``: re-raise the first exception a handler raised, once all is
        settled (by default failures only follow the retry policy and appear in the report).
        """
        return await self._run(None, raise_errors)

    async def advance(self, seconds: float, *, raise_errors: bool = False) -> ProcessReport:
        """Let ``seconds`` of virtual time pass with the agents running.

        What is due now is handled first; then the clock moves to each next due time within
        the window (a delayed send, a backoff, a ``Retry(delay=...)``, also those scheduled on
        the way) and handles it; the clock ends ``seconds`` later than it started.
        """
        until = self.clock.now() + check_seconds(seconds, 'advance')
        return await self._run(until, raise_errors)

    async def _run(self, until: float | None, raise_errors: bool) -> ProcessReport:
        activity = self._activity
        if activity.processing:
            raise QueueException('process_messages() or advance() is already running on this '
                                 'broker (awaited from a handler?)')
        activity.start()
        try:
            await self._until_idle()
            while until is not None and (due := self._next_due()) is not None and due <= until:
                self._tick(due)
                await self._until_idle()
            if until is not None:
                self._tick(until)
                await self._until_idle()
            report = ProcessReport(activity.handled, activity.retried, activity.dead_lettered,
                                   tuple(activity.errors))
        finally:
            activity.stop()
        if raise_errors and report.errors:
            raise report.errors[0]
        return report

    async def _until_idle(self) -> None:
        self._forget_ended()
        self._check_consumers()
        for subscription in list(self._subscriptions.values()):
            subscription.wake()
        await self._activity.wait_for_change(self._idle, self.max_deliveries)

    def _idle(self) -> bool:
        return all(s.idle() for s in list(self._subscriptions.values()))

    def _forget_ended(self) -> None:
        """Drop the subscriptions of consumers whose loop ended (an earlier test's agents)."""
        loop = asyncio.get_running_loop()
        for subscription in list(self._subscriptions.values()):
            if subscription.loop is not loop:
                self._forget(subscription)

    def _next_due(self) -> float | None:
        times = [t for q in self._queues.values() if (t := q.next_due()) is not None]
        return min(times, default=None)

    def _tick(self, when: float) -> None:
        self.clock.move_to(when)
        for queue in self._queues.values():
            queue.promote_due()

    def _check_consumers(self) -> None:
        """Fail clearly when what waits here is consumed by an agent on another broker."""
        waiting = {name for name, queue in self._queues.items()
                   if name not in self._subscriptions and name not in self._checked
                   and queue.promote_due()}
        if not waiting:
            return
        loop = asyncio.get_running_loop()
        for other in _live_brokers():
            if other is self or getattr(other, '_loop', loop) is not loop:
                continue  # a test double of an earlier test: its consumers ended with their loop
            if taken := sorted(waiting & set(other.info()['consuming'])):
                raise QueueException(
                    f'{taken[0]!r} has messages waiting on this TestBroker, but its agent consumes '
                    f'on {other!r}: start the agent with broker=<this TestBroker>')
        self._checked |= waiting  # found nowhere else: these queues wait on purpose

    async def receive(self, name: str, max_count: int = 1, wait: float = 0.0,
                      visibility: float | None = None, **options: Any) -> Any:
        """Not on a TestBroker: its queues deliver only inside process_messages()/advance()."""
        raise QueueException('receive() is not supported on a TestBroker (it delivers only inside '
                             "process_messages()); test pull code on MemoryBroker('memory://')")

    # primitives -------------------------------------------------------------------------

    def _get(self, name: str) -> VirtualQueue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = VirtualQueue(self.clock)
            configure(queue, name)
        return queue

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        store(self._get, batch)

    async def _subscribe(self, consumer: Consumer) -> Subscription:
        self._loop = asyncio.get_running_loop()
        name = consumer.queue.name
        subscription = VirtualSubscription(self._get(name), name, self._activity, self._forget)
        self._subscriptions[name] = subscription
        return subscription

    def _forget(self, subscription: VirtualSubscription) -> None:
        if self._subscriptions.get(subscription.name) is subscription:
            del self._subscriptions[subscription.name]

    async def _length(self, name: str, **options: Any) -> int:
        return self._get(name).promote_due()

    # operators' primitives ----------------------------------------------------------------

    async def _stats(self, name: str) -> QueueStats:
        queue = self._get(name)
        subscription = self._subscriptions.get(name)
        in_flight = subscription.in_flight if subscription is not None else 0
        return QueueStats(name, queue.promote_due(), len(queue.delayed), in_flight, len(queue.dead))


def _live_brokers() -> list[AbstractQueueBroker]:
    return AbstractQueueBroker.live_brokers()
