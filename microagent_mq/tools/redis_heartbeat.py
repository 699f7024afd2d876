"""A live consumer's heartbeat: it renews its hold on every message it has, so the
visibility timeout can be short (fast recovery after a crash) while handlers run long."""

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol


class Holder(Protocol):
    """What the heartbeat renews: a consumer holding messages."""

    def held(self) -> list[Any]:
        """The entries held now."""

    async def renew(self, handles: Sequence[Any]) -> list[Any]:
        """Renew the hold on ``handles``; returns those lost to another consumer."""


class Heartbeat:
    """Renews ``holder``'s messages every ``every_s`` seconds, in a task it owns."""

    def __init__(self, holder: Holder, every_s: float, log: logging.Logger, name: str) -> None:
        self._holder = holder
        self._every_s = every_s
        self._log = log
        self._name = name
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._holding = asyncio.Event()  # set by held(): an idle holder costs no wake-ups

    def holding(self) -> None:
        """The holder took messages: beat (again) from now on."""
        self._holding.set()

    def start(self) -> None:
        """Start beating (once; later calls do nothing)."""
        if self._task is None and not self._stop.is_set():
            self._task = asyncio.create_task(self._run(), name=f'heartbeat:{self._name}')

    async def stop(self) -> None:
        """Stop beating; waits for a renewal under way."""
        self._stop.set()
        self._holding.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        failing = False
        while True:
            if not self._holder.held():  # nothing to renew: sleep until there is
                self._holding.clear()
                await self._holding.wait()
                if self._stop.is_set():
                    return
            try:
                async with asyncio.timeout(self._every_s):
                    await self._stop.wait()
                return
            except TimeoutError:
                pass
            held = self._holder.held()
            if not held:
                continue
            try:
                lost = await self._holder.renew(held)
            except Exception as exc:  # a dropped connection: the next beat tries again
                if not failing:
                    self._log.warning('Renewing messages of %s failed (%r); will retry',
                                      self._name, exc)
                failing = True
                continue
            if failing:
                self._log.warning('Renewing messages of %s works again', self._name)
                failing = False
            if lost:
                self._log.warning('%d message(s) of %s were taken over by another consumer '
                                  '(this one did not renew them in time)', len(lost), self._name)
