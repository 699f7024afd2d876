"""``Outbox``: the table of messages to publish, written in the caller's own transaction."""

import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ..broker import AbstractQueueBroker
from ..consumer import Consumer
from ..exceptions import ConfigurationError, QueueException
from ..messages import Message
from ..transport import DeadLetter, Outgoing, Subscription

PENDING, SENT, FAILED = 0, 1, 2
TABLE_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_]{0,62}$')


class OutboxError(QueueException):
    """The outbox was used in a way that cannot keep its promise."""


class OutboxTableMissing(OutboxError):
    """The outbox table does not exist in the database."""


@dataclass(frozen=True, slots=True)
class FailedMessage:
    """A row the broker refused for good (an undeclared queue, say), with why."""

    id: int
    message_id: str
    queue: str
    body: bytes
    error: str
    created_at: float


def outbox_table(name: str, metadata: sa.MetaData) -> sa.Table:
    """The outbox table ``name`` in ``metadata`` (for users' own Alembic migrations too)."""
    return sa.Table(
        name, metadata,
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), primary_key=True,
                  autoincrement=True),
        sa.Column('message_id', sa.String(200), nullable=False, unique=True),
        sa.Column('queue', sa.String(255), nullable=False),
        sa.Column('body', sa.LargeBinary(), nullable=False),
        sa.Column('options', sa.Text(), nullable=False),  # JSON of the send options
        sa.Column('status', sa.SmallInteger(), nullable=False, default=PENDING),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('sent_at', sa.Float(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Index(f'{name}_status_id', 'status', 'id'),
    )


class Outbox:
    """``Outbox(engine, table='mq_outbox')``: ``add`` in a transaction, an ``OutboxRelay`` publishes.

    ``engine``: an ``AsyncEngine`` (``create_async_engine``). ``table``: the table's name;
    ``outbox.table`` is the SQLAlchemy ``Table`` for migrations; ``await outbox.create()``
    creates it. On PostgreSQL each ``add`` also notifies channel ``table`` at commit, so a
    relay listening there publishes at once instead of at its next poll.
    """

    def __init__(self, engine: AsyncEngine, table: str = 'mq_outbox') -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(f'Outbox needs an AsyncEngine (sqlalchemy.ext.asyncio.'
                                     f'create_async_engine), not {type(engine).__name__}')
        if not isinstance(table, str) or not TABLE_NAME.match(table):
            raise ConfigurationError(f'invalid outbox table name {table!r}: letters, digits, _')
        self.engine = engine
        self.metadata = sa.MetaData()
        self.table = outbox_table(table, self.metadata)
        self.channel = table
        self.dialect = engine.dialect.name
        self._table_checked = False

    async def create(self) -> None:
        """Create the table (and its index) if missing."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)
        self._table_checked = True

    async def drop(self) -> None:
        """Drop the table (tests, teardown)."""
        async with self.engine.begin() as conn:
            await conn.run_sync(self.metadata.drop_all)

    async def check(self) -> None:
        """Raise ``OutboxTableMissing`` unless the table exists."""
        async with self.engine.connect() as conn:
            exists = await conn.run_sync(lambda c: sa.inspect(c).has_table(self.table.name))
        if not exists:
            raise OutboxTableMissing(self._missing())
        self._table_checked = True

    async def add(self, session: AsyncSession, message_or_queue: Any, data: Any = None,
                  **send_options: Any) -> str:
        """Write a message to the outbox in ``session``'s open transaction; return its id.

        ``message_or_queue``: a queue or exchange name, with ``data`` the dict to send;
        ``send_options``: as for ``broker.send`` (``topic``, ``delay``, ``message_id``...). It is
        published only if that transaction commits.
        """
        if not isinstance(session, AsyncSession):
            raise OutboxError(f'outbox.add needs an AsyncSession, not {type(session).__name__}')
        if not session.in_transaction():
            raise OutboxError('outbox.add outside a transaction: call it inside '
                              '"async with session.begin():" or a @transactional function')
        row = self.row(message_or_queue, data, send_options)
        if not self._table_checked:
            exists = await session.run_sync(
                lambda s: sa.inspect(s.connection()).has_table(self.table.name))
            if not exists:
                raise OutboxTableMissing(self._missing())
            self._table_checked = True
        await session.execute(sa.insert(self.table), [row])
        if self.dialect == 'postgresql':  # delivered at commit, dropped at rollback
            await session.execute(sa.select(sa.func.pg_notify(self.channel, '')))
        return str(row['message_id'])

    def row(self, message_or_queue: Any, data: Any, send_options: dict[str, Any]) -> dict[str, Any]:
        """The row for a message, validated as ``send`` would (so errors show at ``add``)."""
        if isinstance(message_or_queue, Message):
            return self._typed_row(message_or_queue, data, send_options)
        if not isinstance(message_or_queue, str):
            raise ConfigurationError(f'outbox.add takes a Message, or a queue or exchange name and '
                                     f'a dict, not {type(message_or_queue).__name__}')
        message_id = send_options.pop('message_id', None) or uuid.uuid4().hex
        body = _CHECKER._encode(message_or_queue, data)
        outgoing = _CHECKER._outgoing(message_or_queue, body, {**send_options, 'message_id': message_id})
        return {
            'message_id': outgoing.message_id,
            'queue': message_or_queue,
            'body': outgoing.body,
            'options': orjson.dumps(send_options).decode(),
            'status': PENDING,
            'created_at': time.time(),
        }

    def _typed_row(self, message: Message, data: Any, send_options: dict[str, Any]) -> dict[str, Any]:
        # Routed and encoded now, as publish() would; the row keeps the type and topic headers
        # so the relay sends exactly this (broker.send_stored).
        if data is not None:
            raise ConfigurationError('outbox.add(message): a Message carries its own data; drop data=')
        if unknown := send_options.keys() - {'delay', 'headers', 'message_id', 'priority'}:
            raise ConfigurationError(f'outbox.add(message): unknown options {sorted(unknown)}')
        message_id = send_options.get('message_id') or uuid.uuid4().hex
        outgoing = _CHECKER._typed_outgoing(message, send_options.get('delay'),
                                            send_options.get('headers'), send_options.get('priority'))
        stored = {'stored': True, 'exchange': bool(outgoing.exchange), 'topic': outgoing.topic,
                  'delay': outgoing.delay, 'headers': outgoing.headers,
                  'priority': outgoing.priority}
        return {
            'message_id': message_id,
            'queue': outgoing.exchange or outgoing.queues[0],
            'body': outgoing.body,
            'options': orjson.dumps(stored).decode(),
            'status': PENDING,
            'created_at': time.time(),
        }

    async def pending(self) -> int:
        """Rows committed and not yet published."""
        return await self._count(PENDING)

    async def sent(self) -> int:
        """Rows published and not yet deleted."""
        return await self._count(SENT)

    async def failed(self, limit: int = 100) -> list[FailedMessage]:
        """Rows the broker refused for good, oldest first."""
        t = self.table
        query = sa.select(t.c.id, t.c.message_id, t.c.queue, t.c.body, t.c.error, t.c.created_at) \
            .where(t.c.status == FAILED).order_by(t.c.id).limit(limit)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [FailedMessage(r.id, r.message_id, r.queue, bytes(r.body), r.error or '', r.created_at)
                for r in rows]

    async def _count(self, status: int) -> int:
        query = sa.select(sa.func.count()).select_from(self.table).where(self.table.c.status == status)
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    def _missing(self) -> str:
        return (f'outbox table {self.table.name!r} does not exist in '
                f'{self.engine.url.render_as_string(hide_password=True)}: '
                f'await outbox.create(), or add outbox.table to your migrations')


class _Checker(AbstractQueueBroker):
    """Never connects: its ``_outgoing`` validates a message exactly as ``send`` does."""

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        raise NotImplementedError

    async def _subscribe(self, consumer: Consumer) -> Subscription:
        raise NotImplementedError

    async def _length(self, name: str, **options: Any) -> int:
        raise NotImplementedError

    async def _dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        raise NotImplementedError

    async def _requeue_dead_letters(self, name: str) -> int:
        raise NotImplementedError

    async def _disconnect(self) -> None:
        return None


_CHECKER = _Checker('outbox://check')
