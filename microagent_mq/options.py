"""Consumer options: how many attempts, how fast, how many at once."""

from dataclasses import dataclass, fields
from typing import Any

from .exceptions import ConfigurationError

# Added to the handler's timeout to get the default visibility timeout: the time a
# fetched message stays reserved for a consumer before another may take it over.
VISIBILITY_MARGIN_S = 10.0


@dataclass(frozen=True, slots=True)
class ConsumerOptions:
    """Delivery options of one consumer, given as keyword arguments to ``@consumer``.

    ``max_attempts``: handling attempts in total before the message is dead-lettered.
    ``concurrency``: handlers of this consumer running at once.
    ``prefetch``: messages fetched ahead of the free handlers (fewer round trips).
    ``retry_delay`` / ``retry_delay_max``: first backoff in seconds, doubling up to the cap.
    ``visibility_timeout``: (Redis) seconds the messages of a consumer that stopped renewing
    them (it died) stay hidden before another consumer takes them over; a live consumer
    renews them every third of it, so handlers may run longer. ``None``: 10 s on Redis.
    ``stop_grace``: seconds ``stop()`` waits for running handlers before cancelling them.
    """

    max_attempts: int = 5
    concurrency: int = 1
    prefetch: int = 32
    retry_delay: float = 1.0
    retry_delay_max: float = 300.0
    visibility_timeout: float | None = None
    stop_grace: float = 30.0

    @classmethod
    def parse(cls, options: dict[str, Any], timeout: float) -> 'ConsumerOptions':
        """Validate ``options`` (as given to ``@consumer``) against the handler ``timeout``."""
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(options) - known):
            raise ConfigurationError(f'unknown consumer options {unknown}; known: {sorted(known)}')
        parsed = cls(**options)
        parsed._check(timeout)
        return parsed

    def _check(self, timeout: float) -> None:
        for name in ('max_attempts', 'concurrency'):
            _require(name, getattr(self, name), int, minimum=1)
        _require('prefetch', self.prefetch, int, minimum=0)
        for name in ('retry_delay', 'retry_delay_max', 'stop_grace'):
            _require(name, getattr(self, name), (int, float), minimum=0)
        if self.visibility_timeout is not None:
            _require('visibility_timeout', self.visibility_timeout, (int, float), minimum=0)
            if self.visibility_timeout <= timeout:
                raise ConfigurationError(
                    f'visibility_timeout ({self.visibility_timeout}) must exceed '
                    f'the handler timeout ({timeout})'
                )

    def visibility(self, timeout: float) -> float:
        """The visibility timeout in seconds for a handler with this ``timeout``."""
        if self.visibility_timeout is not None:
            return float(self.visibility_timeout)
        return timeout + VISIBILITY_MARGIN_S

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt + 1``: exponential, capped."""
        growth: float = 2.0 ** min(attempt - 1, 62)
        return float(min(self.retry_delay * growth, self.retry_delay_max))


def _require(name: str, value: Any, kind: type | tuple[type, ...], minimum: float) -> None:
    valid = not isinstance(value, bool) and isinstance(value, kind)
    if not valid or value < minimum:
        raise ConfigurationError(f'consumer option {name}={value!r}: expected a number >= {minimum}')
