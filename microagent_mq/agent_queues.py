"""An agent's handlers grouped by queue: one queue, one ``Consumer``, however many message types.

Handlers share a queue only when each takes a ``Message`` class (dispatched by type); their
queue options (``max_attempts``, ``concurrency``...) and timeouts must then agree. A typed
queue is declared when the agent starts, bound to the exchange and topics of its events,
unless it is declared already (queues.json), in which case it must receive those events.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError, QueueNotFound
from .messages import routing_of, type_name_of
from .options import HANDLER_OPTIONS
from .queue import Queue
from .routing import topic_matches

if TYPE_CHECKING:
    from .agent import ConsumerSpec

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class QueueGroup:
    """The handlers (attribute name, spec) of one agent on one queue."""

    name: str
    specs: tuple[tuple[str, 'ConsumerSpec'], ...]
    timeout: float
    options: dict[str, Any]  # the queue's options, merged from every handler

    def declare(self) -> Queue:
        """The queue to consume, declared now if it is not yet."""
        given = [spec.queue for _, spec in self.specs if spec.queue is not None]
        exchanges = {routing_of(s.message_class).exchange for _, s in self.specs if s.message_class}
        exchanges.discard('')
        topics = {routing_of(s.message_class).topic for _, s in self.specs
                  if s.message_class and routing_of(s.message_class).exchange}
        if given:
            queue = given[0]
        else:
            try:
                queue = Queue.get(self.name)
            except QueueNotFound:
                exchange = next(iter(exchanges), '')
                patterns = () if '' in topics else tuple(sorted(topics))
                return Queue(self.name, exchange, patterns)
        self._check_receives(queue)
        return queue

    def _check_receives(self, queue: Queue) -> None:
        for _, spec in self.specs:
            if spec.message_class is None:
                continue
            routing = routing_of(spec.message_class)
            if not routing.exchange:
                continue
            matches = not queue.topics or any(topic_matches(p, routing.topic) for p in queue.topics)
            if queue.exchange != routing.exchange or not matches:
                raise ConfigurationError(
                    f'queue {queue.name!r} (exchange {queue.exchange!r}, topics {list(queue.topics)}) '
                    f'would not receive {spec.message_class.__qualname__} (exchange '
                    f'{routing.exchange!r}, topic {routing.topic!r})')


def group_specs(owner: str, specs: Iterable[tuple[str, 'ConsumerSpec']]) -> dict[str, QueueGroup]:
    """Group handlers by queue, checking that the handlers of one queue can share it."""
    by_queue: dict[str, list[tuple[str, ConsumerSpec]]] = {}
    for attr, spec in specs:
        by_queue.setdefault(spec.name, []).append((attr, spec))
    if plain := sorted(q for q, group in by_queue.items()
                       if len(group) > 1 and any(s.message_class is None for _, s in group)):
        raise ConfigurationError(f'{owner}: one handler per queue; {plain} have more (handlers share '
                                 f'a queue only when each takes a Message class)')
    return {name: _group(owner, name, group) for name, group in by_queue.items()}


def _group(owner: str, name: str, group: list[tuple[str, 'ConsumerSpec']]) -> QueueGroup:
    where = f'{owner}, queue {name!r}'
    types: dict[str, str] = {}
    exchanges = set()
    for attr, spec in group:
        if spec.message_class is None:
            continue
        type_name = type_name_of(spec.message_class)
        if type_name in types:
            raise ConfigurationError(f'{where}: {types[type_name]} and {attr} both take {type_name}')
        types[type_name] = attr
        if exchange := routing_of(spec.message_class).exchange:
            exchanges.add(exchange)
    if len(exchanges) > 1:
        raise ConfigurationError(f'{where}: a queue is bound to one exchange, not {sorted(exchanges)}')
    options: dict[str, Any] = {}
    timeouts = {spec.timeout for _, spec in group if spec.timeout is not None}
    if len(timeouts) > 1:
        raise ConfigurationError(f'{where}: handlers of one queue share one timeout, not {sorted(timeouts)}')
    for _, spec in group:
        for key, value in spec.options.items():
            if key in HANDLER_OPTIONS:
                continue
            if key in options and options[key] != value:
                raise ConfigurationError(f'{where}: handlers of one queue share option {key}; '
                                         f'{options[key]!r} != {value!r}')
            options[key] = value
    return QueueGroup(name, tuple(group), timeouts.pop() if timeouts else DEFAULT_TIMEOUT_S, options)
