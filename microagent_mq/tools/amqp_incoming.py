"""A message RabbitMQ pushed to a consumer, as little as the consumer reads of it.

aio-pika wraps every delivery in an ``IncomingMessage``: thirteen properties copied through a
locked ``__setattr__`` each, then a task more to call the consumer back. Draining a queue,
that was the largest cost of ours not paid by RabbitMQ's client itself (measured with
cProfile: about an eighth of the consumer's CPU). The consumer reads five things of a
message and settles it on its channel; so it takes aiormq's deliveries as they come.
"""

from collections.abc import Mapping
from typing import Any, Protocol

from aiormq.abc import AbstractChannel, DeliveredMessage
from aiormq.exceptions import ChannelInvalidStateError


class Readable(Protocol):
    """What the codec reads of a message: ours, or aio-pika's (``basic.get``)."""

    @property
    def body(self) -> bytes: ...

    @property
    def message_id(self) -> str | None: ...

    @property
    def headers(self) -> Mapping[str, Any]: ...


class Pushed:
    """One delivery of a consumer's channel."""

    __slots__ = ('_channel', 'body', 'delivery_tag', 'headers', 'message_id', 'priority',
                 'redelivered')

    def __init__(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        self._channel = message.channel
        self.body: bytes = message.body
        self.delivery_tag: int = message.delivery_tag or 0
        self.redelivered: bool = bool(message.redelivered)
        self.message_id: str | None = properties.message_id
        self.headers: Mapping[str, Any] = properties.headers or {}
        self.priority: int = properties.priority or 0

    @property
    def channel(self) -> AbstractChannel:
        """The channel it came on; raises, as aio-pika does, once that channel closed."""
        if self._channel.is_closed:
            raise ChannelInvalidStateError
        return self._channel

    async def ack(self) -> None:
        await self._channel.basic_ack(self.delivery_tag)

    async def nack(self, requeue: bool = True) -> None:
        await self._channel.basic_nack(self.delivery_tag, requeue=requeue)
