"""Publish after commit: a transactional outbox on SQLAlchemy (extra ``[outbox]``)."""

try:
    import sqlalchemy  # noqa: F401
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise ImportError("microagent_mq.outbox needs SQLAlchemy: pip install 'microagent-mq[outbox]'") from exc

from .idempotency import SQLIdempotencyStore
from .relay import OutboxRelay
from .store import FailedMessage, Outbox, OutboxError, OutboxTableMissing
from .transactional import register_event, set_default_outbox, transactional

__all__ = [
    'FailedMessage',
    'Outbox',
    'OutboxError',
    'OutboxRelay',
    'OutboxTableMissing',
    'SQLIdempotencyStore',
    'register_event',
    'set_default_outbox',
    'transactional',
]
