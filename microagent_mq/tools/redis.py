"""``RedisBroker``: crash-safe queues on Redis Streams, one consumer group per queue.

Keys, for queue ``q`` and the default prefix ``mq:``: the stream ``mq:q``, its delayed
messages in the sorted set ``mq:q:delayed`` (score: due time in ms), dead letters in the
stream ``mq:q.dlq``. A stream entry carries ``body`` (the user's JSON), ``id`` (message id)
and ``attempt`` (when above 1).
"""

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry as RedisRetry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("RedisBroker needs redis: pip install 'microagent-mq[redis]'") from exc

import orjson

from ..broker import AbstractQueueBroker
from ..consumer import Consumer
from ..dsn import check_redis_db, mask_dsn, parse_dsn
from ..exceptions import BrokerUnavailable
from ..transport import DeadLetter, Outgoing, Subscription
from .redis_consumer import GROUP, RedisSubscription
from .redis_scripts import ADD_MANY, MOVE_DUE

DELAYED_POLL_S = 0.05
ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(repr=False, eq=False)
class RedisBroker(AbstractQueueBroker):
    """``RedisBroker('redis://[:password@]host[:port]/db')``; also ``rediss://``, ``unix://``.

    ``prefix``: prepended to every key, so applications can share a database.
    ``connect_timeout`` / ``send_retries``: how long a send may try before it raises
    ``BrokerUnavailable`` (redis-py's own retry with exponential backoff and jitter).
    """

    prefix: str = 'mq:'
    connect_timeout: float = 2.0
    send_retries: int = 6

    def __post_init__(self) -> None:
        super().__post_init__()
        check_redis_db(parse_dsn(self.dsn, ('redis', 'rediss', 'unix')), self.dsn)
        self._client: aioredis.Redis | None = None
        self._delayed_watch: set[str] = set()
        self._mover: asyncio.Task[None] | None = None
        self._mover_stop = asyncio.Event()

    # keys -------------------------------------------------------------------------------

    def stream_key(self, queue: str) -> str:
        """The stream holding queue ``queue``."""
        return f'{self.prefix}{queue}'

    def delayed_key(self, queue: str) -> str:
        """The sorted set of delayed messages of ``queue``."""
        return f'{self.prefix}{queue}:delayed'

    def dead_key(self, queue: str) -> str:
        """The stream of dead letters of ``queue``."""
        return f'{self.prefix}{queue}.dlq'

    # connection -------------------------------------------------------------------------

    @property
    def client(self) -> 'aioredis.Redis':
        """The shared redis-py client (a connection pool), made on first use."""
        if self._client is None:
            retry = RedisRetry(ExponentialWithJitterBackoff(cap=1.0, base=0.05),
                               self.send_retries)
            self._client = aioredis.Redis.from_url(
                self.dsn, retry=retry, retry_on_error=[RedisConnectionError, RedisTimeoutError],
                socket_connect_timeout=self.connect_timeout, socket_keepalive=True,
            )
            self._move_due = self._client.register_script(MOVE_DUE)
            self._add_many = self._client.register_script(ADD_MANY)
        return self._client

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Turn 'Redis is unreachable' (after redis-py's retries) into ``BrokerUnavailable``."""
        try:
            yield
        except ERRORS as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> BrokerUnavailable:
        return BrokerUnavailable(f'Redis at {mask_dsn(self.dsn)} is unreachable: {exc}')

    async def _disconnect(self) -> None:
        if self._mover is not None:
            # A flag, not cancel(): redis-py may swallow a cancellation mid-command.
            self._mover_stop.set()
            await asyncio.gather(self._mover, return_exceptions=True)
            self._mover = None
        self._delayed_watch.clear()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # sending ----------------------------------------------------------------------------

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        client = self.client
        try:
            if len(batch) == 1 and len(batch[0].queues) == 1 and not batch[0].delay:
                message = batch[0]
                await client.xadd(self.stream_key(message.queues[0]),
                                  {'body': message.body, 'id': message.message_id})
                return
            # One round trip, all or nothing: a copy for every target queue.
            pipe = client.pipeline(transaction=True)
            now: dict[str, list[bytes | str]] = {}
            for message in batch:
                for queue in message.queues:
                    if message.delay:
                        self._stage(pipe, queue, message.body, message.message_id, 1,
                                    message.delay)
                    else:
                        now.setdefault(queue, []).extend((message.body, message.message_id))
            for queue, pairs in now.items():
                await self._add_many(keys=[self.stream_key(queue)], args=pairs, client=pipe)
            await pipe.execute()
        except ERRORS as exc:  # as guard() does, without a context manager on the hot path
            raise self._unavailable(exc) from exc

    def _stage(self, pipe: Any, queue: str, body: bytes, message_id: str, attempt: int,
               delay: float, error: str = '') -> None:
        """Queue on ``pipe`` the command that stores a message, now or after ``delay``."""
        if delay > 0:
            member = orjson.dumps(['body', body.decode(), 'id', message_id,
                                   'attempt', str(attempt), 'error', error])
            due_ms = int((time.time() + delay) * 1000)
            pipe.zadd(self.delayed_key(queue), {member: due_ms})
        else:
            fields: dict[str, Any] = {'body': body, 'id': message_id}
            if attempt > 1:
                fields['attempt'] = attempt
            pipe.xadd(self.stream_key(queue), fields)

    # consuming --------------------------------------------------------------------------

    async def _subscribe(self, consumer: Consumer) -> Subscription:
        queue = consumer.queue.name
        visibility = consumer.config.visibility(consumer.timeout)
        # A pull session names its own group member (pull.py): closing one must not
        # delete the pending entries of another consumer of this broker.
        subscription = RedisSubscription(self, queue, visibility, getattr(consumer, 'member', None))
        async with self.guard():
            await subscription.create_group()
        self._delayed_watch.add(queue)
        if self._mover is None or self._mover.done():
            self._mover_stop = asyncio.Event()
            self._mover = asyncio.create_task(self._move_delayed(), name='redis-delayed-mover')
        return subscription

    async def _move_delayed(self) -> None:
        """Move due delayed messages into their streams, atomically (a Lua script)."""
        failing = False
        while not self._mover_stop.is_set():
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    now_ms = int(time.time() * 1000)
                    for queue in self._delayed_watch:
                        await self._move_due(keys=[self.delayed_key(queue), self.stream_key(queue)],
                                             args=[now_ms, 100], client=pipe)
                    await pipe.execute()
                if failing:
                    self.log.warning('Moving delayed messages works again')
                    failing = False
            except Exception as exc:
                if not failing:
                    self.log.warning('Moving delayed messages failed: %r; will retry', exc)
                    failing = True
            try:
                async with asyncio.timeout(1.0 if failing else DELAYED_POLL_S):
                    await self._mover_stop.wait()
            except TimeoutError:
                pass

    # inspecting ---------------------------------------------------------------------------

    async def _length(self, name: str, **options: Any) -> int:
        stream = self.stream_key(name)
        async with self.guard(), self.client.pipeline(transaction=False) as pipe:
            pipe.xlen(stream)
            pipe.xpending(stream, GROUP)
            length, pending = await pipe.execute(raise_on_error=False)
        if isinstance(length, Exception):
            raise length
        in_flight = 0 if isinstance(pending, Exception) else int(pending['pending'])
        return int(length) - in_flight

    async def _dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        async with self.guard():
            entries: Any = await self.client.xrange(self.dead_key(name), count=limit)
        return [_dead_letter(name, fields) for _, fields in entries]

    async def _requeue_dead_letters(self, name: str) -> int:
        moved = 0
        async with self.guard():
            while True:
                entries: Any = await self.client.xrange(self.dead_key(name), count=100)
                if not entries:
                    break
                pipe = self.client.pipeline(transaction=True)
                for _, fields in entries:
                    self._stage(pipe, name, fields[b'body'], fields[b'id'].decode(), 1, 0)
                pipe.xdel(self.dead_key(name), *[entry_id for entry_id, _ in entries])
                await pipe.execute()
                moved += len(entries)
        return moved


def _dead_letter(queue: str, fields: dict[bytes, bytes]) -> DeadLetter:
    return DeadLetter(queue, fields[b'id'].decode(), fields[b'body'],
                      fields.get(b'error', b'').decode(), int(fields.get(b'attempt', 1)),
                      float(fields.get(b'failed_at', 0)))
