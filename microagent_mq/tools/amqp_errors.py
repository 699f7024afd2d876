"""Which errors of aio-pika / aiormq mean "RabbitMQ is unreachable now, try again".

Most are typed (``AMQPError``, ``ConnectionError``, ``OSError``, timeouts, aiormq's
``ChannelInvalidStateError``). But while a robust connection is down or coming back, aio-pika
and aiormq also raise a bare ``RuntimeError``; those are matched by their exact wording, so a
``RuntimeError`` from a bug (ours or a library's) is raised at once instead of being retried
for the whole ``send_timeout``.
"""

import asyncio
import re

from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

ERRORS = (AMQPError, ChannelInvalidStateError, ConnectionError, OSError, asyncio.TimeoutError)

# The bare RuntimeErrors aio-pika 9-10 and aiormq 6-7 raise for a connection that is down:
_DOWN = re.compile('|'.join((
    r'Connection was not opened',  # aio_pika Connection.channel(): no transport (reconnecting)
    r"No active transport for connection.*",  # aio_pika RobustConnection._on_connected()
    r".* connection closed",  # aio_pika RobustConnection.connect() after close
    r'Connect method called but connection .* is reconnecting right now\.',
    r"Can't initialize closed channel",  # aio_pika Channel.open() on a closed channel
    r'<.*> closed',  # aiormq Connection.channel() on a closed connection: '%r closed'
)))


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the connection is down or reconnecting: worth another try."""
    if isinstance(exc, ERRORS):
        return True
    if type(exc) is RuntimeError and exc.args:
        return _DOWN.fullmatch(str(exc.args[0])) is not None
    return False
