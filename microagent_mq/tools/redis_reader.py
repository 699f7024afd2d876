"""One blocking read for every idle consumer of a broker: many queues cost one connection.

An idle subscription registers its stream keys here and waits. ONE ``XREADGROUP GROUP
microagent_mq <uid> COUNT n BLOCK ... STREAMS s1 .. sN > .. >`` on a connection of the
reader's own reads for all of them; the entries it gets are already pending under the
consumer's name, exactly as if the subscription had read them itself (crash safety is
unchanged), and go to that subscription's inbox. A subscription that got messages leaves the
reader and reads on its own, without blocking, until its queue is empty again.

A registration while a read is under way interrupts it (``CLIENT UNBLOCK`` of the reader's
own connection, never anyone else's), so the next read includes the new stream at once.

Idle subscriptions also share their claims: every ``sweep_every`` one script checks all their
streams for messages to take over (released by a stopping consumer, or abandoned by a dead
one) and wakes only the subscriptions that have some; they claim them as usual.

Cluster mode: a multi-stream read must stay within one slot, so there the broker makes no
reader and every subscription reads on its own (see ``RedisBroker._shared_reader``).
"""

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from .redis_packing import ack_commands, bulk, parse_read, read_command, read_replies

READ_BLOCK_MS = 2000  # an idle read returns this often (a stop never waits for it: unblocked)
REPLY_GRACE_S = 5.0  # a blocking read's reply later than its BLOCK by this: the link is dead
# Claim checks per second the idle subscriptions of one broker may cost together: with many
# queues, each is checked less often (see ``sweep_every``).
CLAIM_CHECKS_PER_S = 20.0
FAIL_PAUSE_S = 0.5
UNBLOCK_AFTER_S = 0.002  # a registration waits this long for the read to return on its own
UNBLOCK_TRIES = 50  # an unblock that finds the read not blocking yet tries again, this often
UNBLOCK_PAUSE_S = 0.002

# Which of KEYS hold entries another consumer may take over: pending and idle for at least
# ARGV[i + 1] ms (a stream without the group counts as nothing). ARGV[1]: the group.
# Returns the 1-based indexes of those streams.
CLAIMABLE = """
local out = {}
for i, key in ipairs(KEYS) do
    local ok, p = pcall(redis.call, 'XPENDING', key, ARGV[1], 'IDLE', ARGV[i + 1], '-', '+', 1)
    if ok and #p > 0 then out[#out + 1] = i end
end
return out
"""

PACKED_CACHE = 100_000  # stream keys kept packed (cleared past this: queues come and go)


class Inbox:
    """A registered subscription's place in the reader: its streams, and what came for it."""

    __slots__ = ('acks', 'claim', 'count', 'entries', 'error', 'min_idle_ms', 'ready', 'streams')

    def __init__(self, streams: Sequence[str], count: int, min_idle_ms: int,
                 acks: tuple[str, list[bytes]] | None = None) -> None:
        self.streams = list(streams)  # read in this order (priority levels: highest first)
        self.count = count
        self.min_idle_ms = min_idle_ms
        # (stream, entry ids) to XACK + XDEL in the next read's pipeline; None once sent
        self.acks = acks if acks and acks[1] else None
        self.entries: list[tuple[Any, Any]] = []  # (stream, entries) as XREADGROUP replies
        self.claim = False  # the sweep found messages to take over
        self.error: BaseException | None = None  # the shared read failed
        self.ready = asyncio.Event()

    def wake(self) -> None:
        self.ready.set()

    def unsent_acks(self) -> list[bytes]:
        """The acks no read has carried (or whose read failed: harmless to send again)."""
        return self.acks[1] if self.acks else []


