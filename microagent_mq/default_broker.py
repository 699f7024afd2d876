"""The default broker: what ``Message.publish()`` and agents built without a broker use.

``set_default_broker`` sets it for the whole process; ``override_broker`` swaps it for the
code inside a ``with`` / ``async with`` block, through a context variable, so concurrent tasks
each see their own override (a task copies the context it was created in).
"""

from contextvars import ContextVar
from types import TracebackType
from typing import TYPE_CHECKING

from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .broker import AbstractQueueBroker

_process_default: 'AbstractQueueBroker | None' = None
_override: ContextVar['AbstractQueueBroker | None'] = ContextVar('microagent_mq_broker', default=None)


def set_default_broker(broker: 'AbstractQueueBroker | None') -> None:
    """Make ``broker`` the default for the whole process (None forgets it)."""
    global _process_default
    _process_default = broker


def get_default_broker() -> 'AbstractQueueBroker':
    """The broker in effect here: the innermost ``override_broker``, else the process default."""
    broker = _override.get() or _process_default
    if broker is None:
        raise ConfigurationError('no default broker: call set_default_broker(broker) or use '
                                 'override_broker(broker), or pass broker= explicitly')
    return broker


def default_broker_or_none() -> 'AbstractQueueBroker | None':
    """The broker in effect here, or None when none is set."""
    return _override.get() or _process_default


class override_broker:
    """Use ``broker`` as the default inside the block; nests, and is task-local."""

    def __init__(self, broker: 'AbstractQueueBroker') -> None:
        self.broker = broker
        self._tokens: list[object] = []

    def __enter__(self) -> 'AbstractQueueBroker':
        self._tokens.append(_override.set(self.broker))
        return self.broker

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _override.reset(self._tokens.pop())  # type: ignore[arg-type]

    async def __aenter__(self) -> 'AbstractQueueBroker':
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.__exit__(exc_type, exc, tb)


