"""What a transport supplies to the delivery engine: deliveries and how to settle them."""

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson


class Delivery:
    """A message fetched for a consumer, not yet settled."""

    __slots__ = ('attempt', 'body', 'handle', 'message_id', 'received_at')

    def __init__(self, body: bytes, message_id: str, attempt: int = 1, handle: Any = None) -> None:
        self.body = body
        self.message_id = message_id
        self.attempt = attempt  # 1 for the first handling
        self.handle = handle  # the transport's own reference (stream id, AMQP message...)
        self.received_at = time.monotonic()

    def __repr__(self) -> str:
        return f'<Delivery {self.message_id} attempt={self.attempt}>'


@dataclass(slots=True)  # not frozen: a frozen __init__ costs a microsecond a message
class Outgoing:
    """A message to publish: to ``queues`` directly, or through ``exchange`` with ``topic``."""

    body: bytes
    message_id: str
    queues: tuple[str, ...]
    exchange: str = ''
    topic: str = ''
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that was given up on, with why and after how many attempts."""

    queue: str
    message_id: str
    body: bytes
    error: str
    attempts: int
    failed_at: float  # seconds since the epoch

    @property
    def data(self) -> Any:
        """The body parsed as JSON, or the raw text when it is not JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return self.body.decode(errors='replace')


class Subscription(ABC):
    """One consumer's connection to its queue. Transports implement the primitives.

    The engine decides every message's fate; a subscription only carries it out.
    """

    @abstractmethod
    async def fetch(self, max_count: int) -> Sequence[Delivery]:
        """Up to ``max_count`` messages; may return none after waiting a while."""

    @abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """The message was handled: remove it for good."""

    @abstractmethod
    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        """Deliver the message again after ``delay`` seconds, as attempt + 1."""

    @abstractmethod
    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Move the message to the queue's dead letters with ``error``."""

    async def extend(self, delivery: Delivery) -> bool:
        """Renew this consumer's hold on a message that waited; False if it was lost."""
        return True

    @abstractmethod
    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give back messages this consumer will not handle, as if never delivered."""

    @abstractmethod
    async def close(self) -> None:
        """Stop consuming."""


def now_s() -> float:
    """Wall-clock seconds since the epoch, for timestamps stored with messages."""
    return time.time()
