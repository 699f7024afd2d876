"""Handled message ids in the outbox's database, for idempotent consumers on any broker."""

import re
import time

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from ..exceptions import ConfigurationError

TABLE_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]{0,62}$')


class SQLIdempotencyStore:
    """``idempotency_store=SQLIdempotencyStore(engine)``: a row per handled id, kept ``window`` s.

    ``await store.create()`` creates its table (``store.table`` for migrations).
    """

    def __init__(self, engine: AsyncEngine, table: str = 'mq_handled') -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(f'SQLIdempotencyStore needs an AsyncEngine, not {type(engine).__name__}')
        if not TABLE_NAME.match(table):
            raise ConfigurationError(f'invalid table name {table!r}: letters, digits, _')
        self.engine = engine
        self.metadata = sa.MetaData()
        self.table = sa.Table(
            table, self.metadata,
            sa.Column('queue', sa.String(255), primary_key=True),
            sa.Column('message_id', sa.String(200), primary_key=True),
            sa.Column('expires_at', sa.Float(), nullable=False),
        )

    async def create(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)

    async def drop(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.drop_all)

    async def seen(self, queue: str, message_id: str) -> bool:
        t = self.table
        query = sa.select(t.c.expires_at).where(t.c.queue == queue, t.c.message_id == message_id)
        async with self.engine.connect() as conn:
            expires = (await conn.execute(query)).scalar_one_or_none()
        return expires is not None and expires > time.time()

    async def record(self, queue: str, message_id: str, window_s: float) -> None:
        t = self.table
        now = time.time()
        async with self.engine.begin() as conn:
            # Delete then insert: portable upsert (one id is recorded by one handler at a time).
            await conn.execute(sa.delete(t).where(t.c.queue == queue, t.c.message_id == message_id))
            await conn.execute(sa.insert(t).values(queue=queue, message_id=message_id,
                                                   expires_at=now + window_s))

    async def purge(self) -> int:
        """Delete expired records; return how many."""
        async with self.engine.begin() as conn:
            result = await conn.execute(sa.delete(self.table).where(self.table.c.expires_at <= time.time()))
        return int(result.rowcount)

    async def close(self) -> None:
        return None  # the engine is the caller's
