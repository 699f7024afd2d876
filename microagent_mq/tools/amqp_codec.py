"""How a message and its metadata look on the AMQP wire, written and read in one place.

Body: the user's JSON, unchanged. Properties: ``message_id``, ``content_type``, persistent
delivery. Headers: ``x-attempt`` (int), ``x-sent-at`` (int, epoch milliseconds: AMQP tables
would store a Python float as 32 bits), ``x-headers`` (the sender's metadata as one JSON
string, so every JSON value comes back exactly as sent). A message from a foreign producer
may have none of these: it is attempt 1 with no metadata. Without ``message_id`` its id is
``body-<hash of the body>`` (``id_of``): stable across redeliveries and the copies we
publish, which carry it, but shared by equal bodies, so it is marked synthetic (never used for
idempotency); an id that is exactly that hash of its body is taken as made up here.
Dead letters add ``x-error`` and ``x-failed-at``: int epoch milliseconds on the wire (a float
given in ``extra`` is taken as seconds and converted); read back in both forms, because
letters written before this rule hold a float of seconds (stored by AMQP as 32 bits).
"""

import hashlib
from typing import Any

import aio_pika
import orjson

from . import amqp_wire
from .amqp_incoming import Readable


def outgoing_message(body: bytes, message_id: str, attempt: int, *,
                     headers: dict[str, Any] | None = None, sent_at: float = 0.0,
                     extra: dict[str, Any] | None = None, priority: int = 0) -> aio_pika.Message:
    """A persistent message; ``extra``: transport headers such as ``x-error``.

    ``priority``: the AMQP property, set only when above 0 (a plain message is unchanged).
    """
    return aio_pika.Message(body, message_id=message_id, content_type=CONTENT_TYPE,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            headers=_table(attempt, headers, sent_at, extra),
                            priority=priority or None)


def outgoing_properties(message_id: str, attempt: int, *, headers: dict[str, Any] | None = None,
                        sent_at: float = 0.0, extra: dict[str, Any] | None = None,
                        priority: int = 0) -> bytes:
    """The properties ``outgoing_message`` gives, encoded for a publish's content header (the
    send path, ``amqp_publisher``: an ``aio_pika.Message`` or a ``Basic.Properties`` costs
    more than the rest of a send's own work)."""
    return amqp_wire.properties(CONTENT_TYPE, _table(attempt, headers, sent_at, extra),
                                PERSISTENT, priority, message_id)


CONTENT_TYPE = 'application/json'
PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


def _table(attempt: int, headers: dict[str, Any] | None, sent_at: float,
           extra: dict[str, Any] | None) -> dict[str, Any]:
    table: dict[str, Any] = {'x-attempt': attempt}
    if sent_at > 0:
        table['x-sent-at'] = epoch_ms(sent_at)
    if headers:
        table['x-headers'] = orjson.dumps(headers).decode()
    if extra:
        table.update(extra)
        failed_at = table.get('x-failed-at')
        if isinstance(failed_at, float):
            table['x-failed-at'] = epoch_ms(failed_at)
    return table


def priority_of(message: Readable) -> int:
    """The message's AMQP priority (0 when it has none)."""
    return getattr(message, 'priority', None) or 0


def epoch_ms(seconds: float) -> int:
    """Epoch seconds as int milliseconds: how times travel (a float would be cut to 32 bits)."""
    return int(seconds * 1000)


def failed_at_of(message: Readable) -> float:
    """Epoch seconds a dead letter failed at: int ms, or an older letter's float seconds."""
    value = message.headers.get('x-failed-at')
    if isinstance(value, bool):
        return 0.0
    if isinstance(value, int):
        return value / 1000
    return float(value) if isinstance(value, float) else 0.0


def attempt_of(message: Readable) -> int:
    """The attempt a message is on, from its ``x-attempt`` header (1 when absent)."""
    value = message.headers.get('x-attempt', 1)
    return value if isinstance(value, int) and value >= 1 else 1


def sent_at_of(message: Readable) -> float:
    """Epoch seconds the sender stamped, 0.0 when unknown."""
    value = message.headers.get('x-sent-at')
    return value / 1000 if isinstance(value, int) else 0.0


def headers_of(message: Readable) -> dict[str, Any] | None:
    """The sender's metadata as sent, None when there is none (or it is unreadable)."""
    raw = message.headers.get('x-headers')
    if not isinstance(raw, str | bytes):
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


SYNTHETIC_PREFIX = 'body-'


def body_id(body: bytes) -> str:
    """The id made up for a foreign message without one: a hash of its body."""
    return f'{SYNTHETIC_PREFIX}{hashlib.blake2b(body, digest_size=12).hexdigest()}'


def id_of(message: Readable) -> tuple[str, bool]:
    """The message's id, and whether it was made up (here, or for a copy of a foreign message)."""
    message_id = message.message_id
    if not message_id:
        return body_id(message.body), True
    # Our copies of a foreign message (retry, dead letter, release) carry the made-up id.
    return message_id, message_id.startswith(SYNTHETIC_PREFIX) and message_id == body_id(message.body)
