"""``Consumer``: an agent's handlers bound to one queue, and how a delivery reaches one of them.

One handler taking dicts (the plain case) is called by the engine as it always was:
``arguments`` is that route's ``body_arguments`` and ``handler`` the agent's method. Several
typed handlers on one queue, a sync handler, a predicate, an error policy or a ``MessageInfo``
parameter make ``arguments`` choose a route (by the ``mq-type`` header) and ``handler`` the
dispatcher that runs it.
"""

import asyncio
import contextvars
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .control import Reject, Retry
from .exceptions import ConfigurationError
from .handling import PoisonMessage, Route, queue_decoder
from .messages import TYPE_HEADER
from .options import HANDLER_OPTIONS, ConsumerOptions
from .queue import Queue

if TYPE_CHECKING:
    from .agent import MicroAgent
    from .transport import Delivery

__all__ = ['FILTERED', 'Consumer', 'Handler', 'PoisonMessage', 'Route']

Handler = Callable[..., Awaitable[Any]]


class _Filtered:
    def __repr__(self) -> str:
        return 'FILTERED'


# What ``handler`` returns for a message acknowledged without a handler call (a predicate
# said no, or a type ignored as configured): the engine reports it as 'filtered'.
FILTERED = _Filtered()

log = logging.getLogger('microagent_mq.consumer')


