"""One consumer in a queue's Redis consumer group: fetch, claim, ack, retry, dead-letter.

Attempts: an entry's ``attempt`` field counts handlings that failed and were retried; Redis'
delivery count of a pending entry adds the deliveries that may have run a handler without
settling it (its consumer died). A delivery that surely ran none (released, or read but
never handed out) is taken back out of that count when the entry is released.
"""

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from ..transport import Delivery, Subscription, now_s
from .redis_codec import MalformedEntry, due_ms, entry_fields, to_delivery
from .redis_heartbeat import Heartbeat
from .redis_packing import ack_commands, bulk, parse_read, read_command, read_replies
from .redis_reader import Inbox, SharedReader

if TYPE_CHECKING:
    from .redis import RedisBroker
    from .redis_scripts import Scripts

GROUP = 'microagent_mq'
GROUP_BULK = bulk(GROUP.encode())
BLOCK_MS = 250  # an idle XREADGROUP returns this often, so a stop never waits long for it
IDLE_WAKE_S = 10.0  # a fetch waiting in the shared read returns empty this often (no command)
ACK_BACKLOG = 1000  # past this many unflushed acks, acking waits for the flush
ACK_DELAY_S = 0.002  # acks no fetch has carried by then are flushed on their own
RELEASED_IDLE_MS = 10**10  # a released message looks abandoned for ages: claimed at once
TIDY_EVERY_S = 60.0  # how often a consumer looks for dead consumers to forget
CLOSE_SCAN = 10_000  # pending entries a closing consumer looks through


