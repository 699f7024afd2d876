"""Dead letters of a queue on NATS: the ``<q>-dlq`` stream, listed and requeued (see ``nats_codec``)."""

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import nats.js.errors

from ..exceptions import QueueFull
from ..transport import DeadLetter
from .nats_codec import ATTEMPTS, ERROR, FAILED_AT, copy_headers, int_header, message_id_of

if TYPE_CHECKING:
    from .nats import NATSBroker


async def dead_letters(broker: 'NATSBroker', name: str, limit: int) -> list[DeadLetter]:
    """The oldest ``limit`` dead letters of queue ``name``."""
    letters: list[DeadLetter] = []
    async for seq, msg in _messages(broker, name):
        letters.append(_dead_letter(name, msg, seq))
        if len(letters) >= limit:
            break
    return letters


async def requeue_dead_letters(broker: 'NATSBroker', name: str) -> int:
    """Move the dead letters of queue ``name`` back into it (within its bound); how many."""
    js = await broker.jetstream()
    try:  # a snapshot: letters dead-lettered again meanwhile stay for the next call
        last = (await js.stream_info(broker.names.dlq_stream(name))).state.last_seq
    except nats.js.errors.NotFoundError:
        return 0
    await broker.ensure_queue(name)
    moved = 0
    async for seq, msg in _messages(broker, name, last):
        message_id = message_id_of(msg.headers, f'dlq-{seq}')
        headers = copy_headers(msg.headers, f'{message_id}~requeued-{seq}', message_id)
        try:
            await broker.store(name, msg.data or b'', headers)
        except QueueFull as exc:
            raise QueueFull(f'{exc}; {moved} dead letter(s) requeued, the others stay') from None
        await js.delete_msg(broker.names.dlq_stream(name), seq)
        moved += 1
    return moved


async def _messages(broker: 'NATSBroker', name: str,
                    last: int | None = None) -> AsyncIterator[tuple[int, Any]]:
    js = await broker.jetstream()
    stream = broker.names.dlq_stream(name)
    try:
        state = (await js.stream_info(stream)).state
    except nats.js.errors.NotFoundError:
        return
    end = state.last_seq if last is None else min(last, state.last_seq)
    for seq in range(max(state.first_seq, 1), end + 1):
        try:
            yield seq, await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue  # deleted: requeued already


def _dead_letter(queue: str, msg: Any, seq: int) -> DeadLetter:
    headers = msg.headers
    try:
        error = json.loads(headers.get(ERROR, '""')) if headers else ''
    except ValueError:
        error = headers.get(ERROR, '') if headers else ''
    return DeadLetter(queue, message_id_of(headers, f'dlq-{seq}'), msg.data or b'', str(error),
                      int_header(headers, ATTEMPTS, 1), int_header(headers, FAILED_AT, 0) / 1000)