@dataclass(eq=False)
class Consumer:
    """Handlers of an agent bound to a queue, with the queue's timeout and options.

    Built with one ``handler`` (and its ``dto_class``), or with ``routes``: one per message
    type, each with its own options; ``options`` are then the queue's delivery options.
    """

    agent: 'MicroAgent'
    handler: Handler
    queue: Queue
    timeout: float
    options: dict[str, Any]
    dto_class: type | None = None
    dto_name: str | None = None
    routes: Sequence[Route] = ()
    config: ConsumerOptions = field(init=False, repr=False)
    duplicates: int = field(default=0, init=False)  # idempotent=True: messages seen before, skipped

    def __post_init__(self) -> None:
        if self.queue.is_exchange:
            raise ConfigurationError(f'{self.queue.name!r} is an exchange; consume a queue bound to it')
        if self.dto_class is not None and not self.dto_name:
            self.dto_name = 'dto'
        self.config = ConsumerOptions.parse(self.options, self.timeout)
        if not self.routes:
            own = {k: v for k, v in self.options.items() if k in HANDLER_OPTIONS}
            self.routes = (Route(self.handler, self.dto_class, self.dto_name,
                                 ConsumerOptions.parse(own, self.timeout), self._method_name(self.handler)),)
        if decoder := queue_decoder(self.queue):
            for route in self.routes:
                route.decode_body = decoder
        self.counts = {'filtered': 0, 'ignored': 0}
        self._name = '+'.join(r.name for r in self.routes)
        self._pool: ThreadPoolExecutor | None = None
        self._held: set[Future[Any]] = set()  # calls abandoned in their threads, still running
        first = self.routes[0]
        self._by_type = {r.type_name: r for r in self.routes if r.typed}
        # Without a type header: the one route of the queue (a foreign producer's JSON).
        self._untyped = first if len(self.routes) == 1 else None
        self._any_type = not first.typed  # a dict handler takes whatever the type says
        if len(self.routes) == 1 and first.plain:
            self.arguments = first.body_arguments  # type: ignore[method-assign]
            self.handler = first.handler
        else:
            self.handler = self._dispatch

    def _method_name(self, handler: Callable[..., Any]) -> str:
        return f'{type(self.agent).__name__}.{getattr(handler, "__name__", "handler")}'

    @property
    def name(self) -> str:
        """``Agent.method`` for logs (``Agent.a+b`` for a queue with several handlers)."""
        return self._name

    def arguments(self, delivery: 'Delivery') -> dict[str, Any]:
        """What the engine passes to ``handler`` for ``delivery``; raises ``PoisonMessage``."""
        route = self._untyped
        if not self._any_type:
            headers = delivery.headers
            type_name = headers.get(TYPE_HEADER) if headers else None
            if type_name is not None:
                route = self._by_type.get(type_name)
            if route is None:
                return {'route': None, 'delivery': delivery, 'kwargs': {},
                        'value': self._unknown(type_name)}
        assert route is not None
        kwargs, value = route.arguments(delivery)
        return {'route': route, 'delivery': delivery, 'kwargs': kwargs, 'value': value}

    def _unknown(self, type_name: object) -> str:
        if type_name is None:
            reason = f'message without a type ({TYPE_HEADER}) on {self.queue.name}, which carries ' \
                     f'{sorted(self._by_type)}'
        else:
            reason = f'no handler of {self.queue.name} takes message type {type_name!r}'
        if self.config.unknown != 'ignore':
            raise PoisonMessage(reason)
        return reason

    async def _dispatch(self, route: Route | None, delivery: 'Delivery', kwargs: dict[str, Any],
                        value: Any) -> _Filtered | None:
        if route is None:  # an unknown type, ignored as configured
            self.counts['ignored'] += 1
            log.info('Message %s ignored: %s', delivery.message_id, value)
            return FILTERED
        config = route.config
        info = None
        if route.info_key:
            info = route.info(delivery, self.queue.name, self.config.max_attempts)
            kwargs[route.info_key] = info
        try:
            if config.predicate is not None and not config.predicate(value):
                self.counts['filtered'] += 1
                return FILTERED
            if route.sync:
                await self._run_in_thread(route.handler, kwargs)
            else:
                await route.handler(**kwargs)
            return None
        except (Retry, Reject):
            raise  # the handler's own word wins
        except Exception as exc:
            if not (config.on_error or config.retry_on or config.reject_on):
                raise
            info = info or route.info(delivery, self.queue.name, self.config.max_attempts)
            verdict = route.judge(exc, info)
            if verdict is None:
                raise
            log.warning('Handler %s failed on message %s: %s', route.name, delivery.message_id,
                        type(verdict).__name__, exc_info=exc)
            raise verdict from exc

    async def _run_in_thread(self, function: Callable[..., Any], kwargs: dict[str, Any]) -> None:
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPoolExecutor(self.config.concurrency,
                                                   thread_name_prefix=f'mq-{self.queue.name}')
        context = contextvars.copy_context()  # the default broker override, among others
        future = pool.submit(functools.partial(context.run, function, **kwargs))
        try:
            result = await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # timed out, or a stop past its grace
            future.cancel()  # not started yet: it never will
            if future.running():
                self._abandon(pool, future)
            raise
        if inspect.isawaitable(result):
            # A plain ``def`` that returned a coroutine (a wrapper not telling what it wraps):
            # it is the handler's real work, done here on the loop, never dropped unawaited.
            await result

    def _abandon(self, pool: ThreadPoolExecutor, future: 'Future[Any]') -> None:
        # A thread cannot be stopped: the engine moved on, the call runs on. Left in the pool,
        # it would hold a thread that the next call then waits for under its own timeout,
        # charged an attempt (or dead-lettered) without its handler ever running. So that pool
        # takes no more calls (its threads end with their calls) and the next call gets a
        # fresh one: a handler's timeout runs only while a thread runs it.
        if self._pool is pool:
            self._pool = None
            pool.shutdown(wait=False)
        self._held = {f for f in self._held if not f.done()} | {future}
        log.warning('A call of %s timed out or was cancelled in its thread, which runs on; '
                    '%d such thread(s) still running', self.name, len(self._held))

    def close(self) -> None:
        """Let the worker threads of sync handlers end (running ones finish on their own)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def info(self) -> dict[str, Any]:
        """What this consumer is, for ``MicroAgent.info()``."""
        return {
            'queue': self.queue.name,
            'handler': self.name,
            'timeout': self.timeout,
            'dto_class': self.dto_class.__name__ if self.dto_class else None,
            'dto_name': self.dto_name,
            'types': sorted(self._by_type),
            'options': self.options,
            **self.counts,
            **({'duplicates': self.duplicates} if self.config.idempotent else {}),
        }
