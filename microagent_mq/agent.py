"""``MicroAgent`` and the ``@consumer`` / ``@on`` decorators."""

import asyncio
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from .agent_queues import DEFAULT_TIMEOUT_S, QueueGroup, group_specs
from .broker import AbstractQueueBroker
from .consumer import Consumer, Route
from .default_broker import default_broker_or_none
from .engine import ConsumerRunner, handling_runner
from .exceptions import ConfigurationError
from .handling import check_dto_parameter
from .messages import is_message_class, routing_of
from .middleware.base import Middleware
from .options import ConsumerOptions
from .queue import Queue, check_name

HookName = Literal['pre_start', 'post_start', 'pre_stop']
HOOKS: tuple[HookName, ...] = ('pre_start', 'post_start', 'pre_stop')
F = TypeVar('F', bound=Callable[..., Any])


@dataclass(frozen=True)
class ConsumerSpec:
    """What ``@consumer`` recorded on a method.

    ``queue``: the declared queue, or None for a typed consumer whose queue the agent
    declares when it starts (``queue_name``); ``timeout``: None when not given (60 s).
    """

    queue: Queue | None
    timeout: float | None
    dto_class: type | None
    dto_name: str | None
    options: dict[str, Any]
    message_class: type | None = None
    queue_name: str = ''

    @property
    def name(self) -> str:
        """The name of the queue consumed."""
        return self.queue.name if self.queue is not None else self.queue_name


def consumer(source: Queue | type | None = None, timeout: float | None = None,
             dto_class: type | None = None, dto_name: str | None = None, *,
             queue: Queue | str | None = None, **options: Any) -> Callable[[F], F]:
    """Binding for consuming messages from a queue: ``@consumer(queue)`` or ``@consumer(MessageClass)``.

    ``@consumer(queues.mailer, dto_class=Mail)``: dicts from a declared queue (one handler).
    ``@consumer(GenerateInvoice)``: instances of a task class, from its queue.
    ``@consumer(UserRegistered, queue='welcome_emails')``: instances of an event class; the queue
    is bound to the event's exchange and topic (declared at start if absent). Several typed
    handlers of one agent may share a queue: each message goes to the handler of its type.
    ``timeout``: seconds a handler may run (default 60); ``dto_name``: the parameter receiving
    the instance (default ``dto``); ``options``: see ``ConsumerOptions``. Handlers are
    ``async def``, or plain ``def`` run in a worker thread.
    """
    message_class, declared, queue_name = _consumed(source, queue)
    label = message_class.__qualname__ if message_class else queue_name
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)
                                or timeout <= 0):
        raise ConfigurationError(f'@consumer({label}): timeout must be > 0, not {timeout!r}')
    if message_class is not None and dto_class is not None:
        raise ConfigurationError(f'@consumer({label}): the message class is the DTO; drop dto_class')
    if dto_name is not None and dto_class is None and message_class is None:
        raise ConfigurationError(f'@consumer({label}): dto_name needs a dto_class')
    ConsumerOptions.parse(options, timeout or DEFAULT_TIMEOUT_S)  # fail at import time, not at start

    def decorate(handler: F) -> F:
        if not callable(handler) or inspect.isasyncgenfunction(handler) \
                or inspect.isgeneratorfunction(handler):
            raise ConfigurationError(f'@consumer({label}): {handler!r} must be a function '
                                     f'(async def, or def to run in a thread)')
        if dto_class is not None:
            check_dto_parameter(handler, dto_name or 'dto')
        spec = ConsumerSpec(declared, None if timeout is None else float(timeout), dto_class,
                            dto_name, options, message_class, queue_name)
        handler.__consumer__ = spec  # type: ignore[attr-defined]
        return handler

    return decorate


def _consumed(source: object, queue: object) -> tuple[type | None, Queue | None, str]:
    """What ``@consumer`` reads: (message class, declared queue, queue name)."""
    if is_message_class(source):
        assert isinstance(source, type)
        routing = routing_of(source)
        label = source.__qualname__
        name = queue.name if isinstance(queue, Queue) else queue
        if name is not None and not isinstance(name, str):
            raise ConfigurationError(f'@consumer({label}): queue= must be a name or a Queue, not {queue!r}')
        if routing.queue and name not in (None, routing.queue):
            raise ConfigurationError(f'@consumer({label}): the task goes to queue {routing.queue!r}, '
                                     f'not {name!r}')
        if routing.exchange and name is None:
            raise ConfigurationError(f"@consumer({label}): an event needs queue='...' to bind to "
                                     f'exchange {routing.exchange!r}')
        if isinstance(queue, Queue) and queue.is_exchange:
            raise ConfigurationError(f'@consumer({label}) needs a queue, not the exchange {queue.name!r}')
        return source, queue if isinstance(queue, Queue) else None, check_name(name or routing.queue)
    if source is None and queue is not None:
        source = queue
    elif queue is not None:
        raise ConfigurationError(f'@consumer({source!r}): queue= goes with a message class')
    if not isinstance(source, Queue) or source.is_exchange:
        raise ConfigurationError(f'@consumer needs a declared queue or a Message class, not {source!r}')
    return None, source, source.name


def on(event: HookName) -> Callable[[F], F]:
    """Run the decorated async method at a point of the agent's life."""
    if event not in HOOKS:
        raise ConfigurationError(f'unknown hook {event!r}; expected one of {HOOKS}')

    def decorate(method: F) -> F:
        method.__hook__ = event  # type: ignore[attr-defined]
        return method

    return decorate


