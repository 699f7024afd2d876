"""History of a retaining queue on Redis: its level streams read back in send order.

The streams keep handled entries (acked, not deleted) until the mover trims them past the
retention. An entry is listed once, as sent: the copies a queue makes of a message (a retry
moved back from the delayed set has ``attempt``; a requeued dead letter has ``again``) are
not. Stream ids are the server's clock and ``ts`` the sender's: a read starts a little before
``since`` in id terms and filters on ``ts``. With priorities the level streams are merged by
id: their entries take ids from the queue's clock, so ids give the order they were stored.
The position is a tuple of the last id read in each level stream.
"""

import time
from typing import TYPE_CHECKING, Any

import orjson

from ..transport import Retained
from .redis_layout import CLOCK_SKEW_MS, Layout

if TYPE_CHECKING:
    from .redis import RedisBroker

PAGE = 500  # entries read per level stream per round trip
COPY_FIELDS = (b'attempt', b'again')  # an entry with one of these is a copy, not a send


async def retained(broker: 'RedisBroker', layout: Layout, since: float | None,
                   until: float | None, after: Any, limit: int) -> tuple[list[Retained], Any]:
    """Up to ``limit`` retained messages in send order after ``after``; where to read on."""
    lower = max(since or 0.0, time.time() - layout.retention_ms / 1000)  # older: past retention
    upper = float('inf') if until is None else until
    first = f'{max(int(lower * 1000) - CLOCK_SKEW_MS, 0)}-0'
    cursors: list[str | None] = list(after) if after else [None] * len(layout.streams)
    buffers: list[list[tuple[bytes, dict[bytes, bytes]]]] = [[] for _ in layout.streams]
    done = [False] * len(layout.streams)
    out: list[Retained] = []
    while len(out) < limit:
        await _fill(broker, layout, buffers, cursors, done, first, upper)
        heads = [(_id_key(buffer[0][0]), level) for level, buffer in enumerate(buffers) if buffer]
        if not heads:
            return out, None  # every level read to its end (or past until)
        _, level = min(heads)
        entry_id, fields = buffers[level].pop(0)
        cursors[level] = entry_id.decode()
        found = _retained(layout.name, level, entry_id, fields)
        if found is not None and lower <= found.sent_at <= upper:
            out.append(found)
    return out, tuple(cursors)


async def _fill(broker: 'RedisBroker', layout: Layout, buffers: list[list[Any]],
                cursors: list[str | None], done: list[bool], first: str, upper: float) -> None:
    """Read the next page of every level whose buffer ran dry and may hold more."""
    empty = [level for level, buffer in enumerate(buffers) if not buffer and not done[level]]
    if not empty:
        return
    async with broker.client.pipeline(transaction=False) as pipe:
        for level in empty:
            cursor = cursors[level]
            pipe.xrange(layout.streams[level], first if cursor is None else '(' + cursor, '+',
                        count=PAGE)
        pages = await pipe.execute()
    end_ms = upper * 1000 + CLOCK_SKEW_MS
    for level, page in zip(empty, pages, strict=True):
        kept = [entry for entry in page if _id_key(entry[0])[0] <= end_ms]
        buffers[level] = kept
        if len(page) < PAGE or len(kept) < len(page):
            done[level] = True  # read to its end, or to past the window


def _retained(queue: str, level: int, entry_id: bytes,
              fields: dict[bytes, bytes]) -> Retained | None:
    if b'body' not in fields or any(name in fields for name in COPY_FIELDS):
        return None
    ts = fields.get(b'ts')
    try:
        sent_at = int(ts) / 1000 if ts is not None else _id_key(entry_id)[0] / 1000
        raw = fields.get(b'headers')
        headers = None if raw is None else orjson.loads(raw)
    except (ValueError, orjson.JSONDecodeError):
        return None  # a foreign entry this library cannot read back: not listed
    message_id = fields.get(b'id', b'').decode(errors='replace') or entry_id.decode()
    return Retained(queue, message_id, fields[b'body'], sent_at,
                    headers if isinstance(headers, dict) else None, level, entry_id.decode())


def _id_key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b'-')
    return int(ms), int(seq or 0)
