"""How a batch of ``Outgoing`` messages becomes RabbitMQ publishes: one per copy.

A message is one copy, published to its queue or to its exchange with its topic; a delayed
message is one copy per queue it goes to, published into the delay ladder (``amqp_delay``)
with the queue in its ``mq-delay-to`` header. Copies are what a failed batch sends again.
"""

import math
from dataclasses import dataclass
from typing import Any, cast

import aiormq
from aio_pika.abc import AbstractChannel
from pamqp.commands import Basic

from ..exceptions import ConfigurationError
from ..transport import Outgoing
from .amqp_codec import outgoing_properties
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


async def send(channel: AbstractChannel, copy: Copy) -> Any:
    """Publish one copy on ``channel`` (a confirming one); return once RabbitMQ confirmed it.

    Straight on aiormq's channel, with aio-pika's errors (a nack, an unroutable message with
    ``on_return_raises``: aiormq raises them), minus what concurrent sends pay for nothing:
    an ``aio_pika.Message`` per copy, and the wait until the frames left the socket (held
    under the channel's lock, it lets only one publish at a time reach the socket; the
    confirm, which comes after, is what a send waits for).
    """
    message = copy.message
    # aiormq's own channel: its basic_publish takes ``wait`` (the abstract one does not say)
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    if copy.delayed_to:
        ms = delay_ms(message.delay)
        return await underlay.basic_publish(
            message.body, exchange=entry_exchange(ms), routing_key=routing_key(ms),
            properties=properties_of(message, {DESTINATION_HEADER: copy.delayed_to}),
            mandatory=True, wait=False)
    if message.exchange:
        return await underlay.basic_publish(
            message.body, exchange=message.exchange, routing_key=message.topic,
            properties=properties_of(message), mandatory=False, wait=False)
    return await underlay.basic_publish(
        message.body, exchange='', routing_key=message.queues[0],
        properties=properties_of(message), mandatory=True, wait=False)


def properties_of(message: Outgoing, extra: dict[str, Any] | None = None) -> Basic.Properties:
    """A first attempt, with the sender's metadata; ``extra``: transport headers."""
    return outgoing_properties(message.message_id, 1, headers=message.headers,
                               sent_at=message.sent_at, extra=extra)