class MicroAgent:
    """A service: its ``@consumer`` methods read queues through ``broker``.

    ``middlewares``: hooks around each message its consumers handle (after the broker's own).
    """

    _consumer_specs: ClassVar[dict[str, ConsumerSpec]] = {}
    _queue_groups: ClassVar[dict[str, QueueGroup]] = {}
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
        cls._queue_groups = group_specs(cls.__name__, specs.items())
        cls._consumer_specs = specs
        cls._hooks = {event: list(dict.fromkeys(names)) for event, names in hooks.items()}

    def __init__(self, broker: AbstractQueueBroker | None = None,
                 log: logging.Logger | None = None, settings: dict[str, Any] | None = None,
                 middlewares: Sequence[Middleware] = ()) -> None:
        self.broker = broker
        self.middlewares = list(middlewares)
        self.log = log or logging.getLogger(f'microagent_mq.agent.{type(self).__name__}')
        self.settings = settings or {}
        self._consumers: list[Consumer] = []
        self._borrowed_broker = False
        self._closing: asyncio.Task[None] | None = None  # a close after a handler's self-stop

    async def start(self) -> None:
        """Run ``pre_start`` hooks, start every consumer, run ``post_start`` hooks."""
        await self._run_hooks('pre_start')
        if self._consumer_specs and self.broker is None:
            self.broker = default_broker_or_none()
            self._borrowed_broker = True  # the default broker is not this agent's to close
            if self.broker is None:
                raise ConfigurationError(f'{type(self).__name__} has consumers but no broker: pass '
                                         f'broker= or call set_default_broker(broker)')
        try:
            for group in self._queue_groups.values():
                bound = self._consumer(group)
                assert self.broker is not None
                await self.broker.bind_consumer(bound)
                self._consumers.append(bound)
        except BaseException:
            await self._stop_consumers(0)
            raise
        self.log.info('%s started with %d consumer(s)', type(self).__name__, len(self._consumers))
        try:
            await self._run_hooks('post_start')
        except BaseException:
            # start() failed: nobody will stop this agent, so its consumers must not run on.
            await self._stop_consumers(0)
            raise

    def _consumer(self, group: QueueGroup) -> Consumer:
        queue = group.declare()
        (attr, spec), *more = group.specs
        if not more and spec.message_class is None:  # a plain consumer, as it always was
            return Consumer(self, getattr(self, attr), queue, group.timeout, spec.options,
                            spec.dto_class, spec.dto_name)
        routes = [Route(getattr(self, attr), spec.message_class or spec.dto_class, spec.dto_name,
                        ConsumerOptions.parse(spec.options, group.timeout),
                        f'{type(self).__name__}.{attr}') for attr, spec in group.specs]
        return Consumer(self, routes[0].handler, queue, group.timeout, group.options, routes=routes)

    async def stop(self, grace: float | None = None) -> None:
        """Run ``pre_stop`` hooks, stop consuming (running handlers may finish), close."""
        await self._run_hooks('pre_stop')
        stopped = await self._stop_consumers(grace)
        broker = self.broker
        if broker is not None and not self._borrowed_broker:
            runner = handling_runner()
            if runner is not None and any(runner.consumer is c for c in stopped):
                # One of our handlers stopped us: it settles its message after this returns,
                # on the broker's connection. Closed once that runner closed its subscription.
                self._closing = asyncio.create_task(self._close_after(broker, runner))
            elif not broker._bindings and not broker._stopping:  # nobody else uses it
                await broker.close()
        self.log.info('%s stopped', type(self).__name__)

    @staticmethod
    async def _close_after(broker: AbstractQueueBroker, runner: ConsumerRunner) -> None:
        await runner.wait_closed()
        # Only when no other agent still uses it: no binding left, no stop under way (its
        # handlers would lose their connection and their messages be charged an attempt).
        if not broker._bindings and all(r.closed for r in broker._stopping.values()):
            await broker.close()

    async def _stop_consumers(self, grace: float | None) -> list[Consumer]:
        consumers, self._consumers = self._consumers, []
        if self.broker is not None:
            await asyncio.gather(*(self.broker.unbind(c.queue.name, grace) for c in consumers))
        for stopped in consumers:
            stopped.close()
        return consumers

    async def _run_hooks(self, event: HookName) -> None:
        for attr in self._hooks.get(event, ()):
            await getattr(self, attr)()

    def info(self) -> dict[str, Any]:
        """What this agent consumes, and through which broker.

        ``counts``: per queue, messages acknowledged without a handler call since start:
        ``filtered`` (a predicate said no) and ``ignored`` (a type no handler takes).
        """
        return {
            'name': type(self).__name__,
            'broker': self.broker.info() if self.broker is not None else None,
            'consumers': [{**_spec_info(attr, spec), **self._duplicates(spec)}
                          for attr, spec in self._consumer_specs.items()],
            'counts': {c.queue.name: dict(c.counts) for c in self._consumers},
        }

    def _duplicates(self, spec: ConsumerSpec) -> dict[str, int]:
        """``duplicates`` of an ``idempotent=True`` consumer: messages acked unhandled, seen before."""
        if not spec.options.get('idempotent'):
            return {}
        return {'duplicates': sum(c.duplicates for c in self._consumers if c.queue.name == spec.name)}


def _spec_info(attr: str, spec: ConsumerSpec) -> dict[str, Any]:
    info = {'queue': spec.name, 'handler': attr, 'timeout': spec.timeout or DEFAULT_TIMEOUT_S,
            'dto_class': spec.dto_class.__name__ if spec.dto_class else None,
            'options': spec.options}
    if spec.message_class is not None:
        info['message_class'] = spec.message_class.__qualname__
    return info
