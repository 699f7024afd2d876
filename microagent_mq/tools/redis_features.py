"""Sending to, measuring and purging queues with priorities, retention or a bound on Redis.

Plain queues never come here (see ``redis_layout``). A batch that reaches one of these
queues goes in one ``PUBLISH_CHECKED`` script: every bound is checked before anything is
written (all or nothing, across every queue of the batch), then the batch is written as the
plain ``PUBLISH`` writes it, each message into the stream of its priority level.
"""

import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from ..exceptions import QueueFull
from ..queue import Queue
from ..transport import Outgoing, QueueStats
from .redis_codec import due_ms, entry_fields, ts_ms
from .redis_consumer import GROUP, RELEASED_IDLE_MS
from .redis_layout import Layout, layout_of

if TYPE_CHECKING:
    from .redis import RedisBroker

FULL = 'QUEUEFULL '  # the error reply of PUBLISH_CHECKED for a queue a send does not fit


def layouts(broker: 'RedisBroker', batch: Sequence[Outgoing]) -> dict[str, Layout | None]:
    """The layout of every queue ``batch`` reaches (None for a plain one)."""
    found: dict[str, Layout | None] = {}
    for message in batch:
        for queue in message.queues:
            if queue not in found:
                found[queue] = layout_of(broker, Queue.get(queue))
    return found


def checked_args(broker: 'RedisBroker', batch: Sequence[Outgoing],
                 found: dict[str, Layout | None]) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of ``PUBLISH_CHECKED`` for ``batch``; each queue's messages keep their order."""
    first = batch[0]
    # on a cluster the batch has one queue (RedisBroker._publish splits it): the mark is in its slot
    mark, offset = broker._sent_mark(first.queues[0] if first.queues else '')
    keys = [mark]
    index: dict[str, int] = {}

    def key_index(key: str) -> int:
        if key not in index:
            keys.append(key)
            index[key] = len(keys)
        return index[key]

    records: dict[str, list[list[Any]]] = {}
    incoming: Counter[str] = Counter()
    for message in batch:
        level = message.priority
        for queue in message.queues:
            layout = found[queue]
            stream = (layout.streams[min(level, len(layout.streams) - 1)] if layout
                      else broker.stream_key(queue))
            own = records.setdefault(queue, [])
            if not message.delay:
                incoming[queue] += 1
            if message.delay or message.headers is not None:
                fields = entry_fields(message.body, message.message_id, 1, message.sent_at,
                                      message.headers)
                if level:  # the mover reads it to put a delayed message in its level
                    fields += ('priority', level)
                due = due_ms(message.delay) if message.delay else 0
                key = (layout.delayed if layout else broker.delayed_key(queue)) if due else stream
                own.append(['F', key_index(key), due, len(fields), *fields])
                continue
            at = key_index(stream)
            if not own or own[-1][0] != 'P' or own[-1][1] != at:
                own.append(['P', at, 0, ts_ms(message.sent_at)])
            own[-1][2] += 1
            own[-1] += (message.body, message.message_id)
    bounds: list[Any] = []
    count = 0
    for queue, layout in found.items():
        if layout is not None and layout.max_length:
            count += 1
            bounds += (queue, layout.max_length, layout.overflow, incoming[queue],
                       int(layout.retaining), key_index(layout.delayed), len(layout.streams),
                       *map(key_index, layout.streams))
    clocks = [layout for layout in found.values() if layout is not None and layout.clock]
    bounds.append(len(clocks))
    for layout in clocks:
        bounds += (key_index(layout.clock), len(layout.streams), *map(key_index, layout.streams))
    args: list[Any] = [offset, int(time.time() * 1000), RELEASED_IDLE_MS, GROUP, count, *bounds]
    for own in records.values():
        for record in own:
            args += record
    return keys, args


def queue_full(exc: ResponseError) -> QueueFull | None:
    """The ``QueueFull`` a script's error reply stands for; None for any other error."""
    text = str(exc)
    if not text.startswith(FULL):
        return None
    name = text[len(FULL):].strip()
    try:
        bound = Queue.get(name).max_length
    except Exception:
        bound = 0
    return QueueFull(f'queue {name!r} is full ({bound} messages waiting, its max_length): '
                     f'nothing of this send was stored')


async def length(broker: 'RedisBroker', layout: Layout) -> int:
    """Messages waiting: never delivered, released, or delayed and due, over every level."""
    count: Any = await broker._levels.length_levels(
        keys=[layout.delayed, *layout.streams],
        args=[GROUP, int(time.time() * 1000), RELEASED_IDLE_MS, int(layout.retaining)],
        client=broker.client)
    return int(count)


async def stats(broker: 'RedisBroker', layout: Layout) -> QueueStats:
    """``QueueStats`` over every level stream."""
    client = broker.client
    async with client.pipeline(transaction=False) as pipe:
        pipe.zcard(layout.delayed)
        pipe.xlen(layout.dead)
        delayed, dead = await pipe.execute()
    ready = await length(broker, layout)
    in_flight = 0
    for stream in layout.streams:
        try:
            pending = int((await client.xpending(stream, GROUP))['pending'])
            released: Any = await client.xpending_range(stream, GROUP, '-', '+', 1 << 31,
                                                        idle=RELEASED_IDLE_MS // 2)
            in_flight += max(pending - len(released), 0)
        except ResponseError:  # no group yet on that level
            pass
    return QueueStats(layout.name, ready, int(delayed), in_flight, int(dead))


async def purge(broker: 'RedisBroker', layout: Layout) -> int:
    """Delete what waits (delayed, and entries nobody holds); how many.

    On a retaining queue only entries never delivered: the handled ones are its history.
    """
    client = broker.client
    async with client.pipeline(transaction=True) as pipe:
        pipe.zcard(layout.delayed)
        pipe.delete(layout.delayed)
        delayed, _ = await pipe.execute()
    deleted = int(delayed)
    for stream in layout.streams:
        held: set[bytes] = set()
        start = '-'
        try:
            pending: Any = await client.xpending_range(stream, GROUP, '-', '+', 1 << 31)
            held = {entry['message_id'] for entry in pending}
            if layout.retaining:
                groups: Any = await client.xinfo_groups(stream)
                last = next(g['last-delivered-id'] for g in groups if g['name'] == GROUP.encode())
                start = '(' + (last.decode() if isinstance(last, bytes) else str(last))
        except (ResponseError, StopIteration):
            pass  # no group yet: nobody holds anything, nothing was handled
        entries = await broker._page(stream, start)
        while entries:
            waiting = [entry_id for entry_id, _ in entries if entry_id not in held]
            if waiting:
                deleted += int(await client.xdel(stream, *waiting))
            entries = await broker._page(stream, '(' + entries[-1][0].decode())
    return deleted
