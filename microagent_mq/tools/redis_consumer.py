"""One consumer in a queue's Redis consumer group: fetch, claim, ack, retry, dead-letter."""

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from ..transport import Delivery, Subscription, now_s

if TYPE_CHECKING:
    from .redis import RedisBroker

GROUP = 'microagent_mq'
BLOCK_MS = 250  # an idle XREADGROUP returns this often, so a stop never waits long for it
ACK_BACKLOG = 1000  # past this many unflushed acks, acking waits for the flush
ACK_DELAY_S = 0.002  # acks no fetch has carried by then are flushed on their own
RELEASED_IDLE_MS = 10**10  # a released message looks abandoned for ages: claimed at once


class RedisSubscription(Subscription):
    """One consumer in the queue's consumer group."""

    def __init__(self, broker: 'RedisBroker', queue: str, visibility_s: float,
                 member: str | None = None) -> None:
        self._broker = broker
        self._queue = queue
        self._stream = broker.stream_key(queue)
        self._name = member or broker.uid  # the consumer's name in the group
        self._visibility_ms = int(visibility_s * 1000)
        self._claim_every = min(visibility_s / 4, 10.0)
        self._next_claim = 0.0  # claim first: messages released or abandoned earlier
        self._acks: list[bytes] = []
        self._ack_flush: asyncio.Task[None] | None = None
        self._ack_timer: asyncio.TimerHandle | None = None

    async def create_group(self) -> None:
        """Create the group at the stream's start: nothing sent before it is missed."""
        try:
            await self._broker.client.xgroup_create(self._stream, GROUP, id='0', mkstream=True)
        except ResponseError as exc:
            if 'BUSYGROUP' not in str(exc):
                raise

    async def fetch(self, max_count: int, wait_s: float | None = None) -> Sequence[Delivery]:
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + self._claim_every
            if claimed := await self._claim(max_count):
                return claimed
        acks, self._acks = self._acks, []
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        try:
            reply = await self._read(acks, max_count, _block_ms(wait_s))
        except BaseException as exc:
            self._acks[:0] = acks  # acking twice is harmless; not acking would redeliver
            if not isinstance(exc, ResponseError):
                raise
            if 'NOGROUP' not in str(exc):
                raise
            self._acks.clear()  # the group and its pending entries are gone
            self._broker.log.warning('Consumer group of %s is gone (Redis restarted?); '
                                     'creating it again', self._queue)
            await self.create_group()
            return []
        if not reply:
            return []
        return [_delivery(entry_id, fields) for entry_id, fields in reply[0][1] if fields]

    async def _read(self, acks: list[bytes], max_count: int, block: int | None = BLOCK_MS) -> Any:
        client = self._broker.client
        if not acks:
            return await client.xreadgroup(GROUP, self._name, {self._stream: '>'},
                                           count=max_count, block=block)
        # The acks of the last batch ride along with the next read: one round trip for both.
        async with client.pipeline(transaction=False) as pipe:
            pipe.xack(self._stream, GROUP, *acks)
            pipe.xdel(self._stream, *acks)
            pipe.xreadgroup(GROUP, self._name, {self._stream: '>'}, count=max_count,
                            block=block)
            return (await pipe.execute())[-1]

    async def _claim(self, max_count: int) -> list[Delivery]:
        """Take over messages idle past the visibility timeout (their consumer died)."""
        client = self._broker.client
        pending: Any = await client.xpending_range(self._stream, GROUP, '-', '+', max_count,
                                                   idle=self._visibility_ms)
        if not pending:
            return []
        delivered = {p['message_id']: int(p['times_delivered']) for p in pending}
        entries: Any = await client.xclaim(self._stream, GROUP, self._name, self._visibility_ms,
                                           list(delivered))
        claimed = []
        for entry_id, fields in entries:
            if not fields:
                continue
            delivery = _delivery(entry_id, fields)
            delivery.attempt += delivered.get(entry_id, 0)
            claimed.append(delivery)
        if claimed:
            self._broker.log.warning('Took over %d message(s) of %s abandoned by other consumers',
                                     len(claimed), self._queue)
        return claimed

    async def ack(self, delivery: Delivery) -> None:
        # Acks are coalesced: the next fetch carries them (see _read); those it has not
        # carried within ACK_DELAY_S go in a flush of their own. A timer, not a task per
        # ack: the common case (a fetch comes first) only arms and disarms it.
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
        client = self._broker.client
        while self._acks:
            ids, self._acks = self._acks, []
            try:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.xack(self._stream, GROUP, *ids)
                    pipe.xdel(self._stream, *ids)
                    await pipe.execute()
            except Exception as exc:
                self._broker.log.error('Acking %d message(s) of %s failed (%r); they will be '
                                       'delivered again', len(ids), self._queue, exc)

    async def _settle(self, delivery: Delivery, store: Any) -> None:
        async with self._broker.client.pipeline(transaction=True) as pipe:
            store(pipe)
            pipe.xack(self._stream, GROUP, delivery.handle)
            pipe.xdel(self._stream, delivery.handle)
            await pipe.execute()

    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        await self._settle(delivery, lambda pipe: self._broker._stage(
            pipe, self._queue, delivery.body, delivery.message_id, delivery.attempt + 1,
            max(delay, 0.001), error))

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        fields = {'body': delivery.body, 'id': delivery.message_id, 'error': error,
                  'attempt': delivery.attempt, 'failed_at': now_s()}
        await self._settle(delivery, lambda pipe: pipe.xadd(
            self._broker.dead_key(self._queue), fields))

    async def extend(self, delivery: Delivery) -> bool:
        client = self._broker.client
        owner: Any = await client.xpending_range(self._stream, GROUP, delivery.handle,
                                            delivery.handle, 1)
        if not owner or owner[0]['consumer'].decode() != self._name:
            return False
        await client.xclaim(self._stream, GROUP, self._name, 0, [delivery.handle], justid=True)
        delivery.received_at = time.monotonic()
        return True

    async def release(self, deliveries: Sequence[Delivery]) -> None:
        await self._broker.client.xclaim(
            self._stream, GROUP, self._name, 0, [d.handle for d in deliveries],
            idle=RELEASED_IDLE_MS, retrycount=0, justid=True)
        self._next_claim = 0.0

    async def close(self) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        if self._ack_flush is not None:
            await asyncio.gather(self._ack_flush, return_exceptions=True)
        if self._acks:
            await self._flush_acks()
        client = self._broker.client
        try:
            mine = await client.xpending_range(self._stream, GROUP, '-', '+', 1,
                                               consumername=self._name)
            if not mine:  # forget this consumer; one with pending messages must stay
                await client.xgroup_delconsumer(self._stream, GROUP, self._name)
        except Exception as exc:
            self._broker.log.warning('Could not tidy consumer %s of %s: %r',
                                     self._name, self._queue, exc)


def _block_ms(wait_s: float | None) -> int | None:
    """XREADGROUP's BLOCK for a fetch waiting ``wait_s``: None sends no BLOCK (0 = forever)."""
    if wait_s is None:
        return BLOCK_MS
    block = min(int(wait_s * 1000), BLOCK_MS)
    return block if block > 0 else None


def _delivery(entry_id: bytes, fields: dict[bytes, bytes]) -> Delivery:
    return Delivery(fields[b'body'], fields[b'id'].decode(), int(fields.get(b'attempt', 1)),
                    entry_id)
