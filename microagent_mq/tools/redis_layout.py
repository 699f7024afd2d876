"""Where a queue declared with priorities, retention or a bound lives on Redis, and its flags.

A queue without those options has no layout (``None``) and takes the plain path: the same
keys, scripts and round trips as before these options existed. Level 0 of a queue is its own
stream; level ``n > 0`` is that stream's key + ``:p<n>``. Every key derives from the broker's
``stream_key``/``delayed_key``/``dead_key``, so all keys of one queue share a cluster slot.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..exceptions import QueueNotFound
from ..queue import Queue

if TYPE_CHECKING:
    from .redis import RedisBroker

# Stream ids are the server's clock, ``ts`` the sender's: reads by time start this much
# earlier in the stream and filter on ``ts``, so a sender's clock ahead of Redis loses nothing.
CLOCK_SKEW_MS = 60_000


@dataclass(frozen=True, slots=True)
class Layout:
    """The keys and options of a queue with priorities, retention or a bound."""

    name: str
    streams: tuple[str, ...]  # by level: streams[0] is the queue's own stream
    delayed: str
    dead: str
    retention_ms: int  # 0: handled entries are deleted, as on a plain queue
    max_length: int  # 0: unbounded
    overflow: str
    clock: str  # the last id given to an entry of any level ('' without priorities)

    @property
    def retaining(self) -> bool:
        """Handled entries stay in the streams (acked, not deleted) until trimmed."""
        return self.retention_ms > 0

    @property
    def highest_first(self) -> tuple[str, ...]:
        """The level streams, highest priority first (the order reads ask for)."""
        return self.streams[::-1]


def level_key(stream: str, level: int) -> str:
    """The stream of priority ``level`` of the queue whose stream is ``stream``."""
    return stream if level == 0 else f'{stream}:p{level}'


def featured(queue: Queue) -> bool:
    """True for a queue declared with priorities, retention or a bound."""
    return bool(queue.max_priority or queue.max_length or queue.retention)


def featured_name(name: str) -> bool:
    """``featured`` for the queue declared as ``name``; False for one this process never declared."""
    try:
        return featured(Queue.get(name))
    except QueueNotFound:
        return False


def layout_of(broker: 'RedisBroker', queue: Queue) -> Layout | None:
    """The layout of ``queue`` on ``broker``; None for a plain queue."""
    if not featured(queue):
        return None
    stream = broker.stream_key(queue.name)
    return Layout(queue.name, tuple(level_key(stream, n) for n in range(queue.max_priority + 1)),
                  broker.delayed_key(queue.name), broker.dead_key(queue.name),
                  int(queue.retention_s * 1000), queue.max_length, queue.overflow,
                  f'{stream}:clock' if queue.max_priority else '')


def layout_named(broker: 'RedisBroker', name: str) -> Layout | None:
    """The layout of the queue declared as ``name``; None for a plain or unknown one."""
    try:
        queue = Queue.get(name)
    except QueueNotFound:  # an operator's command on a queue this process never declared
        return None
    return None if queue.is_exchange else layout_of(broker, queue)
