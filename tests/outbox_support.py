"""Shared by the outbox tests: databases (real PostgreSQL, SQLite files), a broker that records."""

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from typing import Any

import pytest

from microagent_mq.tools.memory import MemoryBroker
from microagent_mq.transport import Outgoing

PG_URL = os.environ.get('TEST_PG_URL', 'postgresql+asyncpg://postgres@127.0.0.1:5432/test')


def pg_up() -> bool:
    try:
        with socket.create_connection(('127.0.0.1', 5432), timeout=1):
            return True
    except OSError:
        return False


def db_url(kind: str, tmp_path: Any) -> str:
    """The async URL of a database of ``kind``; skip (fail in CI) when PostgreSQL is down."""
    if kind == 'sqlite':
        return f'sqlite+aiosqlite:///{tmp_path}/outbox.db'
    if not pg_up():
        if os.environ.get('CI') == 'true':
            pytest.fail('PostgreSQL not reachable at 127.0.0.1:5432 (CI=true: it must run)')
        pytest.skip('PostgreSQL not reachable at 127.0.0.1:5432')
    return PG_URL


class RecordingBroker(MemoryBroker):
    """A memory broker that remembers every message id it published, in order."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.published: list[str] = []
        self.refuse: Exception | None = None  # raised by every publish while set

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        if self.refuse is not None:
            raise self.refuse
        await super()._publish(batch)
        self.published.extend(m.message_id for m in batch)


class Proxy:
    """A TCP proxy the test owns: ``down()`` refuses and cuts every connection, ``up()`` listens again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, '127.0.0.1', self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def up(self) -> None:
        await self.start()

    async def down(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        await self.down()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pipes = [asyncio.create_task(self._pipe(reader, up_writer)),
                 asyncio.create_task(self._pipe(up_reader, writer))]
        self._tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for task in pipes:
            task.cancel()
        for w in (writer, up_writer):
            w.transport.abort()
            self._writers.discard(w)
        self._tasks.difference_update(pipes)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
