"""Shared by the outbox tests: databases (real PostgreSQL, SQLite files), a broker that records."""

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
