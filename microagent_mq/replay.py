"""Retention's two reads, written once for every transport: ``history`` and ``replay``.

A transport keeps what a queue declared with ``retention`` received and reads it back in send
order (``AbstractQueueBroker._retained``); sending it again is the broker's ordinary send path.
"""

import math
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError, QueueException
from .middleware.base import before_send
from .queue import Queue
from .transport import Outgoing, Retained

if TYPE_CHECKING:
    from .broker import AbstractQueueBroker

REPLAY_PAGE = 500  # retained messages read, then sent again, per round trip
REPLAYED_FROM = 'replayed_from'  # the header a replayed message carries: the original's id


async def history(broker: 'AbstractQueueBroker', name: str, since: Any, limit: int) -> list[Retained]:
    """The oldest ``limit`` retained messages of queue ``name`` sent at ``since`` or later."""
    queue = retaining(broker, name)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigurationError(f'invalid limit {limit!r}: a positive integer expected')
    entries, _ = await broker._retained(queue.name, epoch(since, 'since'), None, None, limit)
    return entries[:limit]


async def replay(broker: 'AbstractQueueBroker', name: str, since: Any, from_id: str | None,
                 until: Any) -> int:
    """Send again, in order, what queue ``name`` retained in the window; how many."""
    queue = retaining(broker, name)
    start = epoch(since, 'since')
    # Never later than now: this replay's own copies are retained too, and must not be read.
    end = min(epoch(until, 'until') or math.inf, time.time())
    first_new = broker._new_message_id()
    found, count, cursor = from_id is None, 0, None
    while True:
        page, cursor = await broker._retained(queue.name, start, end, cursor, REPLAY_PAGE)
        batch: list[Outgoing] = []
        for entry in page:
            if _sent_since(broker, entry.message_id, first_new):  # whatever the clocks say
                cursor = None
                break
            if not found:
                if entry.message_id != from_id:
                    continue
                found = True
            batch.append(Outgoing(entry.body, broker._new_message_id(), (queue.name,),
                                  headers={**(entry.headers or {}), REPLAYED_FROM: entry.message_id},
                                  sent_at=time.time(), priority=entry.priority))
        if batch:
            if broker.middlewares:
                await before_send(broker.middlewares, batch)
            await broker._publish(batch)
            count += len(batch)
        if cursor is None or not page:
            break
    if not found:
        raise QueueException(f'queue {name!r} retains no message {from_id!r} in that window')
    broker.log.info('Replayed %d message(s) of %s', count, name)
    return count


def retaining(broker: 'AbstractQueueBroker', name: str) -> Queue:
    """Queue ``name`` if it is declared with retention, else a clear error."""
    queue = broker._queue(name)
    if not queue.retention_s:
        raise QueueException(f'queue {name!r} keeps no history: declare it with retention '
                             f'(like "retention": "7d" in queues.json)')
    return queue


def _sent_since(broker: 'AbstractQueueBroker', message_id: str, first: str) -> bool:
    """True for an id ``broker`` gave a message after it gave ``first``."""
    prefix = broker._id_prefix
    if not message_id.startswith(prefix):
        return False
    try:
        return int(message_id[len(prefix):], 16) >= int(first[len(prefix):], 16)
    except ValueError:
        return False


def epoch(value: Any, what: str) -> float | None:
    """Epoch seconds of a datetime, a number or an ISO 8601 string (naive: local time)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ConfigurationError(f'invalid {what} {value!r}: an ISO 8601 time like '
                                     f"'2026-11-27T10:00' expected") from None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ConfigurationError(f'invalid {what} {value!r}: a datetime, epoch seconds or an ISO '
                             f'8601 string expected')
