"""Queue declarations: the registry of queues and exchanges, and the JSON codec."""

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from .exceptions import ConfigurationError, QueueException, QueueNotFound, SerializingError
from .routing import is_valid_pattern, topic_matches

__all__ = ['Queue', 'QueueException', 'QueueNotFound', 'SerializingError']

# Identifiers, and names of other systems such as ``bioconnect-id-service``: lower case,
# digits and ``_``, parts joined by ``-`` or ``.``, none empty.
NAME_RE = re.compile(r'^[a-z0-9_]+(?:[.-][a-z0-9_]+)*$')
# Suffixes the transports give to keys and queues of their own (dead letters).
RESERVED_SUFFIXES = ('.dlq',)
# How RabbitMQ keeps a queue (other brokers ignore it); '' leaves it to the broker's default.
DURABILITIES = ('classic', 'quorum')
# What a send to a full queue (``max_length``) does: raise ``QueueFull``, or drop the oldest.
OVERFLOWS = ('reject', 'drop_oldest')
MAX_PRIORITY = 9


def check_name(name: object, what: str = 'queue name') -> str:
    """Return ``name`` if it is a valid queue or exchange name, else raise."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigurationError(f'invalid {what} {name!r}: lower-case letters, digits and _, '
                                 f'parts joined by - or . (like user_created or bioconnect-id-service)')
    if name.endswith(RESERVED_SUFFIXES):
        raise ConfigurationError(f'invalid {what} {name!r}: {RESERVED_SUFFIXES[0]} names dead letters')
    return name


def check_durability(value: object, where: str = '', allow_default: bool = False) -> str:
    """Return ``value`` if it is a known durability (or '' when allowed), else raise."""
    if value in DURABILITIES or (allow_default and value == ''):
        return str(value)
    raise ConfigurationError(f'{where}unknown durability {value!r}: expected '
                             f"{' or '.join(map(repr, DURABILITIES))}")


DURATION_RE = re.compile(r'^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$')
DURATION_UNITS = {'': 1, 's': 1, 'm': 60, 'h': 3600, 'd': 86400}
MAX_RETENTION_S = 366 * 86400


def check_retention(value: object, where: str = '') -> float:
    """Seconds of a retention given as a number or ``'90s'``/``'15m'``/``'12h'``/``'7d'``."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and (match := DURATION_RE.match(value)):
        seconds = float(match[1]) * DURATION_UNITS[match[2]]
    if seconds is None or not 0 <= seconds <= MAX_RETENTION_S or seconds != seconds:
        raise ConfigurationError(f'{where}invalid retention {value!r}: seconds or a duration like '
                                 f"'90s', '15m', '12h', '7d' (at most 366 days) expected")
    return seconds


def check_max_priority(value: object, where: str = '') -> int:
    """``value`` if it is a valid ``max_priority`` (0: none, else 1 to 9), else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise ConfigurationError(f'{where}invalid max_priority {value!r}: an integer from 1 to '
                                 f'{MAX_PRIORITY} expected')
    return value


def check_max_length(value: object, where: str = '') -> int:
    """``value`` if it is a valid ``max_length`` (0: unbounded), else raise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f'{where}invalid max_length {value!r}: a positive number of '
                                 f'messages expected')
    return value


def check_overflow(value: object, where: str = '') -> str:
    """``value`` if it is a known overflow behaviour, else raise."""
    if value not in OVERFLOWS:
        raise ConfigurationError(f'{where}unknown overflow {value!r}: expected '
                                 f"{' or '.join(map(repr, OVERFLOWS))}")
    return str(value)


def identifier(name: str) -> str:
    """The Python identifier form of a queue name: ``bioconnect-id-service`` → ``bioconnect_id_service``."""
    return name.replace('-', '_').replace('.', '_')


