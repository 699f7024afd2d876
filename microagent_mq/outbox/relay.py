"""``OutboxRelay``: publishes committed outbox rows, each with its row's stable message id.

At least once: rows are marked sent in the same transaction that selected them, after they
were published, so a relay killed in between publishes them again (an ``idempotent=True``
consumer skips the copy). PostgreSQL locks the rows it took (``FOR UPDATE SKIP LOCKED``), so
relays running at once never publish one row twice in a pass; SQLite takes its write lock
first, so one relay works at a time.
"""

import asyncio
import contextlib
import logging
import time
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from ..broker import AbstractQueueBroker
from ..exceptions import ConfigurationError, QueueNotFound, SerializingError
from .store import FAILED, PENDING, SENT, Outbox

# Errors no retry can mend: an undeclared queue, a bad option or body. The row is marked
# failed. Anything else (QueueFull, a lost connection) leaves it pending, retried.
PERMANENT = (QueueNotFound, ConfigurationError, SerializingError)
PURGE_EVERY_S = 60.0


class OutboxRelay:
    """``OutboxRelay(outbox, broker)``: ``await relay.start()`` ... ``await relay.stop()``.

    ``poll_interval``: seconds between looks at the table when nothing wakes the relay
    (PostgreSQL wakes it by ``LISTEN``/``NOTIFY`` at each commit). ``batch_size``: rows per
    pass. ``keep``: seconds sent rows stay before they are deleted. ``retry_max``: the cap of
    the backoff while the broker or the database is down.
    """

    def __init__(self, outbox: Outbox, broker: AbstractQueueBroker, *, poll_interval: float = 1.0,
                 batch_size: int = 100, keep: float = 3600.0, retry_max: float = 30.0,
                 log: logging.Logger | None = None) -> None:
        for name, value in (('poll_interval', poll_interval), ('keep', keep), ('retry_max', retry_max)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigurationError(f'OutboxRelay {name}={value!r}: expected seconds >= 0')
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigurationError(f'OutboxRelay batch_size={batch_size!r}: expected an int >= 1')
        self.outbox = outbox
        self.broker = broker
        self.poll_interval = float(poll_interval)
        self.batch_size = batch_size
        self.keep = float(keep)
        self.retry_max = float(retry_max)
        self.log = log or logging.getLogger('microagent_mq.outbox')
        self.published = 0  # rows published by this relay (a row published twice counts twice)
        self.failures = 0  # passes that failed (broker or database down), in total
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._listener: AsyncConnection | None = None
        self._pg: Any = None  # the asyncpg connection that LISTENs
        self._purged_at = 0.0

    async def start(self) -> None:
        """Check the table, listen for commits (PostgreSQL), publish in a task until ``stop``."""
        if self._task is not None:
            return
        await self.outbox.check()
        await self._listen()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f'outbox-relay:{self.outbox.table.name}')

    async def stop(self) -> None:
        """Finish the pass in progress (publish and mark), then stop."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait({task})
        await self._unlisten()

    async def run_once(self) -> int:
        """One pass: publish up to ``batch_size`` pending rows; return how many were settled.

        A broker error on a row ends the pass: what was published is marked, the rest stays
        pending, and the error is raised for the caller to back off.
        """
        outbox, t = self.outbox, self.outbox.table
        sent: list[int] = []
        failed: list[tuple[int, str]] = []
        error: Exception | None = None
        async with outbox.engine.begin() as conn:
            if outbox.dialect == 'sqlite':  # take the write lock now: one relay at a time
                await conn.execute(sa.update(t).where(sa.false()).values(status=t.c.status))
            query = sa.select(t.c.id, t.c.message_id, t.c.queue, t.c.body, t.c.options) \
                .where(t.c.status == PENDING).order_by(t.c.id).limit(self.batch_size) \
                .with_for_update(skip_locked=True)
            for row in (await conn.execute(query)).all():
                try:
                    options: dict[str, Any] = orjson.loads(row.options)
                    await self.broker.send(row.queue, bytes(row.body), message_id=row.message_id,
                                           **options)
                except PERMANENT as exc:
                    self.log.error('Outbox row %s (%s) refused for good: %r', row.id, row.queue, exc)
                    failed.append((row.id, f'{type(exc).__name__}: {exc}'))
                except Exception as exc:
                    error = exc
                    break
                else:
                    sent.append(row.id)
            await self._mark(conn, sent, failed)
            await self._purge(conn)
        self.published += len(sent)
        if error is not None:
            raise error
        return len(sent) + len(failed)

    async def _mark(self, conn: AsyncConnection, sent: list[int], failed: list[tuple[int, str]]) -> None:
        t = self.outbox.table
        now = time.time()
        if sent:
            await conn.execute(sa.update(t).where(t.c.id.in_(sent)).values(status=SENT, sent_at=now))
        for row_id, error in failed:
            await conn.execute(sa.update(t).where(t.c.id == row_id)
                               .values(status=FAILED, sent_at=now, error=error))

    async def _purge(self, conn: AsyncConnection) -> None:
        now = time.time()
        if now - self._purged_at < min(PURGE_EVERY_S, self.keep):
            return
        self._purged_at = now
        t = self.outbox.table
        await conn.execute(sa.delete(t).where(t.c.status == SENT, t.c.sent_at < now - self.keep))

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake.clear()  # a commit from now on wakes the next sleep at once
            try:
                settled = await self.run_once()
            except Exception as exc:  # the broker or the database is down: rows wait, we retry
                failures += 1
                self.failures += 1
                pause = min(0.1 * 2 ** min(failures, 16), self.retry_max)
                self.log.warning('Outbox relay pass failed (%r); retrying in %.1fs', exc, pause)
                await self._sleep(pause)
                continue
            if failures:
                self.log.warning('Outbox relay works again after %d failed passes', failures)
                failures = 0
            if settled < self.batch_size:
                await self._keep_listening()
                await self._sleep(self.poll_interval)

    async def _sleep(self, seconds: float) -> None:
        # A NOTIFY or stop() ends the wait early; one that came during the pass left the
        # event set, so a commit is never left waiting for the next poll.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _listen(self) -> None:
        if self.outbox.engine.dialect.driver != 'asyncpg':
            return  # polling only
        conn = await self.outbox.engine.connect()
        raw = await conn.get_raw_connection()
        pg: Any = raw.driver_connection
        await pg.add_listener(self.outbox.channel, self._notified)
        pg.add_termination_listener(self._notified)  # lost: wake up, then listen again
        self._listener, self._pg = conn, pg

    async def _keep_listening(self) -> None:
        # A database restart closes the LISTEN connection: listen again (until then, poll).
        if self._pg is None or not self._pg.is_closed():
            return
        self.log.warning('Outbox relay lost its LISTEN connection; listening again')
        try:
            await self._unlisten()
            await self._listen()
            self._wake.set()  # commits may have gone unheard meanwhile
        except Exception as exc:
            self.log.warning('Could not listen on %s (%r); polling meanwhile', self.outbox.channel, exc)

    def _notified(self, *_: object) -> None:
        self._wake.set()

    async def _unlisten(self) -> None:
        conn, pg, self._listener, self._pg = self._listener, self._pg, None, None
        if conn is not None:
            try:
                if pg.is_closed():  # never hand a dead connection back to the pool
                    await conn.invalidate()
                else:
                    await pg.remove_listener(self.outbox.channel, self._notified)
                    pg.remove_termination_listener(self._notified)
                await conn.close()
            except Exception:
                self.log.warning('Could not stop listening on %s', self.outbox.channel, exc_info=True)
