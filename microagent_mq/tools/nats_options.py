"""Queue options (issue 13) on NATS JetStream: what each one becomes, and the send path they need.

``retention``: a second stream ``<q>-journal`` (limits retention, ``max_age`` = the retention)
gets a copy of every message sent to the queue. The queue's own stream stays a work queue, so
the journal's trimming can never remove a message not yet handled, and a queue without
retention costs exactly what it did. Rejected alternatives: ``max_age`` on the queue stream
(trims unhandled messages); a limits queue stream trimmed behind the consumer's ack floor (a
consumer created anew would deliver every retained message again, and retries and requeues
would enter the history); a journal *sourcing* the queue stream (copies asynchronously: a
message acked before the copy is gone from a work queue, never copied).

``max_length``: kept by the library with conditional stores (``nats_bounded``), not by the
stream's ``max_msgs``, which counts messages being handled and retries too.

``max_priority``: JetStream has no priorities; such a queue is refused at send and subscribe.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.js import JetStreamContext

from ..exceptions import ConfigurationError, QueueNotFound
from ..queue import Queue
from ..transport import Outgoing

if TYPE_CHECKING:
    from .nats import NATSBroker


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


class PlannedSend:
    """One ``_publish`` call's copies for queues with a plan.

    A copy for a bounded queue is stored on its own and awaited (``Bound.store``), and its
    journal copy follows once it is stored: a refused send leaves nothing, not even in the
    journal. Other copies are pipelined into ``acks``, awaited together by the caller.
    """

    def __init__(self, broker: 'NATSBroker', js: JetStreamContext, batch: Sequence[Outgoing],
                 acks: list[Any]) -> None:
        self._broker, self._js, self._batch, self._acks = broker, js, batch, acks
        self._admitted: set[str] = set()

    async def store(self, plan: QueuePlan, message: Outgoing, headers: dict[str, str],
                    delayed: dict[str, str] | None) -> None:
        """Store ``message``'s copy for ``plan.queue`` (``delayed``: its delayed-stream headers)."""
        broker, js, names = self._broker, self._js, self._broker.names
        if delayed is not None:  # counted once due: the mover stores it within the bound
            await broker.ensure_stream(names.delayed_stream(plan.queue), names.delayed_subject(plan.queue))
            self._acks.append(await js.publish_async(names.delayed_subject(plan.queue), message.body,
                                                     headers=delayed))
        else:
            await broker.ensure_queue(plan.queue)
            if plan.max_length:
                await self._admit(plan)
                await broker.bound(plan).store(names.subject(plan.queue), message.body, headers)
            else:
                self._acks.append(await js.publish_async(names.subject(plan.queue), message.body,
                                                         headers=headers))
        if plan.retention_s:
            await broker.ensure_journal(plan)
            self._acks.append(await js.publish_async(names.journal_subject(plan.queue), message.body,
                                                     headers=headers))

    async def _admit(self, plan: QueuePlan) -> None:
        """A batch that cannot fit a 'reject' queue is refused whole, before any of it is stored.

        JetStream (2.9) stores each message on its own, so this checks, it does not reserve: a
        sender racing with this batch may fill the queue midway, leaving the batch stored in part.
        """
        if not plan.reject or len(self._batch) == 1 or plan.queue in self._admitted:
            return
        self._admitted.add(plan.queue)
        count = sum(m.queues.count(plan.queue) for m in self._batch if m.delay <= 0)
        if count > 1:
            await self._broker.bound(plan).admit(count)
