"""Typed messages: ``Message`` classes routed by class keywords, ``MessageInfo``, publishing.

A task goes to one queue: ``class GenerateInvoice(Message, queue='invoices')``. An event goes
to an exchange with a topic, and every queue bound to it whose patterns match gets a copy:
``class UserRegistered(Message, exchange='events', topic='user.registered')``. The body is the
plain JSON of the fields; the type name (and the topic) travel in headers under reserved names.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from .default_broker import get_default_broker
from .exceptions import ConfigurationError, SerializingError
from .message_codec import codec_of
from .queue import check_name
from .routing import is_valid_topic

RESERVED_PREFIX = 'mq-'  # header names the library writes; producers may not use them
TYPE_HEADER = 'mq-type'
TOPIC_HEADER = 'mq-topic'


@dataclass(frozen=True, slots=True)
class Routing:
    """Where a message class is published: a queue, or an exchange with a topic."""

    queue: str = ''
    exchange: str = ''
    topic: str = ''


class Message:
    """Base of message classes: a ``@dataclass(frozen=True)`` or a pydantic v2 model.

    Class keywords: ``queue=`` (a task) or ``exchange=`` with ``topic=`` (an event), inherited
    by subclasses that declare neither; ``type=`` names the type on the wire (default: the
    class's ``__qualname__``).
    """

    __mq_routing__: ClassVar[Routing | None] = None
    __mq_type__: ClassVar[str] = ''
    # The library's headers of a message of this class, made once: sent as they are when
    # the producer adds none of its own (transports and consumers only read them).
    __mq_headers__: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, *, queue: str | None = None, exchange: str | None = None,
                          topic: str | None = None, type: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__qualname__
        if queue is not None or exchange is not None or topic is not None:
            cls.__mq_routing__ = _routing(name, queue, exchange, topic)
        if type is not None and (not isinstance(type, str) or not type.strip()):
            raise ConfigurationError(f'message class {name}: type must be a non-empty string, not {type!r}')
        # dataclass(slots=True) makes the class again from its namespace: keep its type name.
        cls.__mq_type__ = type or cls.__dict__.get('__mq_type__') or name
        headers: dict[str, Any] = {TYPE_HEADER: cls.__mq_type__}
        if cls.__mq_routing__ is not None and cls.__mq_routing__.topic:
            headers[TOPIC_HEADER] = cls.__mq_routing__.topic
        cls.__mq_headers__ = headers

    async def publish(self, delay: float | None = None, headers: dict[str, Any] | None = None,
                      priority: int | None = None) -> None:
        """Publish this message on the default broker (see ``set_default_broker``)."""
        await get_default_broker().publish(self, delay=delay, headers=headers, priority=priority)


def _routing(name: str, queue: str | None, exchange: str | None, topic: str | None) -> Routing:
    if queue is not None and exchange is not None:
        raise ConfigurationError(f'message class {name}: give queue= (a task) or exchange= (an event), '
                                 f'not both')
    if topic is not None and exchange is None:
        raise ConfigurationError(f'message class {name}: topic= needs exchange=')
    if queue is not None:
        return Routing(queue=check_name(queue, f'queue name of message class {name}:'))
    assert exchange is not None
    check_name(exchange, f'exchange name of message class {name}:')
    if topic is not None and (not isinstance(topic, str) or not topic or not is_valid_topic(topic)):
        raise ConfigurationError(f'message class {name}: invalid topic {topic!r}: dot-separated words '
                                 f'expected')
    return Routing(exchange=exchange, topic=topic or '')


def is_message_class(value: object) -> bool:
    """Whether ``value`` is a subclass of ``Message``."""
    return isinstance(value, type) and issubclass(value, Message)


def routing_of(cls: type) -> Routing:
    """Where instances of ``cls`` go; a clear error for a class declared without a route."""
    routing: Routing | None = getattr(cls, '__mq_routing__', None)
    if routing is None:
        raise ConfigurationError(f'message class {cls.__qualname__} has no route: declare it with '
                                 f"queue='...' or exchange='...', topic='...'")
    return routing


def type_name_of(cls: type) -> str:
    """The type name a message class travels under."""
    return str(cls.__mq_type__)  # type: ignore[attr-defined]


def check_headers(headers: object) -> dict[str, Any]:
    """``headers`` if they are a JSON-able dict with str keys and no reserved name, else raise."""
    if not isinstance(headers, dict):
        raise ConfigurationError(f'headers must be a dict, not {type(headers).__name__}')
    for key in headers:
        if not isinstance(key, str):
            raise ConfigurationError(f'header names must be strings, not {key!r}')
        if key.startswith(RESERVED_PREFIX):
            raise ConfigurationError(f'header {key!r} is reserved: names starting with '
                                     f'{RESERVED_PREFIX!r} belong to microagent_mq')
    try:
        orjson.dumps(headers)
    except TypeError as exc:
        raise SerializingError(f'headers are not JSON-serialisable: {exc}') from exc
    return headers


@dataclass(frozen=True, slots=True)
class Publication:
    """How instances of one message class are published, worked out once per class."""

    target: str  # the queue, or the exchange
    to_exchange: bool
    topic: str
    encode: Callable[[Any], bytes]
    headers: dict[str, Any]  # the library's headers, shared by every message of the class

    def headers_with(self, extra: dict[str, Any] | None) -> dict[str, Any]:
        """The headers a message travels with: the library's, plus the producer's ``extra``."""
        return self.headers if extra is None else {**check_headers(extra), **self.headers}


# Publication of each message class published so far; read directly on the publish path.
publications: dict[type, Publication] = {}


def publication_of(cls: type) -> Publication:
    """The ``Publication`` of message class ``cls``; clear errors for what cannot be published."""
    publication = publications.get(cls)
    if publication is None:
        routing = routing_of(cls)
        publication = publications[cls] = Publication(
            routing.queue or routing.exchange, not routing.queue, routing.topic,
            codec_of(cls).encode, cls.__mq_headers__)  # type: ignore[attr-defined]
    return publication


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """What a handler may know about the message it handles.

    Injected for a handler parameter annotated ``MessageInfo``, whatever its name.
    ``sent_at``: epoch seconds stamped by the sender (0.0 when unknown, e.g. a foreign
    producer); ``headers``: the producer's own headers (the library's reserved ones removed).
    """

    message_id: str
    queue: str
    attempt: int
    max_attempts: int
    type_name: str = ''
    topic: str = ''
    sent_at: float = 0.0
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def redelivered(self) -> bool:
        """True from the second attempt on."""
        return self.attempt > 1


async def publish(message: Message, delay: float | None = None,
                  headers: dict[str, Any] | None = None, priority: int | None = None) -> None:
    """Publish ``message`` on the default broker."""
    await get_default_broker().publish(message, delay=delay, headers=headers, priority=priority)


async def publish_many(messages: Iterable[Message], delay: float | None = None,
                       headers: dict[str, Any] | None = None, priority: int | None = None) -> None:
    """Publish several messages on the default broker, in one go."""
    await get_default_broker().publish_many(messages, delay=delay, headers=headers,
                                            priority=priority)
