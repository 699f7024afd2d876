"""A consumer of a queue with priorities, retention or a bound: its level streams as one queue.

A fetch is one script (``FETCH_LEVELS``): ``XREADGROUP`` on each level, highest first, until
the batch asked for is full, so a consumer never holds more than it asked for. When nothing
waits, an ``XREAD`` blocks on every level from where the group stands, then the script reads
again. A handle is ``(level, entry id)``: ids repeat across streams. Takeover, renewal,
release and settling act on each level stream as the plain consumer does on its one stream.
On a retaining queue an ack is ``XACK`` alone: the entry stays for history until trimmed.
"""

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from ..transport import Delivery, now_s
from .redis_codec import MalformedEntry, due_ms, entry_fields, to_delivery
from .redis_consumer import BLOCK_MS, CLOSE_SCAN, GROUP, RELEASED_IDLE_MS, TIDY_EVERY_S, RedisSubscription
from .redis_layout import Layout

if TYPE_CHECKING:
    from .redis import RedisBroker
    from .redis_level_scripts import LevelScripts

Handle = tuple[int, bytes]  # (priority level, entry id in that level's stream)
MOVE_BATCH = 100  # due delayed messages a fetch moves into their streams (the mover does more)


class LevelSubscription(RedisSubscription):
    """One consumer in the group of every level stream of a queue."""

    def __init__(self, broker: 'RedisBroker', layout: Layout, visibility_s: float,
                 member: str | None = None) -> None:
        super().__init__(broker, layout.name, visibility_s, member)
        # Reads through its own script (FETCH_LEVELS), blocking on its levels when idle: not in
        # the broker's shared read (a multi-stream read counts per stream, not per queue).
        self._shares = False
        self._layout = layout
        self._streams = layout.streams
        self._highest = list(layout.highest_first)
        self._level_at = list(range(len(layout.streams)))[::-1]  # by index in _highest

    @property
    def _level_scripts(self) -> 'LevelScripts':
        return self._broker._levels

    async def create_group(self) -> None:
        async with self._broker.client.pipeline(transaction=False) as pipe:
            for stream in self._streams:
                pipe.xgroup_create(stream, GROUP, id='0', mkstream=True)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception) and 'BUSYGROUP' not in str(reply):
                raise reply

    # reading ----------------------------------------------------------------------------

    async def _read(self, acks: list[Any], max_count: int, block: int | None = BLOCK_MS) -> Any:
        client = self._broker.client
        fetch = self._level_scripts.fetch_levels
        layout = self._layout
        keys = [layout.delayed, *([layout.clock] if layout.clock else []), *self._highest]
        args = [GROUP, self._name, max_count, int(time.time() * 1000), int(bool(layout.clock)),
                MOVE_BATCH]
        if self._broker.cluster:  # a cluster pipeline runs no scripts: the acks, then the read
            if acks:
                async with client.pipeline(transaction=False) as pipe:
                    self._queue_acks(pipe, acks)
                    await pipe.execute()
            reply = await fetch(keys=keys, args=args, client=client)
        else:
            async with client.pipeline(transaction=False) as pipe:
                self._queue_acks(pipe, acks)
                await fetch(keys=keys, args=args, client=pipe)
                reply = (await pipe.execute())[-1]
        if reply[0] == 1 or block is None:
            return reply
        # Nothing waits: block until an entry comes to any level (XREAD from where the group
        # stands reads nothing for the group), then read for the group again.
        if await client.xread(dict(zip(self._highest, reply[1], strict=True)), count=1,
                              block=block):
            args[3] = int(time.time() * 1000)
            return await fetch(keys=keys, args=args, client=client)
        return reply

    async def _replied(self, reply: Any, max_count: int) -> list[Delivery]:
        if not reply or reply[0] != 1:
            return []
        out: list[Delivery] = []
        for index, entries in reply[1]:
            out += await self._level_deliveries(
                self._level_at[index - 1], [(entry_id, _fields(flat)) for entry_id, flat in entries])
        return out

    async def _level_deliveries(self, level: int, entries: Iterable[tuple[bytes, Any]],
                                priors: dict[bytes, int] | None = None) -> list[Delivery]:
        out = []
        self._heartbeat.holding()  # renew what is held from now on (it sleeps while none is)
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream meanwhile
                continue
            handle = (level, entry_id)
            self._held.add(handle)
            try:
                delivery = to_delivery(entry_id, fields, priors[entry_id] if priors else 0)
            except MalformedEntry as exc:
                await self._dead_letter_malformed(handle, fields, str(exc))
                continue
            delivery.handle, delivery.priority = handle, level
            out.append(delivery)
        return out

    async def _dead_letter_malformed(self, handle: Handle, fields: dict[bytes, bytes],
                                     reason: str) -> None:
        self._broker.log.error('Entry %s of %s dead-lettered: %s', handle[1].decode(),
                               self._queue, reason)
        delivery = Delivery(fields.get(b'body', b''), handle[1].decode(), 1, handle,
                            priority=handle[0])
        try:
            await self.dead_letter(delivery, f'malformed entry: {reason}')
        except Exception as exc:  # left pending: another try after the visibility timeout
            self._broker.log.error('Dead-lettering entry %s of %s failed: %r',
                                   handle[1].decode(), self._queue, exc)

    async def _claim(self, max_count: int) -> list[Delivery]:
        tidy = time.monotonic() >= self._next_tidy
        if tidy:
            self._next_tidy = time.monotonic() + TIDY_EVERY_S
            for stream in self._streams:  # rare (a minute apart): no pipeline, also on a cluster
                await self._scripts.tidy(keys=[stream], args=[GROUP, self._tidy_idle_ms])
        reply: Any = await self._level_scripts.claim_levels(
            keys=self._highest,
            args=[GROUP, self._name, self._visibility_ms, max_count, RELEASED_IDLE_MS // 2])
        out: list[Delivery] = []
        abandoned = 0
        for index, entry_id, flat, count, state in reply:
            level = self._level_at[index - 1]
            handle = (level, entry_id)
            if state == 1:  # ours: see RedisSubscription._claim
                if handle in self._held:
                    continue
                count = count if handle in self._unsettled else count - 1
            elif state == 0:
                abandoned += 1
            out += await self._level_deliveries(level, [(entry_id, _fields(flat))],
                                                {entry_id: max(count, 0)})
        if abandoned:
            self._broker.log.warning('Took over %d message(s) of %s abandoned by other '
                                     'consumers', abandoned, self._queue)
        return out

    # settling ---------------------------------------------------------------------------

    def _queue_acks(self, pipe: Any, handles: Sequence[Handle]) -> None:
        for level, ids in _by_level(handles).items():
            pipe.xack(self._streams[level], GROUP, *ids)
            if not self._layout.retaining:
                pipe.xdel(self._streams[level], *ids)

    async def _flush_acks(self) -> None:
        while self._acks:
            handles, self._acks = self._acks, []
            client = self._broker._connected  # never connect again after a close
            try:
                if client is None:
                    raise ConnectionError('the broker is closed')
                async with client.pipeline(transaction=False) as pipe:
                    self._queue_acks(pipe, handles)
                    await pipe.execute()
            except Exception as exc:
                self._unsettled.update(handles)
                self._broker.log.error('Acking %d message(s) of %s failed (%r); they will be '
                                       'delivered again', len(handles), self._queue, exc)

    async def _settle(self, delivery: Delivery, target: str, due: int, fields: list[Any]) -> None:
        handle = delivery.handle
        self._held.discard(handle)
        level, entry_id = handle
        script = self._scripts.settle_keep if self._layout.retaining else self._scripts.settle
        try:
            done = await script(keys=[self._streams[level], target],
                                args=[GROUP, self._name, entry_id, due, *fields])
        except BaseException:
            self._unsettled.add(handle)  # left pending: delivered again after the timeout
            raise
        if not done:
            self._broker.log.warning('Message %s of %s was no longer held by this consumer '
                                     '(settled already or taken over); left as it is',
                                     delivery.message_id, self._queue)

    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        # The delayed member keeps the level: the mover puts it back in that level's stream.
        fields = entry_fields(delivery.body, delivery.message_id, delivery.attempt + 1,
                              delivery.sent_at, delivery.headers) + _priority(delivery)
        await self._settle(delivery, self._layout.delayed, due_ms(max(delay, 0.001)), fields)
        self._broker._delayed.poke(self._queue)  # polled from now on, not found by discovery

    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        fields = entry_fields(delivery.body, delivery.message_id, 1, delivery.sent_at,
                              delivery.headers) + _priority(delivery)
        fields += ('error', error, 'attempt', delivery.attempt, 'failed_at', now_s())
        await self._settle(delivery, self._layout.dead, 0, fields)

    # holding ----------------------------------------------------------------------------

    async def extend(self, delivery: Delivery) -> bool:
        lost = await self._renew_levels([delivery.handle])
        if lost:
            self._held.discard(delivery.handle)
            return False
        delivery.received_at = time.monotonic()
        return True

    async def renew(self, handles: Sequence[Any]) -> list[Any]:
        if self._broker._connected is None:  # the broker closed: never connect again for this
            return []
        lost = [handle for handle in await self._renew_levels(handles) if handle in self._held]
        self._held.difference_update(lost)
        return lost

    async def _renew_levels(self, handles: Sequence[Handle]) -> list[Handle]:
        """Renew the hold on ``handles``; those no longer this consumer's."""
        lost: list[Handle] = []
        for level, ids in _by_level(handles).items():
            gone = await self._scripts.renew(keys=[self._streams[level]],
                                             args=[GROUP, self._name, *ids])
            lost += [(level, entry_id) for entry_id in gone]
        return lost

    async def _release(self, handles: Sequence[Any]) -> None:
        for level, ids in _by_level(handles).items():
            await self._scripts.release(keys=[self._streams[level]],
                                        args=[GROUP, self._name, RELEASED_IDLE_MS, *ids])

    async def _release_orphans(self, client: Any) -> None:
        forget = True
        for level, stream in enumerate(self._streams):
            mine: Any = await client.xpending_range(stream, GROUP, '-', '+', CLOSE_SCAN,
                                                    consumername=self._name)
            orphans = [p['message_id'] for p in mine
                       if p['time_since_delivered'] < RELEASED_IDLE_MS // 2
                       and (level, p['message_id']) not in self._unsettled]
            if orphans:
                await self._release([(level, entry_id) for entry_id in orphans])
                self._broker.log.info('Released %d message(s) of %s read but never handled',
                                      len(orphans), self._queue)
            forget = forget and not mine
        if forget:  # forget this consumer; one with pending messages must stay
            for stream in self._streams:
                try:
                    await client.xgroup_delconsumer(stream, GROUP, self._name)
                except ResponseError:
                    pass  # no group on that level (deleted meanwhile): nothing to forget


def _by_level(handles: Iterable[Handle]) -> dict[int, list[bytes]]:
    grouped: dict[int, list[bytes]] = defaultdict(list)
    for level, entry_id in handles:
        grouped[level].append(entry_id)
    return grouped


def _fields(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _priority(delivery: Delivery) -> list[Any]:
    return ['priority', delivery.priority] if delivery.priority else []
