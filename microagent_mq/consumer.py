"""``Consumer``: one agent's handler bound to one queue, and how a body becomes its arguments."""

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError, SerializingError
from .options import ConsumerOptions
from .queue import Queue, decode

if TYPE_CHECKING:
    from .agent import MicroAgent
    from .transport import Delivery

Handler = Callable[..., Awaitable[None]]


class PoisonMessage(Exception):
    """The body cannot become the handler's arguments; retrying cannot help."""


@dataclass(eq=False)
class Consumer:
    """A handler of an agent bound to a queue, with its timeout, DTO and options."""

    agent: 'MicroAgent'
    handler: Handler
    queue: Queue
    timeout: float
    options: dict[str, Any]
    dto_class: type | None = None
    dto_name: str | None = None
    config: ConsumerOptions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.queue.is_exchange:
            raise ConfigurationError(f'{self.queue.name!r} is an exchange; consume a queue bound to it')
        if self.dto_class is not None and not self.dto_name:
            self.dto_name = 'dto'
        self.config = ConsumerOptions.parse(self.options, self.timeout)
        # Inspect the signature once, so each message only pays for two set operations.
        self._accepts_any, self._required, self._allowed = _parameters(self.handler)
        self._dto_key = self.dto_name or 'dto'
        self._required.discard(self._dto_key)
        self._allowed.add(self._dto_key)

    @property
    def name(self) -> str:
        """``Agent.method`` for logs."""
        return f'{type(self.agent).__name__}.{getattr(self.handler, "__name__", "handler")}'

    def arguments(self, delivery: 'Delivery') -> dict[str, Any]:
        """The handler's keyword arguments for ``delivery``; raises ``PoisonMessage``."""
        try:
            data = decode(delivery.body)
        except SerializingError as exc:
            raise PoisonMessage(str(exc)) from exc
        if self._required and (missing := self._required - data.keys()):
            raise PoisonMessage(f'message lacks arguments {sorted(missing)} of {self.name}')
        if not self._accepts_any and (extra := data.keys() - self._allowed):
            raise PoisonMessage(f'{self.name} takes no arguments {sorted(extra)}')
        if self.dto_class is None:
            return data
        try:
            dto = self.dto_class(**data)
        except Exception as exc:
            raise PoisonMessage(f'{self.dto_class.__name__} rejected the message: {exc}') from exc
        return {**data, self._dto_key: dto}

    def info(self) -> dict[str, Any]:
        """What this consumer is, for ``MicroAgent.info()``."""
        return {
            'queue': self.queue.name,
            'handler': self.name,
            'timeout': self.timeout,
            'dto_class': self.dto_class.__name__ if self.dto_class else None,
            'dto_name': self.dto_name,
            'options': self.options,
        }


def _parameters(handler: Handler) -> tuple[bool, set[str], set[str]]:
    accepts_any, required, allowed = False, set(), set()
    for param in inspect.signature(handler).parameters.values():
        if param.kind is param.VAR_KEYWORD:
            accepts_any = True
        elif param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            allowed.add(param.name)
            if param.default is param.empty:
                required.add(param.name)
    return accepts_any, required, allowed
