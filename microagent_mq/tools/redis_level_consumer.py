"""A consumer of a queue with priorities, retention or a bound: its level streams as one queue.

One ``XREADGROUP`` reads every level stream, highest first; Redis answers with up to COUNT
entries per stream, so what does not fit in the batch asked for waits here (held: renewed by
the heartbeat, released on close) and is merged, by level then id, with the next read. A
handle is ``(level, entry id)``: ids repeat across streams. Takeover, renewal, release and
settling act on each level stream as the plain consumer does on its one stream. On a
retaining queue an ack is ``XACK`` alone: the entry stays for history until trimmed.
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

Handle = tuple[int, bytes]  # (priority level, entry id in that level's stream)
SPILL_BATCHES = 4  # read beyond a batch and kept here: at most this many batches, then released


class LevelSubscription(RedisSubscription):
    """One consumer in the group of every level stream of a queue."""

    def __init__(self, broker: 'RedisBroker', layout: Layout, visibility_s: float,
                 member: str | None = None) -> None:
        super().__init__(broker, layout.name, visibility_s, member)
        self._layout = layout
        self._streams = layout.streams
        self._read_keys: dict[Any, Any] = dict.fromkeys(layout.highest_first, '>')
        self._levels = {key.encode(): level for level, key in enumerate(layout.streams)}
        self._spill: list[Delivery] = []  # read, not yet handed out: by level desc, then id

    async def create_group(self) -> None:
        self._spill.clear()  # a group made again (Redis lost it) holds none of these
        async with self._broker.client.pipeline(transaction=False) as pipe:
            for stream in self._streams:
                pipe.xgroup_create(stream, GROUP, id='0', mkstream=True)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception) and 'BUSYGROUP' not in str(reply):
                raise reply

    # reading ----------------------------------------------------------------------------

    async def _read(self, acks: list[Any], max_count: int, block: int | None = BLOCK_MS) -> Any:
        async with self._broker.client.pipeline(transaction=False) as pipe:
            self._queue_acks(pipe, acks)
            # Entries waiting here already: hand them out now, with whatever else is ready.
            pipe.xreadgroup(GROUP, self._name, self._read_keys, count=max_count,
                            block=None if self._spill else block)
            return (await pipe.execute())[-1]

    async def _replied(self, reply: Any, max_count: int) -> list[Delivery]:
        fresh: list[Delivery] = []
        for key, entries in reply or ():
            fresh += await self._level_deliveries(self._levels[key], entries)
        return await self._take(fresh, max_count)

    async def _take(self, fresh: list[Delivery], max_count: int) -> list[Delivery]:
        """The first ``max_count`` of what waits here and ``fresh``, highest level first."""
        merged = self._spill + fresh
        merged.sort(key=_order)
        out, rest = merged[:max_count], merged[max_count:]
        most = SPILL_BATCHES * max_count
        if len(rest) > most:  # a flood of higher levels: give the lowest back to the queue
            rest, extra = rest[:most], rest[most:]
            handles = [d.handle for d in extra]
            self._held.difference_update(handles)
            await self._release(handles)
        self._spill = rest
        return out

    async def _level_deliveries(self, level: int, entries: Iterable[tuple[bytes, Any]],
                                priors: dict[bytes, int] | None = None) -> list[Delivery]:
        out = []
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
        scripts = self._scripts
        async with self._broker.client.pipeline(transaction=False) as pipe:
            for stream in self._streams:
                if tidy:
                    await scripts.tidy(keys=[stream], args=[GROUP, self._tidy_idle_ms], client=pipe)
                await scripts.claim(keys=[stream], args=[GROUP, self._name, self._visibility_ms,
                                                         max_count, RELEASED_IDLE_MS // 2],
                                    client=pipe)
            replies = await pipe.execute()
        claims = replies[1::2] if tidy else replies
        fresh: list[Delivery] = []
        abandoned = 0
        for level, reply in enumerate(claims):
            entries, priors = [], {}
            for entry_id, flat, count, state in reply:
                handle = (level, entry_id)
                if state == 1:  # ours: see RedisSubscription._claim
                    if handle in self._held:
                        continue
                    count = count if handle in self._unsettled else count - 1
                elif state == 0:
                    abandoned += 1
                entries.append((entry_id, dict(zip(flat[::2], flat[1::2], strict=True))))
                priors[entry_id] = max(count, 0)
            fresh += await self._level_deliveries(level, entries, priors)
        if abandoned:
            self._broker.log.warning('Took over %d message(s) of %s abandoned by other '
                                     'consumers', abandoned, self._queue)
        return await self._take(fresh, max_count) if fresh else []

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

    async def close(self) -> None:
        if self._spill and self._broker._connected is not None:
            spill, self._spill = self._spill, []
            handles = [d.handle for d in spill]
            self._held.difference_update(handles)
            try:
                await self._release(handles)
            except Exception as exc:  # pending here: released by the orphan scan, or taken over
                self._broker.log.warning('Could not release %d read message(s) of %s: %r',
                                         len(handles), self._queue, exc)
        await super().close()

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


def _order(delivery: Delivery) -> tuple[int, int, int]:
    """Highest level first, then the stream's order (its ids)."""
    level, entry_id = delivery.handle
    ms, _, seq = entry_id.partition(b'-')
    return -level, int(ms), int(seq or 0)


def _priority(delivery: Delivery) -> list[Any]:
    return ['priority', delivery.priority] if delivery.priority else []
