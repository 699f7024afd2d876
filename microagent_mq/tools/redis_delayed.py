"""Moves due delayed messages (retries, delayed sends) of the watched queues into their streams.

Idle queues cost nothing per queue: the mover polls (every ``POLL_S``) only the queues whose
delayed set it knows to be non-empty, and finds the others' new members with ONE
``EXISTS k1 .. kN`` every ``DISCOVER_S`` (an empty sorted set does not exist in Redis).
Delayed writes of this process (``poke``) are polled from the next poll on; those of other
processes are found within ``DISCOVER_S``, so a delay shorter than that, sent by another
process, may be late by up to ``DISCOVER_S``.

Cluster mode: ``EXISTS`` of keys in several slots is split per slot by redis-py's cluster
client (one command per slot).
"""

import asyncio
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .redis import RedisBroker

POLL_S = 0.05
DISCOVER_S = 0.5
FAIL_PAUSE_S = 1.0
MOVE_BATCH = 1000  # delayed messages moved per queue per command; again at once while more
TRIM_EVERY_S = 1.0  # how often the retaining queues consumed here are trimmed (RedisBroker._trim)


class DelayedMover:
    """The broker's mover: a task of its own, started by the first ``watch``."""

    def __init__(self, broker: 'RedisBroker') -> None:
        self._broker = broker
        self.watched: set[str] = set()
        self._busy: set[str] = set()  # delayed set known non-empty: polled every POLL_S
        self._next_discover = 0.0
        self._next_trim = 0.0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # a poke or the stop: a mover asleep wakes up

    def watch(self, queue: str) -> None:
        """Move ``queue``'s due messages from now on (its delayed set is checked at once)."""
        if queue not in self.watched:
            self.watched.add(queue)
            self._next_discover = 0.0
            self._wake.set()
        if self._task is None or self._task.done():
            self._stop, self._wake = asyncio.Event(), asyncio.Event()  # of this event loop
            self._task = asyncio.create_task(self._run(), name='redis-delayed-mover')

    def poke(self, queue: str) -> None:
        """This process just wrote a delayed message of ``queue`` (after the write)."""
        if queue in self.watched:
            self._busy.add(queue)
            self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            # A flag, not cancel(): redis-py may swallow a cancellation mid-command.
            self._stop.set()
            self._wake.set()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.watched.clear()
        self._busy.clear()

    async def _run(self) -> None:
        failing = False
        log = self._broker.log
        while not self._stop.is_set():
            try:
                if time.monotonic() >= self._next_discover:
                    self._next_discover = time.monotonic() + DISCOVER_S
                    await self._discover()
                queues = list(self._busy)
                while queues and not self._stop.is_set():
                    queues = await self.move(queues)  # again at once while more are due
                if time.monotonic() >= self._next_trim:
                    self._next_trim = time.monotonic() + TRIM_EVERY_S
                    await self._broker._trim()
                if failing:
                    log.warning('Moving delayed messages works again')
                    failing = False
            except Exception as exc:
                if not failing:
                    log.warning('Moving delayed messages failed: %r; will retry', exc)
                    failing = True
            # Nothing delayed anywhere: sleep until the next discovery (or trim), or a poke.
            pause = POLL_S if self._busy else max(
                min(self._next_discover, self._next_trim) - time.monotonic(), POLL_S)
            self._wake.clear()
            try:
                async with asyncio.timeout(FAIL_PAUSE_S if failing else pause):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _discover(self) -> None:
        """Find the watched queues whose delayed set has members now."""
        broker = self._broker
        idle = [queue for queue in self.watched if queue not in self._busy]
        if not idle or not await broker.client.exists(*map(broker.delayed_key, idle)):
            return
        async with broker.client.pipeline(transaction=False) as pipe:
            for queue in idle:
                pipe.exists(broker.delayed_key(queue))
            found = await pipe.execute()
        self._busy.update(queue for queue, there in zip(idle, found, strict=True) if there)

    async def move(self, queues: list[str]) -> list[str]:
        """Move up to MOVE_BATCH due messages of each queue; the queues that may have more.

        A queue whose delayed set is empty afterwards leaves the polled ones (unless this
        process wrote to it meanwhile).
        """
        broker = self._broker
        pokes = set(self._busy)
        self._busy.difference_update(queues)  # a poke from here on puts one back
        again: list[str] = []
        now_ms = int(time.time() * 1000)
        try:
            if broker.cluster:  # a cluster pipeline runs no scripts: a call each, side by side
                moves: Any = await asyncio.gather(*(broker._move_due(q, now_ms) for q in queues))
                lefts: Any = await asyncio.gather(*(broker.client.exists(broker.delayed_key(q))
                                                    for q in queues))
            else:
                async with broker.client.pipeline(transaction=False) as pipe:
                    for queue in queues:
                        await broker._pipe_move_due(pipe, queue, now_ms)
                        pipe.exists(broker.delayed_key(queue))
                    replies: Any = await pipe.execute()
                moves, lefts = replies[::2], replies[1::2]
        except BaseException:
            self._busy.update(pokes)
            raise
        for queue, moved, left in zip(queues, moves, lefts, strict=True):
            if left:
                self._busy.add(queue)
            if moved >= MOVE_BATCH:
                again.append(queue)
        return again