class RedisSubscription(Subscription):
    """One consumer in the queue's consumer group.

    ``visibility_s``: how long this consumer's messages stay hidden once it stops renewing
    its hold on them (it renews every third of that while alive).
    """

    reads_ahead = True

    def __init__(self, broker: 'RedisBroker', queue: str, visibility_s: float,
                 member: str | None = None) -> None:
        self._broker = broker
        self._queue = queue
        self._stream = broker.stream_key(queue)
        self._packed_stream = bulk(self._stream.encode())
        self._name = member or broker.uid  # the consumer's name in the group
        self._packed_name = bulk(self._name.encode())
        self._visibility_ms = int(visibility_s * 1000)
        self._claim_every = min(visibility_s / 4, 10.0)
        self._next_claim = 0.0  # claim first: messages released or abandoned earlier
        self._tidy_idle_ms = int(max(10 * visibility_s, 60.0) * 1000)
        self._next_tidy = 0.0
        self._acks: list[Any] = []  # handles: entry ids (a subclass may use others)
        self._ack_flush: asyncio.Task[None] | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self._held: set[Any] = set()  # fetched, not yet settled or released: renewed
        self._unsettled: set[Any] = set()  # a handler ran, settling failed: not released
        self._stopping = False
        # Idle, this consumer waits in the broker's shared read (redis_reader) instead of
        # blocking a connection of its own; a pull session's own member reads on its own.
        self._shares = member is None
        self._inbox: Inbox | None = None
        self._more = True  # the last read came back full: read again before waiting
        self._heartbeat = Heartbeat(self, visibility_s / 3, broker.log, queue)

    @property
    def _scripts(self) -> 'Scripts':
        return self._broker._lua

    async def create_group(self) -> None:
        """Create the group at the stream's start: nothing sent before it is missed."""
        try:
            await self._broker.client.xgroup_create(self._stream, GROUP, id='0', mkstream=True)
        except ResponseError as exc:
            if 'BUSYGROUP' not in str(exc):
                raise

    async def fetch(self, max_count: int, wait_s: float | None = None) -> Sequence[Delivery]:
        if self._stopping:
            return []
        self._heartbeat.start()
        if self._inbox is not None:  # idle: waiting in the shared read
            waited = await self._wait_shared(wait_s)
            if waited is not None:
                return waited
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self._claim_every
            if claimed := await self._claim(max_count):
                return claimed
        acks, self._acks = self._acks, []
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        # With a shared reader, read without blocking: an empty queue waits there instead.
        # The last read came back short: the queue was empty then, so wait there at once
        # (the acks ride with the shared read: one round trip, as a blocking read of our own).
        reader = self._broker._shared_reader() if self._shares and wait_s != 0 else None
        if reader is not None and not self._more and not self._stopping:
            return await self._join(reader, acks, max_count, wait_s)
        try:
            reply = await self._read(acks, max_count, None if reader else _block_ms(wait_s))
        except BaseException as exc:
            # Acking twice is harmless; not acking would redeliver. A read whose reply is
            # lost leaves entries pending here: close() releases them.
            self._acks[:0] = acks
            await self._group_gone(exc)
            return []
        if reader is None:  # reads on its own: a level queue, a pull session's member, a cluster
            return await self._replied(reply, max_count)
        if reply:
            entries = reply[0][1]
            self._more = len(entries) >= max_count
            return await self._deliveries(entries)
        if self._stopping:
            return []
        return await self._join(reader, [], max_count, wait_s)

    async def _join(self, reader: 'SharedReader', acks: list[bytes], max_count: int,
                    wait_s: float | None) -> list[Delivery]:
        """Wait in the shared read, which carries ``acks`` along."""
        self._more = True  # whatever it brings, the next fetch reads on its own first
        self._inbox = await reader.register(self, [self._stream], max_count, self._visibility_ms,
                                            (self._stream, acks))
        return await self._wait_shared(wait_s) or []

    async def _wait_shared(self, wait_s: float | None) -> list[Delivery] | None:
        """Wait in the shared read: its entries; [] if none came in time (still waiting);
        None if the sweep found messages to claim (claim them now)."""
        inbox = self._inbox
        assert inbox is not None
        if not inbox.ready.is_set():
            try:
                async with asyncio.timeout(IDLE_WAKE_S if wait_s is None else wait_s):
                    await inbox.ready.wait()
            except TimeoutError:
                return []
        if self._stopping and not inbox.entries:
            return []  # woken by stop_fetching: close() leaves the reader
        self._inbox = None  # the reader let it go: it read for it, or found claims, or failed
        if inbox.error is not None:
            self._acks[:0] = inbox.unsent_acks()  # again with the next read: harmless twice
            await self._group_gone(inbox.error)
            return []
        if inbox.claim:
            self._next_claim = 0.0
            return None
        entries = [e for _, stream_entries in inbox.entries for e in stream_entries]
        self._more = len(entries) >= inbox.count
        return await self._deliveries(entries)

    async def _group_gone(self, exc: BaseException) -> None:
        """Create the group again if a read failed because it is gone; raise anything else."""
        if not isinstance(exc, ResponseError) or 'NOGROUP' not in str(exc):
            raise exc
        self._acks.clear()  # the group and its pending entries are gone
        self._held.clear()
        self._broker.log.warning('Consumer group of %s is gone (Redis restarted?); '
                                 'creating it again', self._queue)
        await self.create_group()

    async def _replied(self, reply: Any, max_count: int) -> list[Delivery]:
        """The deliveries of a read's reply (here one stream: the queue's)."""
        return await self._deliveries(reply[0][1]) if reply else []

    async def _read(self, acks: list[Any], max_count: int, block: int | None = BLOCK_MS) -> Any:
        client = self._broker.client
        if not acks:
            return await client.xreadgroup(GROUP, self._name, {self._stream: '>'},
                                           count=max_count, block=block)
        # The acks of the last batch ride along with the next read: one round trip for both,
        # packed here (redis-py would encode every id again: most of a drain's client CPU).
        if self._broker.cluster:  # a cluster client has a pool per node: redis-py's pipeline
            async with client.pipeline(transaction=False) as pipe:
                pipe.xack(self._stream, GROUP, *acks)
                pipe.xdel(self._stream, *acks)
                pipe.xreadgroup(GROUP, self._name, {self._stream: '>'}, count=max_count,
                                block=block)
                return (await pipe.execute())[-1]
        stream, pool = self._packed_stream, client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(
                ack_commands(stream, acks, GROUP_BULK)
                + read_command(GROUP_BULK, self._packed_name, max_count, block, [stream]),
                check_health=False)
            return parse_read(await read_replies(conn, 1))
        except ResponseError:
            raise  # every reply was read: the connection is in step
        except BaseException:
            await asyncio.shield(conn.disconnect())  # a reply may be under way: not reused
            raise
        finally:
            await pool.release(conn)

    async def _deliveries(self, entries: Iterable[tuple[bytes, Any]],
                          priors: dict[bytes, int] | None = None) -> list[Delivery]:
        """Deliveries of entries now pending here; one bad entry never fails the others.

        ``priors``: per entry, deliveries before this one that may have run a handler.
        """
        out = []
        held = self._held
        self._heartbeat.holding()
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream meanwhile
                continue
            held.add(entry_id)
            try:
                out.append(to_delivery(entry_id, fields, priors[entry_id] if priors else 0))
            except MalformedEntry as exc:
                await self._drop_malformed(entry_id, fields, str(exc))
        return out

    async def _drop_malformed(self, entry_id: bytes, fields: dict[bytes, bytes],
                              reason: str) -> None:
        self._broker.log.error('Entry %s of %s dead-lettered: %s', entry_id.decode(),
                               self._queue, reason)
        delivery = Delivery(fields.get(b'body', b''), entry_id.decode(), 1, entry_id)
        try:
            await self.dead_letter(delivery, f'malformed entry: {reason}')
        except Exception as exc:  # left pending: another try after the visibility timeout
            self._broker.log.error('Dead-lettering entry %s of %s failed: %r',
                                   entry_id.decode(), self._queue, exc)

    async def _claim(self, max_count: int) -> list[Delivery]:
        """Take over messages released by other consumers, or idle past the visibility
        timeout (their consumer died, or a read of ours lost its reply)."""
        if time.monotonic() >= self._next_tidy:
            self._next_tidy = time.monotonic() + TIDY_EVERY_S
            await self._scripts.tidy(keys=[self._stream], args=[GROUP, self._tidy_idle_ms])
        reply: Any = await self._scripts.claim(
            keys=[self._stream],
            args=[GROUP, self._name, self._visibility_ms, max_count, RELEASED_IDLE_MS // 2])
        entries, priors, abandoned = [], {}, 0
        for entry_id, flat, count, state in reply:
            if state == 1:  # ours: a read that lost its reply, or a hold that lapsed
                if entry_id in self._held:
                    continue  # still ours to handle: the claim only renewed it
                count = count if entry_id in self._unsettled else count - 1
            elif state == 0:
                abandoned += 1
            entries.append((entry_id, dict(zip(flat[::2], flat[1::2], strict=True))))
            priors[entry_id] = max(count, 0)
        if abandoned:
            self._broker.log.warning('Took over %d message(s) of %s abandoned by other '
                                     'consumers', abandoned, self._queue)
        return await self._deliveries(entries, priors)

    async def ack(self, delivery: Delivery) -> None:
        # Acks are coalesced: the next fetch carries them (see _read); those it has not
        # carried within ACK_DELAY_S go in a flush of their own. A timer, not a task per
        # ack: the common case (a fetch comes first) only arms and disarms it.
        self._held.discard(delivery.handle)
        self._acks.append(delivery.handle)
        if self._ack_timer is None and not self._flushing():
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY_S, self._start_flush)
        elif len(self._acks) > ACK_BACKLOG and self._ack_flush is not None:
            await asyncio.shield(self._ack_flush)

    def _flushing(self) -> bool:
        return self._ack_flush is not None and not self._ack_flush.done()

    def _start_flush(self) -> None:
        self._ack_timer = None
        if self._acks and not self._flushing():
            self._ack_flush = asyncio.create_task(self._flush_acks())

    async def _flush_acks(self) -> None:
        while self._acks:
            ids, self._acks = self._acks, []
            client = self._broker._connected  # never connect again after a close
            try:
                if client is None:
                    raise ConnectionError('the broker is closed')
                async with client.pipeline(transaction=False) as pipe:
                    pipe.xack(self._stream, GROUP, *ids)
                    pipe.xdel(self._stream, *ids)
                    await pipe.execute()
            except Exception as exc:
                self._unsettled.update(ids)
                self._broker.log.error('Acking %d message(s) of %s failed (%r); they will be '
                                       'delivered again', len(ids), self._queue, exc)

    async def _settle(self, delivery: Delivery, target: str, due: int, fields: list[Any]) -> None:
        """Store the message's next form in ``target`` and ack it, in one idempotent step."""
        handle = delivery.handle
        self._held.discard(handle)
        try:
            done = await self._scripts.settle(keys=[self._stream, target],
                                              args=[GROUP, self._name, handle, due, *fields])
        except BaseException:
            self._unsettled.add(handle)  # left pending: delivered again after the timeout
            raise
        if not done:
            self._broker.log.warning('Message %s of %s was no longer held by this consumer '
                                     '(settled already or taken over); left as it is',
                                     delivery.message_id, self._queue)

    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        fields = entry_fields(delivery.body, delivery.message_id, delivery.attempt + 1,
                              delivery.sent_at, delivery.headers)
        await self._settle(delivery, self._broker.delayed_key(self._queue),
                           due_ms(max(delay, 0.001)), fields)
        self._broker._delayed.poke(self._queue)  # polled by the mover from now on

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        fields = entry_fields(delivery.body, delivery.message_id, 1, delivery.sent_at,
                              delivery.headers)
        fields += ('error', error, 'attempt', delivery.attempt, 'failed_at', now_s())
        await self._settle(delivery, self._broker.dead_key(self._queue), 0, fields)

    async def extend(self, delivery: Delivery) -> bool:
        # One script: renewed only if still ours, so a takeover is never undone.
        gone = await self._scripts.renew(keys=[self._stream],
                                         args=[GROUP, self._name, delivery.handle])
        if gone:
            self._held.discard(delivery.handle)
            return False
        delivery.received_at = time.monotonic()
        return True

    async def renew(self, handles: Sequence[Any]) -> list[Any]:
        """Renew the hold on ``handles``; returns those another consumer took over."""
        if self._broker._connected is None:  # the broker closed: never connect again for this
            return []
        gone: list[bytes] = await self._scripts.renew(keys=[self._stream],
                                                      args=[GROUP, self._name, *handles])
        # Settled meanwhile is not lost: only those still held here were taken over.
        lost = [handle for handle in gone if handle in self._held]
        self._held.difference_update(lost)
        return lost

    def held(self) -> list[Any]:
        """The entries this consumer holds now (fetched, neither settled nor released)."""
        return list(self._held)

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        handles = [d.handle for d in deliveries]
        self._held.difference_update(handles)
        await self._release(handles)

    async def _release(self, handles: Sequence[Any]) -> None:
        await self._scripts.release(keys=[self._stream],
                                    args=[GROUP, self._name, RELEASED_IDLE_MS, *handles])

    async def stop_fetching(self) -> None:
        # A read under way returns within BLOCK_MS with what it read; no new read starts;
        # a wait in the shared read returns now.
        self._stopping = True
        if self._inbox is not None:
            self._inbox.wake()

    async def close(self) -> None:
        self._stopping = True
        await self._heartbeat.stop()
        reader = self._broker._reader
        if reader is not None:
            # Once out of the shared read, what it read for us is pending here and never
            # handed out: _release_orphans below gives it back. Acks it did not carry yet
            # are flushed below.
            self._inbox = None
            left = await reader.unregister(self)
            if left is not None:
                self._acks[:0] = left.unsent_acks()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._ack_flush is not None:
            await asyncio.gather(self._ack_flush, return_exceptions=True)
        if self._acks:
            await self._flush_acks()
        client = self._broker._connected
        if client is None:
            return
        try:
            await self._release_orphans(client)
        except Exception as exc:
            self._broker.log.warning('Could not tidy consumer %s of %s: %r',
                                     self._name, self._queue, exc)

    async def _release_orphans(self, client: Any) -> None:
        """Release what is pending here but was never handed out (e.g. a cancelled read's),
        then leave the group if nothing is pending here any more."""
        mine: Any = await client.xpending_range(self._stream, GROUP, '-', '+', CLOSE_SCAN,
                                                consumername=self._name)
        orphans = [p['message_id'] for p in mine
                   if p['time_since_delivered'] < RELEASED_IDLE_MS // 2
                   and p['message_id'] not in self._unsettled]
        if orphans:
            await self._release(orphans)
            self._broker.log.info('Released %d message(s) of %s read but never handled',
                                  len(orphans), self._queue)
        if not mine:  # forget this consumer; one with pending messages must stay
            await client.xgroup_delconsumer(self._stream, GROUP, self._name)


def _block_ms(wait_s: float | None) -> int | None:
    """XREADGROUP's BLOCK for a fetch waiting ``wait_s``: None sends no BLOCK (0 = forever)."""
    if wait_s is None:
        return BLOCK_MS
    block = min(int(wait_s * 1000), BLOCK_MS)
    return block if block > 0 else None
