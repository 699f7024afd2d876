"""The error tree: everything the library raises derives from ``QueueException``."""


class QueueException(Exception):
    """Base queue exception."""


class QueueNotFound(QueueException, AttributeError):
    """No queue or exchange is declared under that name."""


class SerializingError(QueueException):
    """A message could not be serialised to, or parsed from, JSON."""


class ConfigurationError(QueueException, ValueError):
    """A declaration, option or DSN is invalid."""


class QueueSourceError(ConfigurationError):
    """A queue declaration source could not be read or parsed."""


class InvalidDSN(ConfigurationError):
    """A data source name is malformed or has an unsupported scheme."""


class BrokerUnavailable(QueueException, ConnectionError):
    """The broker's server could not be reached within the allowed time."""


class QueueFull(QueueException):
    """A send did not fit in a queue declared with ``max_length`` (``overflow='reject'``).

    Nothing of that send was stored (for ``send_many``: none of the batch, where the broker
    can promise it; see docs/queues.md).
    """
