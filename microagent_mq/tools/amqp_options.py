"""Priorities and bounds on RabbitMQ: the arguments a queue is declared with, and where retries go.

A queue declared with none of the issue-13 options (``max_priority``, ``max_length``) is
declared with exactly the arguments it had before (``amqp_durability.ARGUMENTS``).

- **Priorities**: ``x-max-priority`` on the queue and the AMQP ``priority`` property on each
  message (``amqp_codec``). Properties survive dead-lettering, so a message keeps its priority
  down the delay ladder, and every copy we publish (retry, release, crash count) carries it.
  Quorum queues on RabbitMQ 3.10 refuse ``x-max-priority`` (measured:
  ``PRECONDITION_FAILED - invalid arg 'x-max-priority' ... of queue type rabbit_quorum_queue``),
  so that combination is a ``ConfigurationError`` before anything is declared.
- **Bounds**: ``x-max-length`` with ``x-overflow`` ``reject-publish`` (a full queue nacks the
  publish: ``QueueFull``) or ``drop-head`` (``drop_oldest``). RabbitMQ counts ready messages
  only, as ``queue_length`` does. A quorum queue refuses only once it is *over* its limit
  (3.10, measured), so a quorum ``reject`` queue is declared with ``x-max-length`` one less.
- **Retries of a bounded queue never meet its bound.** RabbitMQ drops a message dead-lettered
  into a full ``reject-publish`` queue (classic dead-lettering is at most once: the delay ladder
  delivers that way), and a transaction publishing into one fails as a whole (measured:
  ``PRECONDITION_FAILED - partial tx completion``); into a ``drop-head`` queue a retry would push
  out another accepted message. So everything the library already accepted re-enters a bounded
  queue ``q`` through ``q.due``, an unbounded sibling (same type, same priorities) that every
  consumer of ``q`` consumes too: retries, releases, crash counts, delayed sends when due and
  requeued dead letters. The bound applies to new sends; ``queue_length`` counts both queues.
"""

from aiormq.abc import FieldTable

from ..exceptions import ConfigurationError, QueueNotFound
from ..queue import Queue
from .amqp_durability import ARGUMENTS

OVERFLOW = {'reject': 'reject-publish', 'drop_oldest': 'drop-head'}
DUE_SUFFIX = '.due'


def check_options(queue: Queue, durability: str) -> None:
    """Refuse what RabbitMQ 3.10 cannot do for ``queue`` as a ``durability`` queue."""
    if queue.max_priority and durability == 'quorum':
        raise ConfigurationError(
            f'queue {queue.name!r}: RabbitMQ quorum queues have no priorities (3.10 refuses '
            'x-max-priority): declare it durability="classic", or drop max_priority')


def queue_arguments(queue: Queue, durability: str, bounded: bool = True) -> FieldTable | None:
    """The arguments of ``queue``'s declaration; ``bounded=False``: without ``max_length``."""
    base = ARGUMENTS[durability]
    if not queue.max_priority and not (bounded and queue.max_length):
        return base  # unchanged: a plain queue declares as it always did
    arguments: FieldTable = dict(base or {})
    if queue.max_priority:
        arguments['x-max-priority'] = queue.max_priority
    if bounded and queue.max_length:
        arguments['x-max-length'] = queue.max_length
        if durability == 'quorum' and queue.overflow == 'reject':
            # A 3.10 quorum queue refuses a publish only once it holds more than its limit
            # (measured: x-max-length 3 takes a 4th message), so it is told one less.
            arguments['x-max-length'] = queue.max_length - 1
        arguments['x-overflow'] = OVERFLOW[queue.overflow]
    return arguments


def due_name(name: str) -> str:
    """The unbounded sibling of bounded queue ``name``, where its accepted messages re-enter."""
    return f'{name}{DUE_SUFFIX}'


def is_bounded(name: str) -> bool:
    """True for a declared queue with a ``max_length`` (an exchange or unknown name: False)."""
    try:
        return Queue.get(name).max_length > 0
    except QueueNotFound:
        return False


def reentry(name: str) -> str:
    """Where a message of queue ``name`` that was already accepted is published again."""
    return due_name(name) if is_bounded(name) else name
