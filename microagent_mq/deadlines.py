"""Handler timeouts with one timer per consumer, not one per message."""

import asyncio


class Deadlines:
    """Cancels handlers that run past ``timeout_s``.

    ``asyncio.timeout`` arms and cancels a timer for every message; here one timer waits for
    the earliest deadline and is re-armed only when it fires, so a busy consumer pays a dict
    insert and delete per message.
    """

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._running: dict[asyncio.Task[None], float] = {}
        self._expired: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, task: asyncio.Task[None]) -> None:
        """``task`` starts a handler now."""
        loop = task.get_loop()
        deadline = loop.time() + self._timeout_s
        self._running[task] = deadline
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._fire, loop)

    def finish(self, task: asyncio.Task[None]) -> bool:
        """``task``'s handler ended; True if it ran out of time (its cancel is withdrawn)."""
        del self._running[task]
        if task in self._expired:
            self._expired.discard(task)
            task.uncancel()
            return True
        return False

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        earliest = None
        for task, deadline in self._running.items():
            if task in self._expired:
                continue
            if deadline <= now:
                self._expired.add(task)
                task.cancel()
            elif earliest is None or deadline < earliest:
                earliest = deadline
        if earliest is not None:
            self._timer = loop.call_at(earliest, self._fire, loop)

    def close(self) -> None:
        """Disarm the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
