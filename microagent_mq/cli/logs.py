"""Log output for the command line: text for people, or one JSON object per line."""

import logging
import sys
import time
from typing import Any

import orjson

# Fields the library attaches to log records (``extra=``) where a message is concerned.
MESSAGE_FIELDS = ('queue', 'message_id', 'attempt')
LEVELS = ('CRITICAL', 'ERROR', 'WARNING', 'INFO', 'DEBUG')
FORMATS = ('text', 'json')


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and queue/message_id/attempt."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            'time': time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))
                    + f'.{int(record.msecs):03d}Z',
            'level': record.levelname,
            'logger': record.name,
            'message': record.getMessage(),
        }
        for name in MESSAGE_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry['exception'] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level: str, log_format: str) -> None:
    """Configure the root logger for a command-line process; like ``logging.basicConfig``,
    leave one that is configured already (``main()`` called in-process, under pytest) alone."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if log_format == 'json':
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    root.addHandler(handler)
    root.setLevel(level)
