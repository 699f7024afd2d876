"""``Route``: one handler of a consumer — what it takes, how it is called, what its errors mean.

A route is made once per handler: its signature is inspected then, so a message pays for a
few set operations. A *plain* route (an ``async def`` taking the body's keys, maybe a
``dto_class``, no predicate nor error policy, no ``MessageInfo``) is called by the engine
directly, exactly as before typed messages existed; every other route goes through ``call``.
"""

import inspect
import logging
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .control import Reject, Retry
from .exceptions import ConfigurationError, SerializingError
from .message_codec import codec_of
from .messages import RESERVED_PREFIX, TOPIC_HEADER, TYPE_HEADER, MessageInfo, is_message_class, type_name_of
from .options import ConsumerOptions
from .queue import decode

if TYPE_CHECKING:
    from .transport import Delivery

log = logging.getLogger('microagent_mq.consumer')


class PoisonMessage(Exception):
    """The body cannot become the handler's arguments; retrying cannot help."""


class Route:
    """One handler: its method, the class its message becomes, its per-handler options."""

    def __init__(self, handler: Callable[..., Any], message_class: type | None, dto_name: str | None,
                 config: ConsumerOptions, name: str) -> None:
        self.handler = handler
        self.name = name
        self.config = config
        self.typed = is_message_class(message_class)
        self.message_class = message_class
        self.type_name = type_name_of(message_class) if self.typed and message_class else ''
        self.dto_key = (dto_name or 'dto') if message_class is not None else ''
        self.sync = not is_async_callable(handler)
        if inspect.isasyncgenfunction(handler) or inspect.isgeneratorfunction(handler):
            raise ConfigurationError(f'{name}: a consumer must be a function, not a generator')
        signature = inspect.signature(handler)
        self.info_key = _info_parameter(handler, signature)
        self.accepts_any, self.required, self.allowed, self.reserved = _parameters(signature)
        self.self_key = _bound_parameter(handler)  # None for a plain function
        takes_dto = self.accepts_any or self.dto_key in self.allowed
        if self.dto_key:
            self.required.discard(self.dto_key)
            self.allowed.add(self.dto_key)
        if self.info_key:
            self.required.discard(self.info_key)
            self.allowed.discard(self.info_key)
            self.reserved.add(self.info_key)
        if self.typed:
            self._check_typed_signature(takes_dto)
            self._decode = codec_of(message_class).decode  # type: ignore[arg-type]
        elif message_class is not None and not takes_dto:
            raise ConfigurationError(f'{name} takes no parameter {self.dto_key!r} for its DTO; '
                                     f'add it or set dto_name= to the parameter that takes the DTO')
        self.body_params = frozenset(self.allowed - {self.dto_key})
        self.decode_body: Callable[[bytes], dict[str, Any]] = decode  # a Queue's own format may replace it
        self.plain = not (self.typed or self.sync or self.info_key or config.has_handler_options)

    def _check_typed_signature(self, takes_dto: bool) -> None:
        if not takes_dto:
            raise ConfigurationError(f'{self.name} takes no parameter {self.dto_key!r} for its '
                                     f'{self.type_name} message (set dto_name=)')
        if self.required:
            raise ConfigurationError(f'{self.name}: a typed message cannot fill parameters '
                                     f'{sorted(self.required)}')

    # arguments ---------------------------------------------------------------------------

    def body_arguments(self, delivery: 'Delivery') -> dict[str, Any]:
        """The keyword arguments for a dict (or ``dto_class``) handler; raises ``PoisonMessage``."""
        try:
            data = self.decode_body(delivery.body)
        except SerializingError as exc:
            raise PoisonMessage(str(exc)) from exc
        if self.required and (missing := self.required - data.keys()):
            raise PoisonMessage(f'message lacks arguments {sorted(missing)} of {self.name}')
        if self.accepts_any:
            # A key naming a parameter the body cannot fill (``self``) would fail every attempt.
            # One dict lookup for ``self``; the rare others (positional-only) only when there are.
            if self.self_key in data or (self.reserved and not self.reserved.isdisjoint(data)):
                taken = sorted((self.reserved | {self.self_key or ''}) & data.keys())
                raise PoisonMessage(f'message has keys {taken} that {self.name} cannot take')
        elif self.message_class is None and (extra := data.keys() - self.allowed):
            raise PoisonMessage(f'{self.name} takes no arguments {sorted(extra)}')
        dto_class = self.message_class
        if dto_class is None:
            return data
        # The body builds the DTO; the handler gets it, plus the body fields it names.
        try:
            dto = dto_class(**data)
        except Exception as exc:
            raise PoisonMessage(f'{dto_class.__name__} rejected the message: {exc}') from exc
        if self.accepts_any:
            return {**data, self.dto_key: dto}
        arguments = {key: data[key] for key in self.body_params if key in data}
        arguments[self.dto_key] = dto
        return arguments

    def arguments(self, delivery: 'Delivery') -> tuple[dict[str, Any], Any]:
        """The handler's keyword arguments and what its predicate sees; raises ``PoisonMessage``."""
        if not self.typed:
            kwargs = self.body_arguments(delivery)
            return kwargs, kwargs[self.dto_key] if self.dto_key else kwargs
        try:
            value = self._decode(delivery.body)
        except Exception as exc:  # not JSON, or the class (dataclass, pydantic) refused it
            raise PoisonMessage(f'{self.type_name} rejected the message: {exc}') from exc
        return {self.dto_key: value}, value

    def info(self, delivery: 'Delivery', queue: str, max_attempts: int) -> MessageInfo:
        """What the handler may know about ``delivery``."""
        headers = delivery.headers or {}
        return MessageInfo(
            message_id=delivery.message_id, queue=queue, attempt=delivery.attempt,
            max_attempts=max_attempts, type_name=headers.get(TYPE_HEADER) or self.type_name,
            topic=headers.get(TOPIC_HEADER, ''), sent_at=delivery.sent_at,
            headers={k: v for k, v in headers.items() if not k.startswith(RESERVED_PREFIX)})

    # outcome -----------------------------------------------------------------------------

    def judge(self, exc: Exception, info: MessageInfo) -> Retry | Reject | None:
        """The error policy's verdict on ``exc``: retry, dead-letter, or None (the default)."""
        config = self.config
        if config.on_error is not None:
            verdict = config.on_error(exc, info)
            if isinstance(verdict, Retry | Reject):
                return verdict
            if verdict is not None:
                log.error('on_error of %s returned %r, not Retry, Reject or None; ignored',
                          self.name, verdict)
        if config.reject_on and isinstance(exc, config.reject_on):
            return Reject(f'{type(exc).__name__}: {exc} (reject_on)')
        if config.retry_on and not isinstance(exc, config.retry_on):
            return Reject(f'{type(exc).__name__}: {exc} (not in retry_on)')
        return None


