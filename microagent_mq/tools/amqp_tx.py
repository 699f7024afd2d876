"""Settling on transactional consumer channels: a message's copy and its ack commit together.

A retry, dead letter, release or crash count publishes a copy of a message and acks the
original. Done as two steps, a connection drop between them splits one message into two.
In an AMQP transaction (``tx.select`` on the channel that delivered the message), the
publish and the ack take effect at ``tx.commit`` or not at all: a drop before the commit
rolls both back (the original comes back; nothing was copied).

Once a channel is transactional, its plain acks wait for a commit too. They are
committed in groups by one task: an ack is noted and returns; the commit follows within
``ACK_COMMIT_DELAY_S`` (5 ms), or at once when half the prefetch waits for it (a prefetch
slot frees at the commit), and the acks are sent just before it, a run of them in order as
one ``multiple`` ack (``amqp_acks``). Sent at once or just before the commit, an ack takes
effect at the commit all the same. A commit per ack would cost a round trip per message
(+15% CPU end to end, measured); the price of the delay: a consumer killed or cut off
loses up to 5 ms of acks, and those messages come again (counted as attempts).

RabbitMQ makes a transaction atomic for one queue; ours spans the consumed queue and the
copy's queue, so a RabbitMQ node failing in the middle of a commit may still apply one
side (connection drops, the common case, cannot).
"""

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable

from aiormq.abc import AbstractChannel

from .amqp_acks import AckBook

# Plain acks wait at most this long for their commit, so one commit covers several.
ACK_COMMIT_DELAY_S = 0.005

Step = Callable[[], Awaitable[object]]


class Transactions:
    """The transactional channels of one consumer and their commits."""

    def __init__(self, log: logging.Logger, name: str, eager: int) -> None:
        self._log = log
        self._name = name
        self._eager = max(eager, 1)  # this many uncommitted acks are committed at once
        self._acks = 0
        self._lock = asyncio.Lock()  # no commit between a copy and its ack
        self._selected: weakref.WeakSet[AbstractChannel] = weakref.WeakSet()
        self._books: weakref.WeakKeyDictionary[AbstractChannel, AckBook] = (
            weakref.WeakKeyDictionary())
        self._uncommitted: set[AbstractChannel] = set()
        self._pending = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self._closed = False

    async def select(self, channel: AbstractChannel) -> None:
        """Make ``channel`` transactional (once)."""
        async with self._lock:
            await self._select(channel)

    async def _select(self, channel: AbstractChannel) -> None:
        if channel not in self._selected:
            await channel.tx_select()
            self._selected.add(channel)

    def _book(self, channel: AbstractChannel) -> AckBook:
        book = self._books.get(channel)
        if book is None:
            book = self._books[channel] = AckBook()
        return book

    def delivered(self, channel: AbstractChannel, tag: int) -> None:
        """RabbitMQ delivered ``tag`` on ``channel`` (in tag order): open until settled."""
        self._book(channel).delivered(tag)

    def settled(self, channel: AbstractChannel, tag: int) -> None:
        """``tag`` was settled by ``atomically`` (its copy and ack, or its nack, committed)."""
        self._book(channel).settled(tag)

    async def atomically(self, channel: AbstractChannel, *steps: Step) -> None:
        """Run ``steps`` (publishes, acks, nacks on ``channel``) and commit them as one."""
        async with self._lock:
            await self._select(channel)
            if channel in self._uncommitted:  # plain acks first: a rollback would undo them
                await self._commit(channel)
            try:
                for step in steps:
                    await step()
                await channel.tx_commit()
            except BaseException:
                await self._rollback(channel)
                raise

    async def ack(self, channel: AbstractChannel, tag: int) -> None:
        """A plain ack of ``tag`` on ``channel``: sent and committed soon, under the lock (never
        between a copy and its ack, where a rollback would take it along)."""
        if channel not in self._selected or self._closed:
            await channel.basic_ack(tag)  # not transactional (yet): it takes effect as sent
            return
        self._book(channel).ack(tag)
        self._uncommitted.add(channel)
        self._acks += 1
        if self._acks == 1 or self._acks >= self._eager:
            self._pending.set()
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_acks(),
                                                  name=f'commit acks:{self._name}')

    async def _commit_acks(self) -> None:
        pending = self._pending
        while True:
            await pending.wait()
            pending.clear()
            if self._acks < self._eager:  # gather the acks of a few messages
                try:
                    async with asyncio.timeout(ACK_COMMIT_DELAY_S):
                        await pending.wait()
                except TimeoutError:
                    pass
                pending.clear()
            await self._commit_all()

    async def _commit_all(self) -> None:
        async with self._lock:
            for channel in list(self._uncommitted):
                await self._commit(channel)

    async def _commit(self, channel: AbstractChannel) -> None:
        self._uncommitted.discard(channel)
        if not self._uncommitted:
            self._acks = 0
        if channel.is_closed:
            return  # rolled back by RabbitMQ: those messages come again
        try:
            for tag, multiple in self._book(channel).take():
                await channel.basic_ack(tag, multiple=multiple)
            await channel.tx_commit()
        except Exception as exc:
            self._log.info('Committing acks on %s failed (%r): those messages come again',
                           self._name, exc)

    async def close(self) -> None:
        """Commit what is left; stop the committer."""
        async with self._lock:  # never cancel a commit on the wire: its reply would be stray
            self._closed = True
            committer, self._committer = self._committer, None
            if committer is not None:
                committer.cancel()
                await asyncio.gather(committer, return_exceptions=True)
            for channel in list(self._uncommitted):
                await self._commit(channel)

    async def _rollback(self, channel: AbstractChannel) -> None:
        if channel.is_closed:
            return
        try:
            await channel.tx_rollback()
        except Exception as exc:
            self._log.info('Rolling back on %s failed: %r', self._name, exc)
