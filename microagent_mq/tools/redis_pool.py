"""The broker's connection pool: it waits at its limit, and it closes a connection whose
reply is overdue, with one timer for the whole pool instead of one per command.

redis-py's own ``ConnectionPool`` raises ``MaxConnectionsError`` at its limit, and its
``BlockingConnectionPool`` waits but costs every command a condition and a queue (about
15-40 µs of CPU a command, measured on the send path). This one takes the plain pool's path
while a connection is free and waits for a release only when none is.

A dead link must not hang a command. redis-py guards each command with ``socket_timeout``
(5 s by default since redis-py 8, none before): an ``asyncio.wait_for`` per write (a task
per command on Python 3.11) and an ``asyncio.timeout`` per reply: a quarter or more of the
CPU of a message sent and handled end to end (docs/benchmarks.md). The broker turns that off and guards here
instead: a connection checked out for longer than ``command_timeout`` (no command of the
broker holds one that long: its blocking reads block 250 ms at most) has its transport
aborted, so the command waiting on it fails with ``ConnectionError`` and redis-py's retry
sends it again on a new connection (every write of the broker is idempotent).

Taking a free connection and giving it back are done here too, where redis-py 8 would take a
lock, check its arguments for deprecated ones, and record five metrics nobody collects
(redis-py's observability, off unless the application turns it on): about a sixth of the
CPU of a message sent and handled end to end (py-spy, docs/benchmarks.md). The connection is
still checked as redis-py checks it (``ensure_connection``), and the slow path is taken
whenever redis-py's metrics or a re-authentication are on, or the pool has no free connection.
"""

import asyncio
import logging
import time
from typing import Any

from redis.asyncio import ConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import MaxConnectionsError

try:  # redis-py 8: the pool's metrics, recorded only once the application enables them
    from redis.asyncio.observability.recorder import _get_or_create_collector as _metrics
except ImportError:  # an older redis-py records none
    def _metrics() -> Any:  # type: ignore[misc]
        return None

# The lean path needs what it calls of redis-py's pool and connections; a redis-py without
# them takes its own path.
LEAN = hasattr(ConnectionPool, 'ensure_connection') \
    and hasattr(AbstractConnection, 'should_reconnect')

WAIT_S = 20.0  # a command waiting this long for a free connection fails (MaxConnectionsError)
COMMAND_TIMEOUT_S = 10.0  # a connection held this long by one command is taken as dead
WATCH_EVERY_S = 1.0  # how often the checked-out connections are looked at (only while some are)

log = logging.getLogger('microagent_mq.redis')


class WaitingPool(ConnectionPool):
    """``ConnectionPool`` whose ``get_connection`` waits for a free connection at the limit,
    and which aborts a connection held past ``command_timeout`` (see the module's doc)."""

    def __init__(self, *args: Any, command_timeout: float = COMMAND_TIMEOUT_S,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._freed = asyncio.Event()  # set at every release: waiters try again
        self.command_timeout = command_timeout
        self._since: dict[Any, float] = {}  # checked-out connection -> when (or when aborted)
        self._watch: asyncio.TimerHandle | None = None
        self._watch_loop: asyncio.AbstractEventLoop | None = None

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py calls it without arguments (those are deprecated): none are passed on.
        available: list[Any] = self._available_connections
        if available and LEAN and _metrics() is None:
            connection = available.pop()  # no await in between: nobody else takes it
            self._in_use_connections.add(connection)
            try:
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
            return await self._checked_out(connection)
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                connection = await super().get_connection()  # type: ignore[no-untyped-call]
            except MaxConnectionsError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
            else:
                return await self._checked_out(connection)
            self._freed.clear()  # no await since the failed attempt: no release missed
            try:
                async with asyncio.timeout(left):
                    await self._freed.wait()
            except TimeoutError:
                pass  # one last try above, then it raises

    async def _checked_out(self, connection: Any) -> Any:
        # A reply nobody read would be taken for the next command's. redis-py 8 checks for one
        # only while its maintenance notifications are off, and they default to 'auto'.
        try:
            if await connection.can_read():
                log.warning('A pooled Redis connection held an unread reply: reconnecting it')
                await connection.disconnect()
                await connection.connect()
        except BaseException:
            await self.release(connection)
            raise
        self._since[connection] = time.monotonic()
        loop = asyncio.get_running_loop()
        if self._watch is None or self._watch_loop is not loop:  # (a loop ended: re-armed)
            self._watch, self._watch_loop = loop.call_later(WATCH_EVERY_S, self._check), loop
        return connection

    async def release(self, connection: Any) -> None:
        self._since.pop(connection, None)
        # redis-py's release also re-authenticates a connection whose credentials were renewed
        # meanwhile (a streaming credential provider): that one takes its path.
        if LEAN and getattr(connection, '_re_auth_token', None) is None and _metrics() is None:
            self._in_use_connections.remove(connection)
            if connection.should_reconnect():
                await connection.disconnect()
            self._available_connections.append(connection)
        else:
            await super().release(connection)
        self._freed.set()

    def _check(self) -> None:
        """Abort the connections held past ``command_timeout``; look again while any is out."""
        self._watch = None
        now = time.monotonic()
        for connection, since in list(self._since.items()):
            if now - since <= self.command_timeout:
                continue
            self._since[connection] = now  # the command's retry gets a timeout of its own
            writer = getattr(connection, '_writer', None)  # None: not connected (connecting)
            if writer is not None:
                log.warning('A Redis command had no reply within %.1fs: aborting its '
                            'connection (the command is sent again on a new one)',
                            self.command_timeout)
                writer.transport.abort()
        if self._since:
            self._watch = asyncio.get_running_loop().call_later(WATCH_EVERY_S, self._check)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        await super().disconnect(inuse_connections)