def is_async_callable(handler: Callable[..., Any]) -> bool:
    """Whether calling ``handler`` gives a coroutine to await on the loop.

    An ``async def``; one under decorators written as plain ``def`` that keep ``__wrapped__``
    (``functools.wraps``): they return the coroutine of what they wrap, which a thread would
    drop unawaited; an object whose ``__call__`` is ``async def``.
    """
    if inspect.iscoroutinefunction(handler):
        return True
    try:
        target = inspect.unwrap(handler)
    except ValueError:  # a __wrapped__ cycle: take it as it is
        target = handler
    if inspect.iscoroutinefunction(target):
        return True
    if inspect.isroutine(target) or isinstance(target, type):
        return False
    return callable(target) and inspect.iscoroutinefunction(type(target).__call__)


def _info_parameter(handler: Callable[..., Any], signature: inspect.Signature) -> str:
    try:
        hints = typing.get_type_hints(handler)
    except Exception:  # an annotation that does not resolve here: read them as written
        hints = {name: p.annotation for name, p in signature.parameters.items()}
    for name, hint in hints.items():
        if name != 'return' and (hint is MessageInfo or hint == 'MessageInfo'):
            return name
    return ''


def _parameters(signature: inspect.Signature) -> tuple[bool, set[str], set[str], set[str]]:
    accepts_any, required, allowed, reserved = False, set(), set(), set()
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            accepts_any = True
        elif param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            allowed.add(param.name)
            if param.default is param.empty:
                required.add(param.name)
        elif param.kind is param.POSITIONAL_ONLY:
            reserved.add(param.name)
    return accepts_any, required, allowed, reserved


def _bound_parameter(handler: Callable[..., Any]) -> str | None:
    """The parameter a bound method has already filled (``self``): not in its signature."""
    function = getattr(handler, '__func__', None)
    if not inspect.ismethod(handler) or function is None:
        return None
    first = next(iter(inspect.signature(function).parameters.values()), None)
    return first.name if first is not None and first.kind is not first.VAR_POSITIONAL else None


def queue_decoder(queue: Any) -> Callable[[bytes], dict[str, Any]] | None:
    """The decoder of a ``Queue`` subclass that overrides ``deserialize`` (the seed's hook)."""
    from .queue import Queue

    if type(queue).deserialize is Queue.deserialize:
        return None

    def decode_with_queue(body: bytes) -> dict[str, Any]:
        try:
            data = queue.deserialize(body)
        except SerializingError:
            raise
        except Exception as exc:
            raise SerializingError(f'{type(queue).__name__}.deserialize failed: {exc!r}') from exc
        if not isinstance(data, dict):
            raise SerializingError(f'{type(queue).__name__}.deserialize returned '
                                   f'{type(data).__name__}, not a dict')
        return data

    return decode_with_queue


def check_dto_parameter(handler: Callable[..., Any], dto_key: str) -> None:
    """A handler given a ``dto_class`` must have a parameter for the DTO; say so at decoration."""
    accepts_any, _, allowed, _ = _parameters(inspect.signature(handler))
    if not accepts_any and dto_key not in allowed:
        name = getattr(handler, '__qualname__', repr(handler))
        raise ConfigurationError(f'{name} takes no parameter {dto_key!r} for its DTO; '
                                 f'add it or set dto_name= to the parameter that takes the DTO')