class SharedReader:
    """Reads for the idle subscriptions of one broker on one connection of its own."""

    def __init__(self, client: Any, group: str, name: str, log: logging.Logger) -> None:
        # ``client``: the broker's pool, for unblocking and sweeping; the reads go through
        # a connection of the reader's own, never one of the pool's.
        self._pool_client = client
        pool = client.connection_pool
        self._conn = pool.connection_class(**pool.connection_kwargs)
        self._packed: dict[str, bytes] = {}  # a stream key as a RESP bulk string
        self._group = group
        self._name = name  # the consumer's name in every group (the broker's uid)
        self._group_bulk, self._name_bulk = bulk(group.encode()), bulk(name.encode())
        self._log = log
        self._inboxes: dict[object, Inbox] = {}  # subscription -> its inbox, in arrival order
        self._reading: dict[object, Inbox] = {}  # the inboxes the read under way covers
        self._read_done = asyncio.Event()
        self._read_done.set()
        self._changed = asyncio.Event()
        self._generation = 0  # one per read
        self._unblocking = -1  # the read an unblock was sent for
        self._conn_id: int | None = None
        self._next_sweep = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._claimable = client.register_script(CLAIMABLE)

    def __len__(self) -> int:
        return len(self._inboxes)

    async def register(self, owner: object, streams: Sequence[str], count: int,
                       min_idle_ms: int, acks: tuple[str, list[bytes]] | None = None) -> Inbox:
        """Wait for ``streams`` in the shared read; the inbox wakes when something came.

        ``acks``: (stream, entry ids) to acknowledge and delete in the next read's pipeline.
        """
        inbox = self._inboxes[owner] = Inbox(streams, count, min_idle_ms, acks)
        if self._task is None or self._task.done():
            self._next_sweep = time.monotonic() + self.sweep_every()
            self._task = asyncio.create_task(self._run(), name='redis-shared-reader')
        self._changed.set()
        if not self._read_done.is_set():
            # A read under way does not cover it. Busy, the read returns soon on its own
            # (then the next one covers it); otherwise interrupt it, so a message for this
            # queue waits at most UNBLOCK_AFTER_S more.
            try:
                async with asyncio.timeout(UNBLOCK_AFTER_S):
                    await self._read_done.wait()
            except TimeoutError:
                await self._unblock()
        return inbox

    async def unregister(self, owner: object) -> Inbox | None:
        """Leave the shared read; once this returns no read under way covers ``owner``.

        Returns its inbox (entries that came meanwhile are pending here: the caller releases
        them), or None if it was not registered.
        """
        inbox = self._inboxes.pop(owner, None)
        if owner in self._reading:
            await self._unblock()
            await self._read_done.wait()
        return inbox

    async def close(self) -> None:
        """Stop reading (the subscriptions have unregistered) and close the connection."""
        self._closing = True
        self._changed.set()
        if self._task is not None:
            await self._unblock()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._conn.disconnect()

    def sweep_every(self) -> float:
        """Seconds between claim checks: a quarter of the shortest visibility timeout, or
        longer with many queues so the checks cost at most CLAIM_CHECKS_PER_S."""
        shortest = min((i.min_idle_ms for i in self._inboxes.values()), default=10_000)
        return max(shortest / 4000, len(self._inboxes) / CLAIM_CHECKS_PER_S)

    async def _unblock(self) -> None:
        """Make the read under way return now, so the next one sees the new registrations."""
        generation = self._generation
        if self._unblocking == generation:
            return  # one unblock per read, however many registrations
        self._unblocking = generation
        try:
            for _ in range(UNBLOCK_TRIES):
                if self._read_done.is_set() or self._generation != generation:
                    return
                if self._conn_id is not None and await self._pool_client.client_unblock(
                        self._conn_id):
                    return
                await asyncio.sleep(UNBLOCK_PAUSE_S)  # not blocking yet: the read is on its way
        except Exception as exc:  # the read returns by its BLOCK anyway
            self._log.debug('Could not unblock the shared reader: %r', exc)

    async def _run(self) -> None:
        while not self._closing:
            if not self._inboxes:
                self._changed.clear()
                await self._changed.wait()
                continue
            if time.monotonic() >= self._next_sweep:
                await self._sweep()
                continue
            # No await between the snapshot and clearing _read_done: a registration that
            # sees a read under way is surely not covered by it (see register).
            self._reading = dict(self._inboxes)
            self._read_done.clear()
            self._generation += 1
            reply: Any = None
            failure: Exception | None = None
            try:
                reply = await self._read(list(self._reading.values()))
            except Exception as exc:
                failure = exc
            finally:
                reading, self._reading = self._reading, {}
                self._read_done.set()
            try:
                if failure is None:
                    self._route(reading, reply)
            except Exception as exc:  # never die silently: those waiting would wait forever
                self._log.exception('The shared read of %d queue(s) failed', len(reading))
                failure = exc
            if failure is not None:
                self._fail(reading, failure)
                await asyncio.sleep(FAIL_PAUSE_S)

    async def _read(self, inboxes: list[Inbox]) -> Any:
        conn = self._conn
        try:
            block = max(int(min(READ_BLOCK_MS / 1000, self._next_sweep - time.monotonic())
                            * 1000), 1)
            acks = [inbox.acks for inbox in inboxes if inbox.acks]
            # The only guard of this connection against a dead link (it is not the pool's,
            # and has no socket_timeout: see redis_pool).
            async with asyncio.timeout(block / 1000 + REPLY_GRACE_S):
                if self._conn_id is None:
                    await conn.send_command('CLIENT', 'ID')
                    self._conn_id = int(await conn.read_response())
                await conn.send_packed_command(
                    b''.join([*(ack_commands(self._pack(stream), ids, self._group_bulk)
                                for stream, ids in acks), self._command(inboxes, block)]),
                    check_health=False)
                # An ack's error raises after the read's reply: its entries stay pending
                # here (close() releases them, or a claim of ours after the visibility).
                reply = await read_replies(conn, len(acks))
            for inbox in inboxes:
                inbox.acks = None  # carried
            return reply
        except BaseException:
            self._conn_id = None  # a reply may be under way: start again on a new connection
            await asyncio.shield(conn.disconnect())
            raise

    def _pack(self, stream: str) -> bytes:
        packed = self._packed.get(stream)
        if packed is None:
            if len(self._packed) > PACKED_CACHE:
                self._packed.clear()
            packed = self._packed[stream] = bulk(stream.encode())
        return packed

    def _command(self, inboxes: list[Inbox], block: int) -> bytes:
        """The XREADGROUP, packed here: redis-py would encode every stream key of every read
        again (most of the cost of a read of hundreds of streams)."""
        streams = [self._pack(stream) for inbox in inboxes for stream in inbox.streams]
        return read_command(self._group_bulk, self._name_bulk, min(i.count for i in inboxes),
                            block, streams)

    def _route(self, reading: dict[object, Inbox], reply: Any) -> None:
        """Hand each stream's entries to its inbox; those subscriptions leave the reader."""
        if not reply:
            return
        by_stream = {stream: (owner, inbox) for owner, inbox in reading.items()
                     for stream in inbox.streams}
        for stream, entries in parse_read(reply):
            owner, inbox = by_stream[stream.decode()]
            inbox.entries.append((stream, entries))
            if self._inboxes.get(owner) is inbox:
                del self._inboxes[owner]
            inbox.wake()

    def _fail(self, reading: dict[object, Inbox], exc: Exception) -> None:
        """A failed read fails every fetch waiting on it: each handles it as its own."""
        for owner, inbox in reading.items():
            inbox.error = exc
            if self._inboxes.get(owner) is inbox:
                del self._inboxes[owner]
            inbox.wake()

    async def _sweep(self) -> None:
        """Wake the idle subscriptions whose streams hold messages to take over."""
        self._next_sweep = time.monotonic() + self.sweep_every()
        owners = list(self._inboxes.items())
        keys = [stream for _, inbox in owners for stream in inbox.streams]
        args = [inbox.min_idle_ms for _, inbox in owners for _ in inbox.streams]
        try:
            found = await self._claimable(keys=keys, args=[self._group, *args])
        except Exception as exc:  # the subscriptions claim on their own once they wake
            self._log.warning('Checking %d idle queues for messages to take over failed: %r',
                              len(owners), exc)
            return
        flat = [(owner, inbox) for owner, inbox in owners for _ in inbox.streams]
        for index in found:
            owner, inbox = flat[int(index) - 1]
            inbox.claim = True
            if self._inboxes.get(owner) is inbox:
                del self._inboxes[owner]
            inbox.wake()
