"""Exceptions a handler raises to steer what happens to its message."""


class Retry(Exception):
    """Deliver this message again after ``delay`` seconds (the consumer's backoff if None).

    It counts as an attempt: after ``max_attempts`` the message is dead-lettered.
    """

    def __init__(self, delay: float | None = None, reason: str = 'retry requested') -> None:
        super().__init__(reason)
        self.delay = delay
        self.reason = reason


class Reject(Exception):
    """Dead-letter this message now, with ``reason``; retrying cannot help."""

    def __init__(self, reason: str = 'rejected by handler') -> None:
        super().__init__(reason)
        self.reason = reason
