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
    duplicates: int = field(default=0, init=False)  # idempotent=True: messages seen before, skipped

    def __post_init__(self) -> None:
        if self.queue.is_exchange:
            raise ConfigurationError(f'{self.queue.name!r} is an exchange; consume a queue bound to it')
        if self.dto_class is not None and not self.dto_name:
            self.dto_name = 'dto'
        self.config = ConsumerOptions.parse(self.options, self.timeout)
        # Inspect the signature once, so each message only pays for two set operations.
        self._accepts_any, self._required, self._allowed, self._forbidden = _parameters(self.handler)
        # A Queue subclass may define its own data format (the seed's deserialize hook).
        self._decode = decode if type(self.queue).deserialize is Queue.deserialize else self._custom_decode
        self._dto_key = self.dto_name or 'dto'
        if self.dto_class is not None:
            check_dto_parameter(self.handler, self._dto_key, self._accepts_any, self._allowed)
        self._required.discard(self._dto_key)
        self._body_params = frozenset(self._allowed - {self._dto_key})
        self._allowed.add(self._dto_key)

    @property
    def name(self) -> str:
        """``Agent.method`` for logs."""
        return f'{type(self.agent).__name__}.{getattr(self.handler, "__name__", "handler")}'

    def arguments(self, delivery: 'Delivery') -> dict[str, Any]:
        """The handler's keyword arguments for ``delivery``; raises ``PoisonMessage``."""
        try:
            data = self._decode(delivery.body)
        except SerializingError as exc:
            raise PoisonMessage(str(exc)) from exc
        if self._forbidden and not self._forbidden.isdisjoint(data):
            raise PoisonMessage(f'message has keys {sorted(self._forbidden & data.keys())} that '
                                f'{self.name} cannot take as arguments')
        if self._required and (missing := self._required - data.keys()):
            raise PoisonMessage(f'message lacks arguments {sorted(missing)} of {self.name}')
        if self.dto_class is None:
            if not self._accepts_any and (extra := data.keys() - self._allowed):
                raise PoisonMessage(f'{self.name} takes no arguments {sorted(extra)}')
            return data
        # The body builds the DTO; the handler gets it, plus the body fields it names.
        try:
            dto = self.dto_class(**data)
        except Exception as exc:
            raise PoisonMessage(f'{self.dto_class.__name__} rejected the message: {exc}') from exc
        if self._accepts_any:
            return {**data, self._dto_key: dto}
        arguments = {name: data[name] for name in self._body_params if name in data}
        arguments[self._dto_key] = dto
        return arguments

    def _custom_decode(self, body: bytes) -> dict[str, Any]:
        try:
            data = self.queue.deserialize(body)
        except SerializingError:
            raise
        except Exception as exc:
            raise SerializingError(f'{type(self.queue).__name__}.deserialize failed: {exc!r}') from exc
        if not isinstance(data, dict):
            raise SerializingError(f'{type(self.queue).__name__}.deserialize returned '
                                   f'{type(data).__name__}, not a dict')
        return data

    def info(self) -> dict[str, Any]:
        """What this consumer is, for ``MicroAgent.info()``."""
        return {
            'queue': self.queue.name,
            'handler': self.name,
            'timeout': self.timeout,
            'dto_class': self.dto_class.__name__ if self.dto_class else None,
            'dto_name': self.dto_name,
            'options': self.options,
            **({'duplicates': self.duplicates} if self.config.idempotent else {}),
        }


def check_dto_parameter(handler: Callable[..., Any], dto_key: str, accepts_any: bool | None = None,
                        allowed: set[str] | None = None) -> None:
    """A handler given a DTO must have a parameter for it; say so at decoration time."""
    if accepts_any is None or allowed is None:
        accepts_any, _, allowed, _ = _parameters(handler)
    if not accepts_any and dto_key not in allowed:
        name = getattr(handler, '__qualname__', repr(handler))
        raise ConfigurationError(f'{name} takes no parameter {dto_key!r} for its DTO; '
                                 f'add it or set dto_name= to the parameter that takes the DTO')


def _parameters(handler: Callable[..., Any]) -> tuple[bool, set[str], set[str], frozenset[str]]:
    accepts_any, required, allowed, forbidden = False, set(), set(), set()
    for param in inspect.signature(handler).parameters.values():
        if param.kind is param.VAR_KEYWORD:
            accepts_any = True
        elif param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            allowed.add(param.name)
            if param.default is param.empty:
                required.add(param.name)
        elif param.kind is param.POSITIONAL_ONLY:
            forbidden.add(param.name)
    # A bound method's ``self`` is not in its signature, yet a body key 'self' collides
    # with it (TypeError on every attempt): such a body is poison, never retried.
    function = getattr(handler, '__func__', None)
    if function is not None:
        forbidden.update(list(inspect.signature(function).parameters)[:1])
    return accepts_any, required, allowed, frozenset(forbidden)
