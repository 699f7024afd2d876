"""A message as the fields of a Redis stream entry, and an entry back into a ``Delivery``.

Fields: ``body`` (the user's JSON, the only one a foreign producer must write), ``id`` (the
message id; the stream id when absent), ``attempt`` (only above 1), ``ts`` (when it was sent,
epoch milliseconds, as on RabbitMQ), ``headers`` (JSON object; only when there are headers). Dead letters add
``error`` and ``failed_at``.
"""

import time
from typing import Any

import orjson

from ..transport import Delivery


class MalformedEntry(ValueError):
    """A stream entry no handler can be given: dead-lettered at once with this reason."""


def entry_fields(body: bytes, message_id: str, attempt: int, sent_at: float,
                 headers: dict[str, Any] | None) -> list[Any]:
    """The flat field/value list of a stream entry."""
    fields: list[Any] = ['body', body, 'id', message_id]
    if attempt > 1:
        fields += ('attempt', attempt)
    if sent_at:
        fields += ('ts', ts_ms(sent_at))
    if headers is not None:
        fields += ('headers', encoded_headers(headers))
    return fields


def encoded_headers(headers: dict[str, Any]) -> bytes:
    """``headers`` as stored in the ``headers`` field: JSON."""
    return orjson.dumps(headers)


def ts_ms(sent_at: float) -> int:
    """The ``ts`` field of a message sent at ``sent_at`` (epoch seconds)."""
    return int(sent_at * 1000)


def due_ms(delay: float) -> int:
    """The score of a message delayed by ``delay`` seconds: when it is due, epoch ms."""
    return int((time.time() + delay) * 1000)


def to_delivery(entry_id: bytes, fields: dict[bytes, bytes], prior: int = 0) -> Delivery:
    """The delivery of a stream entry; ``prior``: deliveries that may have run a handler.

    Raises ``MalformedEntry`` when the entry has no usable body or headers.
    """
    try:  # the entry as this library writes it
        headers = fields.get(b'headers')
        ts = fields.get(b'ts')
        return Delivery(fields[b'body'], fields[b'id'].decode(),
                        int(fields.get(b'attempt', 1)) + prior, entry_id,
                        None if headers is None else _headers(headers),
                        0.0 if ts is None else int(ts) / 1000)
    except (KeyError, ValueError, UnicodeDecodeError):
        return _foreign(entry_id, fields, prior)


def _foreign(entry_id: bytes, fields: dict[bytes, bytes], prior: int) -> Delivery:
    """An entry from another producer: only ``body`` is required, the rest has defaults."""
    body = fields.get(b'body')
    if body is None:
        names = sorted(name.decode(errors='replace') for name in fields)
        raise MalformedEntry(f'stream entry {entry_id.decode()} has no body field '
                             f'(fields: {", ".join(names) or "none"})')
    raw_headers = fields.get(b'headers')
    headers = None if raw_headers is None else _headers(raw_headers)
    message_id = fields.get(b'id', b'').decode(errors='replace') or entry_id.decode()
    attempt = max(_number(fields.get(b'attempt'), int, 1), 1)
    return Delivery(body, message_id, attempt + prior, entry_id, headers,
                    _number(fields.get(b'ts'), int, 0) / 1000)


def _headers(raw: bytes) -> dict[str, Any]:
    try:
        headers = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedEntry(f'headers field is not JSON: {exc}') from None
    if not isinstance(headers, dict):
        raise MalformedEntry(f'headers field is not a JSON object: {raw[:100]!r}')
    return headers


def _number(raw: bytes | None, kind: type[Any], default: Any) -> Any:
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError:
        return default
