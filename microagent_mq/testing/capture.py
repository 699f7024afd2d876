"""Keep the exceptions of failed handlers without touching the engine: from its log records."""

import logging

from .queues import Activity


class HandlerErrorLog(logging.Logger):
    """A logger for a ``TestBroker``: everything goes on to ``target`` as if logged there;
    the exception of each record that carries one is kept for ``process_messages``.

    The engine logs every handler failure it retries or dead-letters with ``exc_info``: the
    one place where the exception object itself is still at hand. Not registered with
    ``logging`` (one per broker would pile up), so it takes its levels from ``target``.
    """

    def __init__(self, target: logging.Logger, activity: Activity) -> None:
        super().__init__(target.name)
        self.parent = target
        self._target = target
        self._activity = activity

    def isEnabledFor(self, level: int) -> bool:
        # Warnings always make a record: the exception must be kept even when not shown.
        return level >= logging.WARNING or self._target.isEnabledFor(level)

    def handle(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, Exception):
            self._activity.errors.append(error)
        if self._target.isEnabledFor(record.levelno):
            self._target.handle(record)
