"""``VirtualClock``: the time a ``TestBroker`` schedules delays and retries by."""

import math

from ..exceptions import ConfigurationError


class VirtualClock:
    """Seconds that pass only when told to; stands in for ``time.monotonic`` in test queues.

    Only the broker's own schedule (delayed sends, retry backoff, ``Retry(delay=...)``) reads
    it: handler timeouts and the event loop keep real time, and ``time`` is never patched.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(check_seconds(start, 'VirtualClock(start)'))

    def now(self) -> float:
        """The current virtual time, in seconds."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock ``seconds`` forward; return the new time."""
        self._now += check_seconds(seconds, 'advance')
        return self._now

    def move_to(self, when: float) -> None:
        """Move the clock to ``when`` (never backwards: a due message stays due)."""
        if when < self._now:
            raise ConfigurationError(f'the virtual clock cannot go back from {self._now} to {when}')
        self._now = when

    def __repr__(self) -> str:
        return f'VirtualClock(now={self._now})'


def check_seconds(seconds: object, what: str) -> float:
    """``seconds`` if it is a finite number >= 0, else a one-line ``ConfigurationError``."""
    if (isinstance(seconds, bool) or not isinstance(seconds, int | float)
            or not math.isfinite(seconds) or seconds < 0):
        raise ConfigurationError(f'{what}({seconds!r}): seconds must be a finite number >= 0')
    return float(seconds)