@dataclass(frozen=True)
class Queue:
    """Declaration of a queue with a project-wide unique name; registered at creation.

    ``exchange``: the queue also receives a copy of every message sent to that exchange.
    ``topics``: with an exchange, only messages whose topic matches one of these patterns.
    ``durability``: ``'classic'`` or ``'quorum'``, the RabbitMQ queue type (replicated, with a
    delivery count); ``''``: the broker's default. Memory and Redis ignore it.
    ``retention``: keep every message sent to the queue this long (seconds, or ``'90s'``,
    ``'15m'``, ``'12h'``, ``'7d'``), handled or not, for ``broker.replay``/``history``; 0: none.
    ``max_priority``: 1 to 9, sends may carry ``priority=0..max_priority``; 0: no priorities.
    ``max_length``: at most this many messages waiting; a send beyond it raises ``QueueFull``
    (``overflow='reject'``) or drops the oldest waiting message (``'drop_oldest'``); 0: no bound.
    """

    name: str
    exchange: str = ''
    topics: tuple[str, ...] = field(default=())
    durability: str = ''
    retention: float | str = 0.0  # seconds once declared (a duration string is converted)
    max_priority: int = 0
    max_length: int = 0
    overflow: str = 'reject'

    _registry: ClassVar[dict[str, 'Queue']] = {}
    _exchanges: ClassVar[dict[str, tuple['Queue', ...]]] = {}

    def __post_init__(self) -> None:
        check_name(self.name)
        topics = self.topics
        if isinstance(topics, str) or not all(isinstance(t, str) for t in topics):
            raise ConfigurationError(f'queue {self.name!r}: topics must be a list of strings')
        object.__setattr__(self, 'topics', tuple(topics))
        if self.exchange:
            check_name(self.exchange, f'exchange name of queue {self.name!r}:')
        if self.topics and not self.exchange:
            raise ConfigurationError(f'queue {self.name!r}: topics need an exchange')
        for pattern in self.topics:
            if not is_valid_pattern(pattern):
                raise ConfigurationError(f'queue {self.name!r}: invalid topic pattern {pattern!r}')
        if self.name == self.exchange:
            raise ConfigurationError(f'queue {self.name!r} cannot share the name of its exchange')
        check_durability(self.durability, f'queue {self.name!r}: ', allow_default=True)
        where = f'queue {self.name!r}: '
        object.__setattr__(self, 'retention', check_retention(self.retention, where))
        check_max_priority(self.max_priority, where)
        check_max_length(self.max_length, where)
        check_overflow(self.overflow, where)
        if self.overflow == 'drop_oldest' and self.max_priority:
            # Which message is 'oldest' among levels differs by broker (RabbitMQ drops the head,
            # its highest priority): refused rather than different on each.
            raise ConfigurationError(f"{where}overflow 'drop_oldest' cannot be combined with "
                                     f"max_priority: use overflow 'reject'")
        self._register()

    def _register(self) -> None:
        known = self._registry.get(self.name)
        if known is not None:
            if known != self:
                raise QueueException(f'queue {self.name!r} is already declared as {known!r}')
            return
        if self.name in self._exchanges:
            raise QueueException(f'queue {self.name!r}: the name is already used by an exchange')
        if self.exchange and self.exchange in self._registry:
            raise QueueException(f'exchange {self.exchange!r}: the name is already used by a queue')
        self._registry[self.name] = self
        if self.exchange:
            self._exchanges[self.exchange] = (*self._exchanges.get(self.exchange, ()), self)

    def __repr__(self) -> str:
        # Only what differs from the defaults: a plain queue reads as Queue(name='invoices').
        shown = [f'name={self.name!r}']
        for option, spec in self.__dataclass_fields__.items():
            value = getattr(self, option)
            if option != 'name' and not option.startswith('_') and value != spec.default:
                shown.append(f'{option}={value!r}')
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def retention_s(self) -> float:
        """Seconds messages are retained for replay; 0.0: none."""
        return float(self.retention)

    @property
    def is_exchange(self) -> bool:
        """True for the view ``Queue.get(exchange_name)`` returns: sending fans out."""
        return self.name == self.exchange

    @classmethod
    def get(cls, name: str) -> 'Queue':
        """The queue declared under ``name``, or a view of the exchange of that name."""
        queue = cls._registry.get(name)
        if queue is not None:
            return queue
        if name in cls._exchanges:
            view = object.__new__(cls)
            object.__setattr__(view, 'name', name)
            object.__setattr__(view, 'exchange', name)
            object.__setattr__(view, 'topics', ())
            for option in ('durability', 'retention', 'max_priority', 'max_length', 'overflow'):
                object.__setattr__(view, option, cls.__dataclass_fields__[option].default)
            return view
        raise QueueNotFound(f'no queue or exchange named {name!r} is declared')

    @classmethod
    def get_all(cls) -> dict[str, 'Queue']:
        """All registered queues, by name."""
        return dict(cls._registry)

    @classmethod
    def bound_to(cls, exchange: str, topic: str = '') -> list['Queue']:
        """The queues that receive a message sent to ``exchange`` with ``topic``."""
        return [
            q for q in cls._exchanges.get(exchange, ())
            if not q.topics or any(topic_matches(p, topic) for p in q.topics)
        ]

    @classmethod
    def exchanges(cls) -> dict[str, tuple['Queue', ...]]:
        """Every declared exchange with its queues."""
        return dict(cls._exchanges)

    @classmethod
    def reset(cls) -> None:
        """Forget every declaration (for tests)."""
        cls._registry.clear()
        cls._exchanges.clear()

    def serialize(self, data: dict[str, Any]) -> str:
        """Data serializing method."""
        return encode(data).decode()

    def deserialize(self, data: str | bytes) -> dict[str, Any]:
        """Data deserializing method."""
        return decode(data)


def encode(data: dict[str, Any]) -> bytes:
    """A message as JSON bytes; the message must be a dict."""
    if not isinstance(data, dict):
        raise SerializingError(f'a message must be a dict, not {type(data).__name__}')
    try:
        return orjson.dumps(data)
    except TypeError as exc:
        raise SerializingError(f'message is not JSON-serialisable: {exc}') from exc


def decode(data: str | bytes) -> dict[str, Any]:
    """A JSON object parsed into a dict."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise SerializingError(f'body is not valid JSON: {exc}') from exc
    if not isinstance(value, dict):
        raise SerializingError(f'body is a JSON {type(value).__name__}, not an object')
    return value
