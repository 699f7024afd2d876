"""Exceptions a handler raises to steer what happens to its message."""

MAX_RETRY_DELAY_S = 365 * 24 * 3600


class Retry(Exception):
    """Deliver this message again after ``delay`` seconds (the consumer's backoff if None).

    It counts as an attempt: after ``max_attempts`` the message is dead-lettered.
    """

    def __init__(self, delay: float | None = None, reason: str = 'retry requested') -> None:
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, int | float)
                                  or not 0 <= delay <= MAX_RETRY_DELAY_S):
            raise ValueError(f'Retry(delay={delay!r}): seconds from 0 to {MAX_RETRY_DELAY_S} expected')
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


class Reject(Exception):
    """Dead-letter this message now, with ``reason``; retrying cannot help."""

    def __init__(self, reason: str = 'rejected by handler') -> None:
        super().__init__(reason)
        self.reason = reason
