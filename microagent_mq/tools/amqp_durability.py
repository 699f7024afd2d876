"""Classic and quorum queues: how each is declared, and how a quorum queue counts attempts.

A queue's durability is its ``Queue.durability``, or the broker's default
(``AMQPBroker(dsn, durability='quorum')``). A quorum queue is declared durable, neither
exclusive nor auto-delete, with the argument ``x-queue-type: quorum``; a classic one exactly
as before this option existed (no argument), so existing queues declare as they always did.
Its ``.dlq`` has the queue's durability: on a cluster, a quorum queue's dead letters are
replicated like its messages, and dead-lettering never waits for one node. The delay ladder
and the ``.bindings`` records stay classic (shared plumbing; a ladder level dead-letters into
a quorum queue through the headers exchange like into a classic one).

The type is an argument of the declaration, so RabbitMQ refuses to declare an existing queue
with another type (``PRECONDITION_FAILED - inequivalent arg 'x-queue-type'``): that becomes a
``ConfigurationError`` naming both types. A queue does not change type in place.

Attempts on a quorum queue, measured on RabbitMQ 3.10.8: the queue counts, in the header
``x-delivery-count`` (absent at first), every time a delivered message came back unsettled:
its channel closed (a crash, a cut connection, a clean close too) or it was nacked or rejected
with requeue. A message coming back by a channel close keeps its place in the queue; one
nacked or rejected with requeue goes to the back. So here:

- **attempt = ``x-attempt`` + ``x-delivery-count``** (the count read on a redelivery only: a
  producer's copy may carry the header). A crash's redelivery is handled in place,
  not republished: it keeps its position (FIFO holds across a SIGKILL), and the count is the
  broker's, so ``max_attempts`` holds across any number of kills.
- **A graceful release still republishes** (the copy carries the attempt so far, with a fresh
  count, and the original is acked in the same transaction): since a nack or a close would
  add to the count exactly like a crash, that is the only release that costs no attempt. As
  on classic queues, released messages go to the back, in their order.
- A message dropped from the buffer as stale (its channel closed before it was handed out)
  was never handled: when it comes back to the same consumer, the one return it caused is
  not counted (to another consumer it is: an over-count, never an under-count).
- One over-count this cannot avoid: a message RabbitMQ 3.10 was still handing to a consumer
  when its ``basic.cancel`` arrived never reaches the consumer, yet comes back counted
  (traced at the frame level; seen in a few of the stops of a stress test). Classic queues
  do not do this. See docs/brokers/rabbitmq.md, "Quorum queues".
"""

import re

from aio_pika.abc import AbstractChannel, AbstractQueue
from aio_pika.exceptions import ChannelPreconditionFailed
from aiormq.abc import FieldTable

from ..exceptions import ConfigurationError
from .amqp_incoming import Readable

ARGUMENTS: dict[str, FieldTable | None] = {
    'classic': None,  # as declared before quorum queues were an option
    'quorum': {'x-queue-type': 'quorum'},
}
_CURRENT = re.compile(r"current is the value '([^']+)'")


async def declare_queue(channel: AbstractChannel, name: str, durability: str,
                        arguments: FieldTable | None = None) -> AbstractQueue:
    """Declare durable queue ``name`` of that durability; a type clash is a clear error.

    ``arguments``: the whole argument table (``amqp_options``), None: the durability's own.
    The clash closes ``channel`` (RabbitMQ's answer), as any failed declaration does.
    """
    try:
        return await channel.declare_queue(
            name, durable=True, arguments=ARGUMENTS[durability] if arguments is None else arguments)
    except ChannelPreconditionFailed as exc:
        if 'x-queue-type' not in str(exc):
            if 'inequivalent arg' in str(exc):
                raise ConfigurationError(
                    f'queue {name!r} exists on RabbitMQ with other options ({_reason(exc)}): '
                    'RabbitMQ cannot change them in place; delete the queue (or use another '
                    'name) first') from exc
            raise
        match = _CURRENT.search(str(exc))
        current = match.group(1) if match else 'classic'
        raise ConfigurationError(
            f'queue {name!r} exists on RabbitMQ as a {current} queue but is declared {durability} '
            f'here: a queue cannot change type; declare it {current}, or delete it (or move its '
            'messages to a queue of another name) first') from exc


def _reason(exc: ChannelPreconditionFailed) -> str:
    match = re.search(r"inequivalent arg '[^']+'[^\"']*", str(exc))
    return match.group(0).strip() if match else str(exc)


def delivery_count(message: Readable) -> int:
    """How many times a quorum queue got ``message`` back unsettled (0 when never)."""
    value = message.headers.get('x-delivery-count', 0)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
