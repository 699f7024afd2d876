"""What a transport supplies to the delivery engine: deliveries and how to settle them."""

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson


class Delivery:
    """A message fetched for a consumer, not yet settled."""

    __slots__ = ('attempt', 'body', 'handle', 'headers', 'message_id', 'priority', 'received_at',
                 'sent_at', 'synthetic_id')

    def __init__(self, body: bytes, message_id: str, attempt: int = 1, handle: Any = None,
                 headers: dict[str, Any] | None = None, sent_at: float = 0.0,
                 synthetic_id: bool = False, priority: int = 0) -> None:
        self.body = body
        self.message_id = message_id
        self.attempt = attempt  # 1 for the first handling
        self.handle = handle  # the transport's own reference (stream id, AMQP message...)
        # Metadata sent with the message (Outgoing.headers), exactly as sent; None when none.
        self.headers = headers
        self.sent_at = sent_at  # epoch seconds set by the sender; 0.0 when unknown (foreign)
        self.received_at = time.monotonic()
        # The transport made ``message_id`` up (a foreign message sent without one): it names
        # this delivery, not what the sender meant, so two equal messages may share it.
        self.synthetic_id = synthetic_id
        # As sent (Outgoing.priority): a retry or a release keeps it.
        self.priority = priority

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
    # Metadata that travels beside the body (never in it): a JSON-able dict with str keys,
    # stored by the transport and handed back as ``Delivery.headers``. None: no metadata.
    headers: dict[str, Any] | None = None
    sent_at: float = 0.0  # epoch seconds; transports store it when set (> 0)
    # 0 to the queue's max_priority (checked by the broker); higher is delivered first.
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Retained:
    """A message kept by a queue declared with ``retention``: what ``broker.history`` lists.

    ``position``: the transport's own place of it in the queue's history (a stream id, an
    offset), for reading on after it.
    """

    queue: str
    message_id: str
    body: bytes
    sent_at: float  # epoch seconds
    headers: dict[str, Any] | None = None
    priority: int = 0
    position: Any = None

    @property
    def data(self) -> Any:
        """The body parsed as JSON, or the raw text when it is not JSON."""
        return parsed_body(self.body)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that was given up on, with why and after how many attempts."""

    queue: str
    message_id: str
    body: bytes
    error: str
    attempts: int
    failed_at: float  # seconds since the epoch
    # The sender's metadata (Delivery.headers) and stamp, handed back when requeued, so a
    # typed message keeps its type. Transports that keep them on the wire may leave these empty.
    headers: dict[str, Any] | None = None
    sent_at: float = 0.0
    priority: int = 0  # kept when requeued; 0 where a transport does not keep it

    @property
    def data(self) -> Any:
        """The body parsed as JSON, or the raw text when it is not JSON."""
        return parsed_body(self.body)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """Counts of one queue, for operators; None where a transport cannot tell.

    ``ready``: waiting to be delivered; ``delayed``: due later (retries, delayed sends);
    ``in_flight``: fetched by a consumer and not settled yet; ``dead``: dead letters.
    """

    queue: str
    ready: int
    delayed: int | None
    in_flight: int | None
    dead: int


class Subscription(ABC):
    """One consumer's connection to its queue. Transports implement the primitives.

    The engine decides every message's fate; a subscription only carries it out.
    """

    # A fetch is a round trip to the server: under a backlog the engine starts the next one
    # while handlers work on the last (one fetch at a time still). Push transports hold
    # their messages already, and the in-process one has none to make.
    reads_ahead = False

    @abstractmethod
    async def fetch(self, max_count: int, wait_s: float | None = None) -> Sequence[Delivery]:
        """Up to ``max_count`` messages; may return none after waiting a while.

        ``wait_s``: wait at most this long for a first message when none is ready (0: do
        not wait); None: the transport's own idle wake-up (up to ten seconds: the engine
        needs none, ``stop_fetching`` wakes a waiting fetch at once). The pull
        layer needs the bound: a fetch cancelled mid-way could strand what it read.
        """

    @abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """The message was handled: remove it for good."""

    @abstractmethod
    async def retry_later(self, delivery: Delivery, delay: float, error: str) -> None:
        """Deliver the message again after ``delay`` seconds, as attempt + 1."""

    @abstractmethod
    async def dead_letter(self, delivery: Delivery, error: str) -> None:
        """Move the message to the queue's dead letters with ``error``."""

    async def stop_fetching(self) -> None:
        """No new messages from now on: a fetch waiting now returns soon (with what it got).

        Called by a graceful stop before anything is released, so the broker cannot push
        more into a consumer that is going away. Messages already fetched stay this
        consumer's until handled or released.
        """
        return None

    async def extend(self, delivery: Delivery) -> bool:
        """Renew this consumer's hold on a message that waited; False if it was lost."""
        return True

    @abstractmethod
    async def release(self, deliveries: Sequence[Delivery]) -> None:
        """Give back messages this consumer will not handle, as if never delivered."""

    @abstractmethod
    async def close(self) -> None:
        """Stop consuming."""


def parsed_body(body: bytes) -> Any:
    """A message body parsed as JSON, or its raw text when it is not JSON."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return body.decode(errors='replace')


def now_s() -> float:
    """Wall-clock seconds since the epoch, for timestamps stored with messages."""
    return time.time()
