"""Reading a queue's journal (``<q>-journal``, see ``nats_options``) for ``history`` and ``replay``.

Each read is one ephemeral pull consumer (no acks, in memory, deleted at the end) starting at
the position read on from (a journal stream sequence), or at ``since`` (by the server's store
time, a little early for clock skew; the sender's stamp then decides), or at the oldest. It
reads no further than the journal's last message when the read began, nor past ``until``.
"""

import datetime
import math
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js import api

from ..transport import Retained
from .nats_codec import id_of, sent_at_of, user_headers_of

if TYPE_CHECKING:
    from .nats import NATSBroker

SKEW_S = 5.0  # the sender's clock may be this far from the server's
PAGE = 1000  # messages per pull
FETCH_TIMEOUT_S = 5.0  # a pull for messages the consumer said it has
IDLE_DELETE_S = 60.0  # the server deletes a read's consumer left behind (a crash) after this


async def retained(broker: 'NATSBroker', name: str, since: float | None, until: float | None,
                   after: Any, limit: int) -> tuple[list[Retained], Any]:
    """``AbstractQueueBroker._retained`` on the journal of queue ``name``."""
    js = await broker.jetstream()
    stream = broker.names.journal_stream(name)
    try:
        state = (await js.stream_info(stream)).state
    except nats.js.errors.NotFoundError:
        return [], None
    last = state.last_seq
    if not state.messages or (after is not None and after >= last):
        return [], None
    info = await js.add_consumer(stream, api.ConsumerConfig(
        ack_policy=api.AckPolicy.NONE, mem_storage=True, inactive_threshold=IDLE_DELETE_S,
        **_start(after, since)))
    try:
        if not info.num_pending:
            return [], None
        pull = await js.pull_subscribe_bind(info.name, stream=stream)
        try:
            return await _read(pull, name, since, until, last, min(limit, info.num_pending))
        finally:
            await pull.unsubscribe()
    finally:
        try:
            await js.delete_consumer(stream, info.name)
        except nats.errors.Error:  # gone already; else the server deletes it when idle
            pass


def _within(sent: float, since: float | None, until: float | None) -> bool:
    """``since <= sent <= until`` to the millisecond stamps are stored with (``Mq-Sent-At``)."""
    sent_ms = round(sent * 1000)
    return ((since is None or sent_ms >= math.floor(since * 1000))
            and (until is None or sent_ms <= math.ceil(until * 1000)))


def _start(after: Any, since: float | None) -> dict[str, Any]:
    if after is not None:
        return {'deliver_policy': api.DeliverPolicy.BY_START_SEQUENCE, 'opt_start_seq': int(after) + 1}
    if since is not None:
        start = datetime.datetime.fromtimestamp(max(since - SKEW_S, 0), datetime.UTC)
        return {'deliver_policy': api.DeliverPolicy.BY_START_TIME, 'opt_start_time': start}
    return {'deliver_policy': api.DeliverPolicy.ALL}


async def _read(pull: Any, name: str, since: float | None, until: float | None, last: int,
                want: int) -> tuple[list[Retained], Any]:
    entries: list[Retained] = []
    position = None
    while len(entries) < want:
        try:
            msgs = await pull.fetch(min(want - len(entries), PAGE), timeout=FETCH_TIMEOUT_S)
        except (TimeoutError, nats.errors.TimeoutError):
            return entries, None  # trimmed meanwhile: nothing more
        for msg in msgs:
            meta = msg.metadata
            seq, headers = meta.sequence.stream, msg.headers
            stored = meta.timestamp.timestamp()
            if until is not None and stored > until + SKEW_S:
                return entries, None  # the window is over
            sent = sent_at_of(headers) or stored
            if _within(sent, since, until):
                message_id, _ = id_of(headers, f'{name}-journal-{seq}')
                entries.append(Retained(name, message_id, msg.data, sent, user_headers_of(headers),
                                        position=seq))
            position = seq
            if seq >= last or not meta.num_pending:
                return entries, None
    return entries, position
