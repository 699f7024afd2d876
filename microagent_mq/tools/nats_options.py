"""Queue options (issue 13) on NATS JetStream: what each one becomes, and the send path they need.

``retention``: a second stream ``<q>-journal`` (limits retention, ``max_age`` = the retention)
gets a copy of every message sent to the queue. The queue's own stream stays a work queue, so
the journal's trimming can never remove a message not yet handled, and a queue without
retention costs exactly what it did. Rejected alternatives: ``max_age`` on the queue stream
(trims unhandled messages); a limits queue stream trimmed behind the consumer's ack floor (a
consumer created anew would deliver every retained message again, and retries and requeues
would enter the history); a journal *sourcing* the queue stream (copies asynchronously: a
message acked before the copy is gone from a work queue, never copied).

``max_length``: the queue stream's ``max_msgs``; ``overflow='reject'`` is ``discard: new`` (the
server refuses the store: ``QueueFull``), ``'drop_oldest'`` is ``discard: old``. JetStream
counts every message its stream holds: waiting ones, and also those being handled or waiting
for a retry (a ``nak`` keeps a message in the stream; it is never stored again, so a retry or a
release cannot be refused).

``max_priority``: JetStream has no priorities; such a queue is refused at send and subscribe.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.js.errors
from nats.js import JetStreamContext

from ..exceptions import ConfigurationError, QueueFull, QueueNotFound
from ..queue import Queue
from ..transport import Outgoing

if TYPE_CHECKING:
    from .nats import NATSBroker

STORE_FAILED = 10077  # JetStream's "stream store failed", here: "maximum messages exceeded"


@dataclass(frozen=True, slots=True)
class QueuePlan:
    """What a queue declared with options needs on JetStream beyond a plain work queue."""

    queue: str
    retention_s: float  # 0.0: no journal
    max_length: int  # 0: unbounded
    reject: bool  # overflow 'reject': a store beyond max_length is refused


def plan_of(name: str) -> QueuePlan | None:
    """The plan of queue ``name``; None for a plain (or undeclared) queue. Refuses priorities."""
    try:
        queue = Queue.get(name)
    except QueueNotFound:
        return None
    if queue.max_priority:
        raise ConfigurationError(f'queue {name!r} has max_priority {queue.max_priority}: NATS '
                                 f'JetStream has no message priorities (use Redis, RabbitMQ or memory)')
    if not queue.retention_s and not queue.max_length:
        return None
    return QueuePlan(name, queue.retention_s, queue.max_length,
                     bool(queue.max_length) and queue.overflow == 'reject')


def is_full(exc: BaseException) -> bool:
    """True for JetStream's refusal to store beyond a stream's ``max_msgs`` (``discard: new``)."""
    return (isinstance(exc, nats.js.errors.APIError) and exc.err_code == STORE_FAILED
            and 'maximum messages' in str(exc.description))


def full(plan: QueuePlan, what: str) -> QueueFull:
    return QueueFull(f'queue {plan.queue!r} is full (max_length {plan.max_length}): {what}')


class PlannedSend:
    """One ``_publish`` call's copies for queues with a plan (see the module docstring).

    A copy for a 'reject' queue is stored on its own, awaited, so that a refused one stores
    nothing (nats-py's ``publish_async`` never resolves a refused store), and its journal
    copy follows only once it is stored. Other copies are pipelined into ``acks``.
    """

    def __init__(self, broker: 'NATSBroker', js: JetStreamContext, batch: Sequence[Outgoing],
                 acks: list[Any]) -> None:
        self._broker, self._js, self._batch, self._acks = broker, js, batch, acks
        self._checked: set[str] = set()

    async def store(self, plan: QueuePlan, message: Outgoing, headers: dict[str, str],
                    delayed: dict[str, str] | None) -> None:
        """Store ``message``'s copy for ``plan.queue`` (``delayed``: its delayed-stream headers)."""
        broker, js, names = self._broker, self._js, self._broker.names
        if delayed is not None:  # counted once due: the mover waits for room (nats_delayed)
            await broker.ensure_stream(names.delayed_stream(plan.queue), names.delayed_subject(plan.queue))
            self._acks.append(await js.publish_async(names.delayed_subject(plan.queue), message.body,
                                                     headers=delayed))
        else:
            await broker.ensure_queue(plan.queue)
            subject = names.subject(plan.queue)
            if plan.reject:
                await self._check_batch(plan)
                try:
                    await js.publish(subject, message.body, headers=headers)
                except nats.js.errors.APIError as exc:
                    if is_full(exc):
                        raise full(plan, 'the message was not stored') from None
                    raise
            else:
                self._acks.append(await js.publish_async(subject, message.body, headers=headers))
        if plan.retention_s:
            await broker.ensure_journal(plan)
            self._acks.append(await js.publish_async(names.journal_subject(plan.queue), message.body,
                                                     headers=headers))

    async def _check_batch(self, plan: QueuePlan) -> None:
        """A batch that cannot fit is refused whole before any of it is stored.

        JetStream (2.9) stores each message on its own, so this is a check, not a promise: a
        consumer or another sender racing with it may still leave a batch stored in part.
        """
        if len(self._batch) == 1 or plan.queue in self._checked:
            return
        self._checked.add(plan.queue)
        count = sum(m.queues.count(plan.queue) for m in self._batch if m.delay <= 0)
        if count < 2:
            return
        held = (await self._js.stream_info(self._broker.names.stream(plan.queue))).state.messages
        if held + count > plan.max_length:
            raise full(plan, f'{count} messages do not fit beside the {held} it holds; none was stored')
