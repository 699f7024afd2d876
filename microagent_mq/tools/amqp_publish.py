"""How a batch of ``Outgoing`` messages becomes RabbitMQ publishes: one per copy.

A message is one copy, published to its queue or to its exchange with its topic; a delayed
message is one copy per queue it goes to, published into the delay ladder (``amqp_delay``)
with the queue in its ``mq-delay-to`` header. Copies are what a failed batch sends again.
"""

import math
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from ..exceptions import ConfigurationError
from ..transport import Outgoing
from .amqp_codec import outgoing_message
from .amqp_delay import DESTINATION_HEADER, MAX_DELAY_S, delay_ms, entry_exchange, routing_key


@dataclass(slots=True)
class Copy:
    """One ``basic.publish`` of a batch: a message, or its delayed copy for one of its queues."""

    message: Outgoing
    delayed_to: str = ''  # the destination queue of a delayed copy


def copies_of(message: Outgoing) -> list[Copy]:
    """The publishes a message takes (none for a delayed send that no queue takes)."""
    if message.delay > 0:
        return [Copy(message, queue) for queue in message.queues]
    return [Copy(message)]


def check_delay(delay: float) -> None:
    """Refuse a delay the ladder cannot hold, before anything of a batch is published."""
    if not math.isfinite(delay) or delay > MAX_DELAY_S:
        raise ConfigurationError(
            f'invalid delay {delay!r}: RabbitMQ delays up to {MAX_DELAY_S:.0f} s (49.7 days)')


def exchange_of(copy: Copy) -> str:
    """The exchange a copy is published to: the ladder's entry, the message's, or none."""
    if copy.delayed_to:
        return entry_exchange(delay_ms(copy.message.delay))
    return copy.message.exchange


def send(channel: AbstractChannel, exchanges: dict[str, AbstractExchange],
         copy: Copy) -> Awaitable[Any]:
    """Publish one copy (confirmed when awaited); ``exchanges``: declared, by name."""
    message = copy.message
    if copy.delayed_to:
        ms = delay_ms(message.delay)
        return exchanges[entry_exchange(ms)].publish(
            message_of(message, {DESTINATION_HEADER: copy.delayed_to}), routing_key(ms))
    if message.exchange:
        return exchanges[message.exchange].publish(message_of(message), message.topic,
                                                   mandatory=False)
    return channel.default_exchange.publish(message_of(message), message.queues[0])


def message_of(message: Outgoing, extra: dict[str, Any] | None = None) -> aio_pika.Message:
    """A first attempt, with the sender's metadata; ``extra``: transport headers."""
    return outgoing_message(message.body, message.message_id, 1, headers=message.headers,
                            sent_at=message.sent_at, extra=extra)
