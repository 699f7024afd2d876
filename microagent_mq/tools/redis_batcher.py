"""Concurrent script calls share round trips: those that arrive while one is in flight go
together, in one pipeline.

A web app sends from many requests at once. One ``EVALSHA`` per send and per round trip caps
them all at what one connection does sequentially (each send waits a round trip, and
redis-py's pool spreads them over as many connections, each as slow). Here the first call
goes out alone, at once (a lone sequential sender pays nothing more); calls made while it is
in flight wait, then leave together in one pipeline (one write, one read of all the
replies), and those made meanwhile in the next. Each caller still returns only after its own
script ran, with its own result or its own error.

The calls are taken ready-made (a registered script, its keys and arguments): what a script
does, and that it is idempotent (a pipeline redis-py sends again after a lost reply changes
nothing twice), stays the caller's business.
"""

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command
except ImportError:  # pragma: no cover - redis without its [hiredis] extra
    pack_command = None

MAX_BATCH = 1000  # calls per pipeline: bounds one write and one reply's memory

Pending = tuple[Any, int, tuple[Any, ...], 'asyncio.Future[Any]']


class ScriptBatcher:
    """Runs script calls; those made while a round trip is in flight share the next one."""

    def __init__(self, client: Callable[[], Any]) -> None:
        self._client = client  # the current redis-py client (it is made again after a close)
        self._busy = False  # a round trip of ours is in flight
        self._waiting: deque[Pending] = deque()
        self._flusher: asyncio.Task[None] | None = None

    async def call(self, script: Any, keys: int, *keys_and_args: Any) -> Any:
        """Run ``script`` with ``keys`` keys then its arguments; its reply, or its error."""
        if self._busy:
            future = asyncio.get_running_loop().create_future()
            self._waiting.append((script, keys, keys_and_args, future))
            return await future
        self._busy = True
        try:
            return await self._run_one(script, keys, keys_and_args)
        finally:
            self._hand_over()

    async def close(self) -> None:
        """Wait for the calls already made (a pipeline on the wire is never cut)."""
        while self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)

    def _hand_over(self) -> None:
        """After a round trip: the calls that waited go next, together, else nothing is busy."""
        if not self._waiting:
            self._busy = False
        elif self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name='redis-send-batcher')

    async def _run_one(self, script: Any, keys: int, keys_and_args: tuple[Any, ...]) -> Any:
        reply = (await self._exchange([('EVALSHA', script.sha, keys, *keys_and_args)]))[0]
        if isinstance(reply, NoScriptError):  # Redis restarted, or another server: EVAL caches it
            reply = (await self._exchange([('EVAL', script.script, keys, *keys_and_args)]))[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def _flush(self) -> None:
        try:
            while self._waiting:
                batch = self._take()
                if batch:
                    await self._run_batch(batch)
        finally:
            self._flusher = None
            self._busy = False
            # Only a cancelled flush (the loop shutting down) leaves calls: none is stranded.
            while self._waiting:
                self._waiting.popleft()[3].cancel()

    def _take(self) -> list[Pending]:
        """The next calls to send; those whose caller gave up (cancelled) are not sent."""
        waiting, batch = self._waiting, list[Pending]()
        while waiting and len(batch) < MAX_BATCH:
            pending = waiting.popleft()
            if not pending[3].done():
                batch.append(pending)
        return batch

    async def _run_batch(self, batch: list[Pending]) -> None:
        try:
            if len(batch) == 1:
                script, keys, keys_and_args, _ = batch[0]
                replies: list[Any] = [await self._run_one(script, keys, keys_and_args)]
            else:
                replies = await self._exchange([('EVALSHA', script.sha, keys, *keys_and_args)
                                                for script, keys, keys_and_args, _ in batch])
        except Exception as exc:  # the round trip failed (after redis-py's retries): every call
            for *_, future in batch:
                _settle(future, exc=exc)
            return
        except BaseException:  # cancelled: so are the calls (stored or not, as a cancelled send)
            for *_, future in batch:
                future.cancel()
            raise
        for (script, keys, keys_and_args, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                try:
                    reply = await self._run_one(script, keys, keys_and_args)
                except Exception as exc:
                    _settle(future, exc=exc)
                    continue
            if isinstance(reply, Exception):
                _settle(future, exc=reply)
            else:
                _settle(future, reply)


    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Every command in one write, then every reply (an error reply is returned, not
        raised): redis-py's pipeline, or its ``execute_command`` for one, minus its general
        machinery (per-command parsing of the arguments, packing in Python), which costs a
        call more than the round trip. Retried as redis-py retries a command: the scripts are
        idempotent, so one that ran before a lost reply changes nothing the second time."""
        pool = self._client().connection_pool
        connection = await pool.get_connection()
        try:
            packed = _pack(commands, connection)

            async def exchange() -> list[Any]:
                await connection.send_packed_command(packed, check_health=False)
                return [await _reply(connection) for _ in commands]

            return list(await connection.retry.call_with_retry(
                exchange, lambda error: connection.disconnect()))
        finally:
            await pool.release(connection)


async def _reply(connection: Any) -> Any:
    """One reply; an error reply is returned, not raised (it is its caller's alone)."""
    try:
        return await connection.read_response()
    except ResponseError as exc:
        return exc


def _pack(commands: list[tuple[Any, ...]], connection: Any) -> list[bytes]:
    if pack_command is not None:  # hiredis, in C: several times faster
        return [b''.join([pack_command(command) for command in commands])]
    return list(connection.pack_commands(commands))


def _settle(future: 'asyncio.Future[Any]', result: Any = None, exc: Exception | None = None) -> None:
    if future.done():  # its caller was cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
