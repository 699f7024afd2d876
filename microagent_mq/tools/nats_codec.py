"""How queues and messages look on NATS JetStream, written and read in one place.

Names, for queue ``q`` and the default prefix ``mq``: the stream ``mq-q`` (subject ``mq.q``,
work-queue retention) read by the durable pull consumer ``microagent_mq``; dead letters in
``mq-q-dlq`` (``mq.q.dlq``); delayed sends in ``mq-q-delayed`` (``mq.q.delayed``) until a
mover puts them into ``mq-q``; free deliveries (see ``NATSSubscription.release``) in
``mq-q-free`` (``mq.q.free.<stream sequence>``); a queue declared with ``retention``: a copy
of every message sent to it in ``mq-q-journal`` (``mq.q.journal``). A queue name never has a dot or a dash, so
no two of these can collide.

Body: the user's JSON, unchanged. Headers (all optional: a foreign producer's plain JSON
works): ``Nats-Msg-Id`` (JetStream's de-duplication id: a send retried after a lost reply is
stored once), ``Mq-Id`` (the message id when it differs from ``Nats-Msg-Id``),
``Mq-Sent-At`` (epoch milliseconds), ``Mq-Headers`` (the sender's metadata as JSON),
``Mq-Due`` (delayed stream: epoch milliseconds), and on dead letters ``Mq-Error`` (JSON
string), ``Mq-Attempts``, ``Mq-Failed-At`` (epoch milliseconds). A foreign message without
an id gets ``<stream>-<sequence>``, marked made up (``Delivery.synthetic_id``: never used for
idempotency), and its copies carry ``Mq-Synthetic-Id`` to say so.
"""

import json
import re
from dataclasses import dataclass
from typing import Any

CONSUMER = 'microagent_mq'
MOVER = 'mover'
PREFIX_RE = re.compile(r'^[A-Za-z0-9_]+$')
V1_ACK_TOKENS = 9  # an ack subject without domain and account hash (delivery_of)

MSG_ID = 'Nats-Msg-Id'
ID = 'Mq-Id'
SENT_AT = 'Mq-Sent-At'
HEADERS = 'Mq-Headers'
DUE = 'Mq-Due'
ERROR = 'Mq-Error'
ATTEMPTS = 'Mq-Attempts'
FAILED_AT = 'Mq-Failed-At'
SYNTHETIC = 'Mq-Synthetic-Id'  # on copies of a foreign message: its Mq-Id was made up here


@dataclass(frozen=True, slots=True)
class Names:
    """Stream and subject names of the queues under one prefix."""

    prefix: str

    def stream(self, queue: str) -> str:
        return f'{self.prefix}-{_token(queue)}'

    def subject(self, queue: str) -> str:
        return f'{self.prefix}.{_token(queue)}'

    def dlq_stream(self, queue: str) -> str:
        return f'{self.prefix}-{_token(queue)}-dlq'

    def dlq_subject(self, queue: str) -> str:
        return f'{self.prefix}.{_token(queue)}.dlq'

    def delayed_stream(self, queue: str) -> str:
        return f'{self.prefix}-{_token(queue)}-delayed'

    def delayed_subject(self, queue: str) -> str:
        return f'{self.prefix}.{_token(queue)}.delayed'

    def journal_stream(self, queue: str) -> str:
        return f'{self.prefix}-{_token(queue)}-journal'

    def journal_subject(self, queue: str) -> str:
        return f'{self.prefix}.{_token(queue)}.journal'

    def free_stream(self, queue: str) -> str:
        return f'{self.prefix}-{_token(queue)}-free'

    def free_subject(self, queue: str, seq: int | str) -> str:
        return f'{self.prefix}.{_token(queue)}.free.{seq}'


def _token(queue: str) -> str:
    """A queue name as one NATS name token: ``.`` separates subject tokens and is refused in
    stream names, and ``-`` joins our suffixes (``-dlq``). Queue names are lower case, so
    upper-case stand-ins cannot collide: ``bioconnect-id.service`` → ``bioconnectHidPservice``.
    Identifiers are unchanged."""
    return queue.replace('-', 'H').replace('.', 'P')


def message_headers(message_id: str, sent_at: float = 0.0,
                    headers: dict[str, Any] | None = None) -> dict[str, str]:
    """The NATS headers of a message sent to a queue."""
    table = {MSG_ID: message_id}
    if sent_at > 0:
        table[SENT_AT] = str(int(sent_at * 1000))
    if headers:
        table[HEADERS] = json.dumps(headers)  # ASCII only: NATS headers are MIME-like
    return table


def message_id_of(headers: dict[str, str] | None, fallback: str) -> str:
    """The id a message was sent with; ``fallback`` (its stream and sequence) when foreign."""
    if not headers:
        return fallback
    return headers.get(ID) or headers.get(MSG_ID) or fallback


def id_of(headers: dict[str, str] | None, fallback: str) -> tuple[str, bool]:
    """``message_id_of``, and whether that id was made up (the message came without one)."""
    sent = (headers.get(ID) or headers.get(MSG_ID)) if headers else None
    if not sent:
        return fallback, True
    return sent, bool(headers and headers.get(SYNTHETIC))


def sent_at_of(headers: dict[str, str] | None) -> float:
    """Epoch seconds the sender stamped, 0.0 when unknown."""
    raw = headers.get(SENT_AT) if headers else None
    return int(raw) / 1000 if raw and raw.isdigit() else 0.0


def user_headers_of(headers: dict[str, str] | None) -> dict[str, Any] | None:
    """The sender's metadata as sent; None when there is none (or it is unreadable)."""
    raw = headers.get(HEADERS) if headers else None
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def copy_headers(headers: dict[str, str] | None, dedupe_id: str, message_id: str) -> dict[str, str]:
    """Headers of a copy (moved, dead-lettered, requeued): the same id, its own de-dup id."""
    table = {k: v for k, v in (headers or {}).items()
             if k in (SENT_AT, HEADERS, SYNTHETIC)}
    table[MSG_ID] = dedupe_id
    table[ID] = message_id
    return table


def delivery_of(reply: str) -> tuple[int, int]:
    """(times delivered, stream sequence) of a stream message, from its ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>``,
    or with ``<domain>.<account hash>.`` after ``$JS.ACK.`` and a token more at the end: what
    nats-py's ``Msg.metadata`` reads too, without its dataclasses and datetime per message.
    """
    tokens = reply.split('.')
    if len(tokens) == V1_ACK_TOKENS:
        return int(tokens[4]), int(tokens[5])
    return int(tokens[6]), int(tokens[7])


def int_header(headers: dict[str, str] | None, name: str, default: int) -> int:
    raw = headers.get(name) if headers else None
    return int(raw) if raw and raw.isdigit() else default
