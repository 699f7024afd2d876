"""Consumer options: how many attempts, how fast, how many at once; what to do on an error."""

import inspect
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

from .exceptions import ConfigurationError

# Added to the handler's timeout to get the default visibility timeout: the time a
# fetched message stays reserved for a consumer before another may take it over.
VISIBILITY_MARGIN_S = 10.0
# prefetch='auto' (the default): this many messages ahead of the free handlers at least, and
# up to that many while the handlers get through them within PREFETCH_HOLD_S: fast handlers
# read big batches (fewer round trips), slow ones keep small shares (fair among consumers).
PREFETCH_AUTO = (32, 256)
PREFETCH_HOLD_S = 0.01
# Options of one handler; the others are the queue's (one value for all its handlers).
HANDLER_OPTIONS = frozenset({'predicate', 'retry_on', 'reject_on', 'on_error'})


@dataclass(frozen=True, slots=True)
class ConsumerOptions:
    """Delivery options of one consumer, given as keyword arguments to ``@consumer``.

    ``max_attempts``: handling attempts in total before the message is dead-lettered.
    ``concurrency``: handlers of this consumer running at once.
    ``prefetch``: messages fetched ahead of the free handlers (fewer round trips); ``'auto'``
    (the default): 32, and up to 256 while the handlers get through them within 10 ms.
    ``retry_delay`` / ``retry_delay_max``: first backoff in seconds, doubling up to the cap.
    ``visibility_timeout``: (Redis) seconds the messages of a consumer that stopped renewing
    them (it died) stay hidden before another consumer takes them over; a live consumer
    renews them every third of it, so handlers may run longer. ``None``: 10 s on Redis.
    ``stop_grace``: seconds ``stop()`` waits for running handlers before cancelling them.

    Per handler (see docs/messages.md): ``predicate``: ``fn(dto_or_kwargs) -> bool``, False
    acknowledges the message without calling the handler; ``retry_on``: only these exception
    types are retried (others dead-letter at once); ``reject_on``: these dead-letter at once;
    ``on_error``: ``fn(exc, info)`` returning ``Retry``, ``Reject`` or None (the rules above).
    Per queue: ``unknown``: a message type no handler takes is ``'dead_letter'``-ed or ``'ignore'``-d.
    ``idempotent``: a message id already handled successfully within ``idempotency_window``
    seconds is acknowledged without calling the handler (see docs/outbox.md).
    ``idempotency_store``: where handled ids are kept: a ``redis://`` / ``memory://`` DSN or an
    ``IdempotencyStore`` object; ``None``: the broker's own Redis, or process memory.
    """

    max_attempts: int = 5
    concurrency: int = 1
    prefetch: int | Literal['auto'] = 'auto'
    retry_delay: float = 1.0
    retry_delay_max: float = 300.0
    visibility_timeout: float | None = None
    stop_grace: float = 30.0
    predicate: Callable[[Any], bool] | None = None
    retry_on: tuple[type[BaseException], ...] = ()
    reject_on: tuple[type[BaseException], ...] = ()
    on_error: Callable[[Exception, Any], Any] | None = None
    unknown: Literal['dead_letter', 'ignore'] = 'dead_letter'
    idempotent: bool = False
    idempotency_window: float = 24 * 3600.0
    idempotency_store: Any = None

    @classmethod
    def parse(cls, options: dict[str, Any], timeout: float) -> 'ConsumerOptions':
        """Validate ``options`` (as given to ``@consumer``) against the handler ``timeout``."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(options) - known):
            raise ConfigurationError(f'unknown consumer options {unknown}; known: {sorted(known)}')
        options = dict(options)
        for name in ('retry_on', 'reject_on'):
            if name in options:
                options[name] = _exception_types(name, options[name])
        parsed = cls(**options)
        parsed._check(timeout)
        return parsed

    @property
    def has_handler_options(self) -> bool:
        """Whether a predicate or an error policy applies to each message."""
        return bool(self.predicate or self.retry_on or self.reject_on or self.on_error)

    def _check(self, timeout: float) -> None:
        for name in ('max_attempts', 'concurrency'):
            _require(name, getattr(self, name), int, minimum=1)
        if self.prefetch != 'auto':
            _require('prefetch', self.prefetch, int, minimum=0, also="or 'auto'")
        for name in ('retry_delay', 'retry_delay_max', 'stop_grace'):
            _require(name, getattr(self, name), (int, float), minimum=0)
        if not isinstance(self.idempotent, bool):
            raise ConfigurationError(f'consumer option idempotent={self.idempotent!r}: expected a bool')
        _require('idempotency_window', self.idempotency_window, (int, float), minimum=1)
        store = self.idempotency_store
        if store is not None and not isinstance(store, str) and not callable(getattr(store, 'seen', None)):
            raise ConfigurationError(f'consumer option idempotency_store={store!r}: expected a DSN '
                                     f'or an object with async seen() and record()')
        if self.visibility_timeout is not None:
            _require('visibility_timeout', self.visibility_timeout, (int, float), minimum=0)
            if self.visibility_timeout <= timeout:
                raise ConfigurationError(
                    f'visibility_timeout ({self.visibility_timeout}) must exceed '
                    f'the handler timeout ({timeout})'
                )
        for name in ('predicate', 'on_error'):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise ConfigurationError(f'consumer option {name}={value!r}: expected a callable')
            if inspect.iscoroutinefunction(value):  # its coroutine would be truthy, never awaited
                raise ConfigurationError(f'consumer option {name}={value!r}: expected a plain '
                                         f'function, not async def')
        if self.unknown not in ('dead_letter', 'ignore'):
            raise ConfigurationError(f"consumer option unknown={self.unknown!r}: expected 'dead_letter' "
                                     f"or 'ignore'")

    @property
    def prefetch_range(self) -> tuple[int, int]:
        """Messages fetched ahead of the free handlers: at least, at most (one number unless 'auto')."""
        return PREFETCH_AUTO if self.prefetch == 'auto' else (self.prefetch, self.prefetch)

    def visibility(self, timeout: float) -> float:
        """The visibility timeout in seconds for a handler with this ``timeout``."""
        if self.visibility_timeout is not None:
            return float(self.visibility_timeout)
        return timeout + VISIBILITY_MARGIN_S

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``: exponential, capped."""
        growth: float = 2.0 ** min(attempt - 1, 62)
        return float(min(self.retry_delay * growth, self.retry_delay_max))


def _require(name: str, value: Any, kind: type | tuple[type, ...], minimum: float,
             also: str = '') -> None:
    valid = not isinstance(value, bool) and isinstance(value, kind)
    if not valid or value < minimum:
        raise ConfigurationError(f'consumer option {name}={value!r}: expected a number >= {minimum}'
                                 f'{" " + also if also else ""}')


def _exception_types(name: str, value: Any) -> tuple[type[BaseException], ...]:
    types = value if isinstance(value, tuple | list) else (value,)
    for kind in types:
        if not (isinstance(kind, type) and issubclass(kind, Exception)):
            raise ConfigurationError(f'consumer option {name}: {kind!r} is not an exception class')
    return tuple(types)
