"""``MicroAgent`` and the ``@consumer`` / ``@on`` decorators."""

import asyncio
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from .broker import AbstractQueueBroker
from .consumer import Consumer, Handler, check_dto_parameter
from .exceptions import ConfigurationError
from .options import ConsumerOptions
from .queue import Queue

HookName = Literal['pre_start', 'post_start', 'pre_stop']
HOOKS: tuple[HookName, ...] = ('pre_start', 'post_start', 'pre_stop')
F = TypeVar('F', bound=Callable[..., Any])


@dataclass(frozen=True)
class ConsumerSpec:
    """What ``@consumer`` recorded on a method."""

    queue: Queue
    timeout: float
    dto_class: type | None
    dto_name: str | None
    options: dict[str, Any]


def consumer(queue: Queue, timeout: int = 60, dto_class: type | None = None,
             dto_name: str | None = None, **options: Any) -> Callable[[Handler], Handler]:
    """Binding for consuming messages from queue. Only one handler can be bound to one queue.

    ``timeout``: seconds a handler may run; ``dto_class``: built from the message and passed
    as ``dto_name`` (default ``dto``); ``options``: see ``ConsumerOptions``.
    """
    if not isinstance(queue, Queue) or queue.is_exchange:
        raise ConfigurationError(f'@consumer needs a declared queue, not {queue!r}')
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigurationError(f'@consumer({queue.name}): timeout must be > 0, not {timeout!r}')
    if dto_name is not None and dto_class is None:
        raise ConfigurationError(f'@consumer({queue.name}): dto_name needs a dto_class')
    ConsumerOptions.parse(options, timeout)  # fail at import time, not at start

    def decorate(handler: Handler) -> Handler:
        if not inspect.iscoroutinefunction(handler):
            raise ConfigurationError(f'@consumer({queue.name}): {handler!r} must be async def')
        if dto_class is not None:
            check_dto_parameter(handler, dto_name or 'dto')
        spec = ConsumerSpec(queue, float(timeout), dto_class, dto_name, options)
        handler.__consumer__ = spec  # type: ignore[attr-defined]
        return handler

    return decorate


def on(event: HookName) -> Callable[[F], F]:
    """Run the decorated async method at a point of the agent's life."""
    if event not in HOOKS:
        raise ConfigurationError(f'unknown hook {event!r}; expected one of {HOOKS}')

    def decorate(method: F) -> F:
        method.__hook__ = event  # type: ignore[attr-defined]
        return method

    return decorate


class MicroAgent:
    """A service: its ``@consumer`` methods read queues through ``broker``."""

    _consumer_specs: ClassVar[dict[str, ConsumerSpec]] = {}
    _hooks: ClassVar[dict[str, list[str]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        specs: dict[str, ConsumerSpec] = {}
        hooks: dict[str, list[str]] = {event: [] for event in HOOKS}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                if spec := getattr(value, '__consumer__', None):
                    specs[attr] = spec
                if event := getattr(value, '__hook__', None):
                    hooks[event].append(attr)
        queues = [spec.queue.name for spec in specs.values()]
        if duplicates := sorted({q for q in queues if queues.count(q) > 1}):
            raise ConfigurationError(f'{cls.__name__}: one handler per queue; {duplicates} have more')
        cls._consumer_specs = specs
        cls._hooks = {event: list(dict.fromkeys(names)) for event, names in hooks.items()}

    def __init__(self, broker: AbstractQueueBroker | None = None,
                 log: logging.Logger | None = None, settings: dict[str, Any] | None = None) -> None:
        self.broker = broker
        self.log = log or logging.getLogger(f'microagent_mq.agent.{type(self).__name__}')
        self.settings = settings or {}
        self._consumers: list[Consumer] = []

    async def start(self) -> None:
        """Run ``pre_start`` hooks, start every consumer, run ``post_start`` hooks."""
        await self._run_hooks('pre_start')
        if self._consumer_specs and self.broker is None:
            raise ConfigurationError(f'{type(self).__name__} has consumers but no broker')
        try:
            for attr, spec in self._consumer_specs.items():
                bound = Consumer(self, getattr(self, attr), spec.queue, spec.timeout,
                                 spec.options, spec.dto_class, spec.dto_name)
                assert self.broker is not None
                await self.broker.bind_consumer(bound)
                self._consumers.append(bound)
        except BaseException:
            await self._stop_consumers(0)
            raise
        self.log.info('%s started with %d consumer(s)', type(self).__name__, len(self._consumers))
        await self._run_hooks('post_start')

    async def stop(self, grace: float | None = None) -> None:
        """Run ``pre_stop`` hooks, stop consuming (running handlers may finish), close."""
        await self._run_hooks('pre_stop')
        await self._stop_consumers(grace)
        broker = self.broker
        if broker is not None and not broker._bindings:
            await broker.close()
        self.log.info('%s stopped', type(self).__name__)

    async def _stop_consumers(self, grace: float | None) -> None:
        consumers, self._consumers = self._consumers, []
        if self.broker is not None:
            await asyncio.gather(*(self.broker.unbind(c.queue.name, grace) for c in consumers))

    async def _run_hooks(self, event: HookName) -> None:
        for attr in self._hooks.get(event, ()):
            await getattr(self, attr)()

    def info(self) -> dict[str, Any]:
        """What this agent consumes, and through which broker."""
        return {
            'name': type(self).__name__,
            'broker': self.broker.info() if self.broker is not None else None,
            'consumers': [
                {'queue': spec.queue.name, 'handler': attr, 'timeout': spec.timeout,
                 'dto_class': spec.dto_class.__name__ if spec.dto_class else None,
                 'options': spec.options, **self._duplicates(spec)}
                for attr, spec in self._consumer_specs.items()
            ],
        }

    def _duplicates(self, spec: ConsumerSpec) -> dict[str, int]:
        """``duplicates`` of an ``idempotent=True`` consumer: messages acked unhandled, seen before."""
        if not spec.options.get('idempotent'):
            return {}
        return {'duplicates': sum(c.duplicates for c in self._consumers if c.queue is spec.queue)}
