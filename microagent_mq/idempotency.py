"""Idempotent consumers: remember which message ids were handled, skip them when they come again.

Delivery is at least once (and an outbox relay may publish a row twice), so a consumer that must
not act twice asks, before its handler runs, whether this message id was handled successfully
within its window; the id is recorded only after the handler succeeded, before the ack.
A message whose id the transport made up (``Delivery.synthetic_id``: a foreign producer set
none) is always handled: that id does not say two messages are one.

What remains: a process killed after the handler returned and before the record is written
handles that message again. Two copies of one id handled at the same moment (concurrency > 1,
or two consumers) may both run, since neither is recorded yet.
"""

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from .dsn import REDIS_CLUSTER_SCHEMES, cluster_startup, parse_dsn
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .consumer import Consumer
    from .transport import Delivery

# A store that does not answer within this long counts as unavailable: a hung store must not
# hold a message (and its consumer's slot) forever; handling is the at-least-once answer.
STORE_TIMEOUT_S = 5.0


@runtime_checkable
class IdempotencyStore(Protocol):
    """Where handled message ids live; ``record`` keeps one for ``window_s`` seconds."""

    async def seen(self, queue: str, message_id: str) -> bool: ...

    async def record(self, queue: str, message_id: str, window_s: float) -> None: ...

    async def close(self) -> None: ...


class MemoryIdempotencyStore:
    """Handled ids in this process (stores of one name share them): memory brokers, tests."""

    _shared: ClassVar[dict[str, dict[tuple[str, str], float]]] = {}

    def __init__(self, name: str = 'default') -> None:
        self._expiry = self._shared.setdefault(name, {})

    async def seen(self, queue: str, message_id: str) -> bool:
        expires = self._expiry.get((queue, message_id))
        return expires is not None and expires > time.monotonic()

    async def record(self, queue: str, message_id: str, window_s: float) -> None:
        now = time.monotonic()
        if len(self._expiry) > 10_000:  # forget the expired now and then, not on every record
            for key in [k for k, t in self._expiry.items() if t <= now]:
                del self._expiry[key]
        self._expiry[(queue, message_id)] = now + window_s

    async def close(self) -> None:
        return None


class RedisIdempotencyStore:
    """A key per handled id, ``<prefix><queue>:<message id>``, expiring after the window."""

    def __init__(self, dsn: str, prefix: str = 'mq:done:') -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise ConfigurationError("a Redis idempotency store needs redis: "
                                     "pip install 'microagent-mq[redis]'") from exc
        parts = parse_dsn(dsn, ('redis', 'rediss', 'unix', *REDIS_CLUSTER_SCHEMES))
        if parts.scheme in REDIS_CLUSTER_SCHEMES:  # one key a command: any slot will do
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            first, others = cluster_startup(parts, dsn)
            self._client: Any = RedisCluster.from_url(
                first, startup_nodes=[ClusterNode(host, port) for host, port in others])
        else:
            self._client = aioredis.Redis.from_url(dsn)
        self.prefix = prefix

    def key(self, queue: str, message_id: str) -> str:
        return f'{self.prefix}{queue}:{message_id}'

    async def seen(self, queue: str, message_id: str) -> bool:
        return bool(await self._client.exists(self.key(queue, message_id)))

    async def record(self, queue: str, message_id: str, window_s: float) -> None:
        await self._client.set(self.key(queue, message_id), b'1', px=max(int(window_s * 1000), 1))

    async def close(self) -> None:
        await self._client.aclose()


def store_for(option: object, broker: object) -> tuple[IdempotencyStore, bool]:
    """The store an ``idempotency_store`` option names, and whether we own (must close) it."""
    if option is None:
        dsn = str(getattr(broker, 'dsn', 'memory://default'))
        scheme = dsn.partition('://')[0]
        if getattr(broker, 'cluster', False) and scheme in ('redis', 'rediss'):  # cluster=True
            scheme += '+cluster'
            dsn = scheme + dsn[dsn.index('://'):]
        if scheme in ('redis', 'rediss', 'unix', *REDIS_CLUSTER_SCHEMES):  # the broker's own Redis
            return RedisIdempotencyStore(dsn, f'{getattr(broker, "prefix", "mq:")}done:'), True
        if scheme == 'memory':
            return MemoryIdempotencyStore(dsn), True
        raise ConfigurationError(f'idempotent=True on a {scheme} broker needs idempotency_store= '
                                 f'(a redis:// DSN, or an outbox SQLIdempotencyStore)')
    if isinstance(option, str):
        scheme = parse_dsn(option, ('redis', 'rediss', 'unix', 'memory', *REDIS_CLUSTER_SCHEMES)).scheme
        if scheme == 'memory':
            return MemoryIdempotencyStore(option), True
        return RedisIdempotencyStore(option), True
    if isinstance(option, IdempotencyStore):
        return option, False
    raise ConfigurationError(f'idempotency_store={option!r} has no async seen/record/close')


class Idempotency:
    """What the engine calls for an ``idempotent=True`` consumer, before and after the handler."""

    def __init__(self, consumer: 'Consumer', broker: object, log: logging.Logger) -> None:
        self._consumer = consumer
        self._queue = consumer.queue.name
        self._window = float(consumer.config.idempotency_window)
        self._store, self._owned = store_for(consumer.config.idempotency_store, broker)
        self.log = log

    async def seen(self, delivery: 'Delivery') -> bool:
        """True when this id was handled already: count it, the engine acks without handling."""
        if not delivery.message_id or delivery.synthetic_id:
            # A foreign message without an id cannot be recognised: an id the transport made
            # up (a hash of the body, a stream sequence) is shared by equal messages or not
            # kept across copies, so it would skip a message nobody handled.
            return False
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                seen = await self._store.seen(self._queue, delivery.message_id)
        except Exception:
            # Handling it is the at-least-once answer; skipping could lose it.
            self.log.warning('Idempotency store unavailable; handling %s of %s without the check',
                             delivery.message_id, self._queue, exc_info=True)
            return False
        if seen:
            self._consumer.duplicates += 1
            self.log.info('Message %s of %s was handled already: acknowledged, not handled again',
                          delivery.message_id, self._queue)
        return seen

    async def record(self, delivery: 'Delivery') -> None:
        """The handler succeeded: remember the id for the window (before the ack)."""
        if not delivery.message_id or delivery.synthetic_id:
            return
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await self._store.record(self._queue, delivery.message_id, self._window)
        except Exception:
            self.log.warning('Could not record %s of %s as handled; a redelivery would run again',
                             delivery.message_id, self._queue, exc_info=True)

    async def close(self) -> None:
        if self._owned:
            try:
                await self._store.close()
            except Exception:
                self.log.warning('Closing the idempotency store of %s failed', self._queue,
                                 exc_info=True)
