"""``RedisBroker``: crash-safe queues on Redis Streams, one consumer group per queue.

Keys, for queue ``q`` and the default prefix ``mq:``: the stream ``mq:q``, its delayed
messages in the sorted set ``mq:q:delayed`` (score: due time in ms), dead letters in the
stream ``mq:q.dlq``, and short-lived marks ``mq:sent:...`` that make a send retried by
redis-py after a lost reply a no-op. Entry fields: see ``redis_codec``.

Duplicates: a send or settlement retried after a lost reply is not repeated (see
``redis_scripts``). A message is handled twice only when its consumer stopped renewing its
hold for ``visibility_timeout`` (died, or its event loop was blocked that long) after the
handler had started, or when an ack is lost with its connection.
"""

import itertools
import os
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
    from redis.exceptions import NoScriptError, ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("RedisBroker needs redis: pip install 'microagent-mq[redis]'") from exc

from ..broker import AbstractQueueBroker
from ..consumer import Consumer
from ..dsn import check_redis_db, mask_dsn, parse_dsn
from ..exceptions import BrokerUnavailable
from ..transport import DeadLetter, Outgoing, QueueStats, Subscription
from .redis_codec import due_ms, encoded_headers, entry_fields, ts_ms
from .redis_consumer import GROUP, RELEASED_IDLE_MS, RedisSubscription
from .redis_delayed import DelayedMover
from .redis_pool import WaitingPool
from .redis_reader import SharedReader
from .redis_scripts import Scripts

REQUEUE_BATCH = 100
# A consumer's hold on a message it fetched, renewed on a heartbeat while it lives: a crashed
# consumer's messages go to another after this long, however long handlers may take.
DEFAULT_VISIBILITY_S = 10.0
ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(repr=False, eq=False)
class RedisBroker(AbstractQueueBroker):
    """``RedisBroker('redis://[:password@]host[:port]/db')``; also ``rediss://``, ``unix://``.

    ``prefix``: prepended to every key, so applications can share a database.
    ``max_connections``: the connection pool's size; one more connection reads for every
    idle consumer at once (``redis_reader``), so a process uses at most this plus one.
    ``connect_timeout`` / ``send_retries``: how long a send may try before it raises
    ``BrokerUnavailable`` (redis-py's own retry with exponential backoff and jitter; every
    write is idempotent, so a retry after a lost reply stores nothing twice).

    A consumer's ``visibility_timeout`` is, on Redis, how long the messages of a consumer
    that stopped renewing them (it died, or its event loop was blocked) stay hidden before
    another consumer takes them over; a live consumer renews its hold every third of it, so
    a handler may run longer. Default ``DEFAULT_VISIBILITY_S``.
    """

    prefix: str = 'mq:'
    connect_timeout: float = 2.0
    send_retries: int = 6
    max_connections: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_redis_db(parse_dsn(self.dsn, ('redis', 'rediss', 'unix')), self.dsn)
        self._client: aioredis.Redis | None = None
        self._reader: SharedReader | None = None
        self._delayed = DelayedMover(self)
        # Marks of publishes done (see _sent_mark): this sender's own, counted.
        self._sender = os.urandom(6).hex()
        self._publishes = itertools.count()
        self._mark_block, self._mark_key = -1, ''

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
            # Past max_connections a command waits for a free connection instead of failing
            # (consumers never hold one while idle: see redis_reader).
            pool = WaitingPool.from_url(
                self.dsn, max_connections=self.max_connections, retry=retry,
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
                socket_connect_timeout=self.connect_timeout, socket_keepalive=True,
            )
            self._client = aioredis.Redis.from_pool(pool)
            self._scripts = Scripts(self._client)
        return self._client

    @property
    def _connected(self) -> 'aioredis.Redis | None':
        """The client if connected, never making one (for work that must not reconnect)."""
        return self._client

    @property
    def _lua(self) -> Scripts:
        """The Lua scripts, registered on the client."""
        self.client  # noqa: B018 - connects on first use
        return self._scripts

    def _shared_reader(self) -> SharedReader | None:
        """The one blocking read idle consumers share (None: each reads on its own, as in
        cluster mode, where a read of many streams would cross slots)."""
        if self._reader is None:
            self._reader = SharedReader(self.client, GROUP, self.uid, self.log)
        return self._reader

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
        await self._delayed.stop()
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # sending ----------------------------------------------------------------------------

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        scripts = self._lua
        message = batch[0]
        try:
            if len(batch) == 1 and len(message.queues) == 1 and not message.delay:
                mark, offset = self._sent_mark()
                if message.headers is None:  # the common send
                    await self._eval(scripts.send_one, mark, self.stream_key(message.queues[0]),
                                     offset, message.body, message.message_id,
                                     ts_ms(message.sent_at))
                else:  # one typed message: as cheap, with its headers
                    await self._eval(scripts.send_one_headers, mark,
                                     self.stream_key(message.queues[0]), offset, message.body,
                                     message.message_id, ts_ms(message.sent_at),
                                     encoded_headers(message.headers))
                return
            # One command, all or nothing: a copy for every target queue.
            keys, args = self._publish_args(batch)
            await self._eval(scripts.publish, *keys, *args, keys=len(keys))
            for delayed in batch:  # the mover polls these queues from now on
                if delayed.delay:
                    for queue in delayed.queues:
                        self._delayed.poke(queue)
        except ERRORS as exc:  # as guard() does, without a context manager on the hot path
            raise self._unavailable(exc) from exc

    async def _eval(self, script: Any, *keys_and_args: Any, keys: int = 2) -> Any:
        """EVALSHA straight (cheaper than redis-py's script wrapper on the send path)."""
        try:
            return await self.client.evalsha(script.sha, keys, *keys_and_args)
        except NoScriptError:  # Redis restarted, or another server: load it and run it
            return await script(keys=keys_and_args[:keys], args=keys_and_args[keys:])

    def _sent_mark(self) -> tuple[str, int]:
        """A new mark that a publish ran: one bit per publish, a bitmap per 65,536 of them."""
        number = next(self._publishes)
        block = number >> 16
        if block != self._mark_block:
            self._mark_block = block
            self._mark_key = f'{self.prefix}sent:{self._sender}:{block:x}'
        return self._mark_key, number & 0xFFFF

    def _publish_args(self, batch: Sequence[Outgoing]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the PUBLISH script; each queue's messages keep their order."""
        mark, offset = self._sent_mark()
        first = batch[0]
        if len(first.queues) == 1 and all(m.queues == first.queues and not m.delay
                                           and m.headers is None for m in batch):
            # send_many to one queue: one record, built without a loop in Python
            flat: list[Any] = [None] * (2 * len(batch))
            flat[::2] = [m.body for m in batch]
            flat[1::2] = [m.message_id for m in batch]
            return ([mark, self.stream_key(first.queues[0])],
                    [offset, 'P', 2, len(batch), ts_ms(first.sent_at), *flat])
        keys = [mark]
        index: dict[str, int] = {}
        records: dict[str, list[list[Any]]] = {}

        def key_index(key: str) -> int:
            if key not in index:
                keys.append(key)
                index[key] = len(keys)
            return index[key]

        for message in batch:
            for queue in message.queues:
                own = records.setdefault(queue, [])
                if message.delay or message.headers is not None:
                    fields = entry_fields(message.body, message.message_id, 1, message.sent_at,
                                          message.headers)
                    due = due_ms(message.delay) if message.delay else 0
                    key = self.delayed_key(queue) if due else self.stream_key(queue)
                    own.append(['F', key_index(key), due, len(fields), *fields])
                    continue
                if not own or own[-1][0] != 'P':  # one ts for the batch: sent in one call
                    own.append(['P', key_index(self.stream_key(queue)), 0,
                                ts_ms(message.sent_at)])
                own[-1][2] += 1
                own[-1] += (message.body, message.message_id)
        args: list[Any] = [offset]
        for own in records.values():
            for record in own:
                args += record
        return keys, args

    # consuming --------------------------------------------------------------------------

    async def _subscribe(self, consumer: Consumer) -> Subscription:
        queue = consumer.queue.name
        visibility = consumer.config.visibility_timeout or DEFAULT_VISIBILITY_S
        # A pull session names its own group member (pull.py): closing one must not
        # touch the pending entries of another consumer of this broker.
        subscription = RedisSubscription(self, queue, float(visibility), getattr(consumer, 'member', None))
        async with self.guard():
            await subscription.create_group()
        self._delayed.watch(queue)
        return subscription

    async def _move_some(self, queues: list[str]) -> list[str]:
        """Move up to redis_delayed.MOVE_BATCH due messages of each queue; the queues that may have more."""
        return await self._delayed.move(queues)

    # inspecting ---------------------------------------------------------------------------

    async def _length(self, name: str, **options: Any) -> int:
        # Waiting: not pending for a consumer, or released by one, or delayed and due.
        async with self.guard():
            count: Any = await self._lua.length(
                keys=[self.stream_key(name), self.delayed_key(name)],
                args=[GROUP, int(time.time() * 1000), RELEASED_IDLE_MS], client=self.client)
        return int(count)

    async def _dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        async with self.guard():
            entries: Any = await self.client.xrange(self.dead_key(name), count=limit)
        return [_dead_letter(name, entry_id, fields) for entry_id, fields in entries]

    async def _requeue_dead_letters(self, name: str) -> int:
        """Move the dead letters present now (up to the last one now), not those added later."""
        dead, moved = self.dead_key(name), 0
        async with self.guard():
            newest: Any = await self.client.xrevrange(dead, count=1)
            if not newest:
                return 0
            start: bytes | str = '-'
            while True:
                count, last = await self._lua.requeue(
                    keys=[dead, self.stream_key(name)],
                    args=[start, newest[0][0], REQUEUE_BATCH], client=self.client)
                moved += int(count)
                if int(count) < REQUEUE_BATCH:
                    return moved
                start = b'(' + last

    # operators' primitives (admin commands) -------------------------------------------------

    async def _stats(self, name: str) -> QueueStats:
        async with self.guard(), self.client.pipeline(transaction=True) as pipe:
            pipe.zcard(self.delayed_key(name))
            pipe.xlen(self.dead_key(name))
            delayed, dead = await pipe.execute()
            ready = await self._length(name)  # waiting: never delivered, released, or due
            try:
                stream = self.stream_key(name)
                pending = int((await self.client.xpending(stream, GROUP))['pending'])
                released: Any = await self.client.xpending_range(
                    stream, GROUP, '-', '+', 1 << 31, idle=RELEASED_IDLE_MS // 2)
                in_flight = max(pending - len(released), 0)
            except ResponseError:  # no group yet: nobody ever consumed it
                in_flight = 0
        return QueueStats(name, ready, int(delayed), in_flight, int(dead))

    async def _purge(self, name: str) -> int:
        # What waits: stream entries nobody holds (in flight ones are pending in the group),
        # and the delayed ones. An entry read at this very moment may still be handled.
        stream = self.stream_key(name)
        async with self.guard():
            held: set[bytes] = set()
            try:
                pending: Any = await self.client.xpending_range(stream, GROUP, '-', '+', 1 << 31)
                held = {entry['message_id'] for entry in pending}
            except ResponseError:
                pass  # no group yet: nobody holds anything
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zcard(self.delayed_key(name))
                pipe.delete(self.delayed_key(name))
                delayed, _ = await pipe.execute()
            deleted = int(delayed)
            entries = await self._page(stream, '-')
            while entries:
                waiting = [entry_id for entry_id, _ in entries if entry_id not in held]
                if waiting:
                    deleted += int(await self.client.xdel(stream, *waiting))
                entries = await self._page(stream, '(' + entries[-1][0].decode())
        return deleted

    async def _purge_dead_letters(self, name: str) -> int:
        async with self.guard(), self.client.pipeline(transaction=True) as pipe:
            pipe.xlen(self.dead_key(name))
            pipe.delete(self.dead_key(name))
            count, _ = await pipe.execute()
        return int(count)

    async def _requeue_dead_letters_by_id(self, name: str, ids: frozenset[str]) -> int:
        moved, dead = 0, self.dead_key(name)
        async with self.guard():
            entries = await self._page(dead, '-')
            while entries:
                for entry_id, fields in entries:
                    message_id = fields.get(b'id', b'').decode(errors='replace') or entry_id.decode()
                    if message_id in ids:  # moved by the requeue script: one entry, atomically
                        count, _ = await self._lua.requeue(
                            keys=[dead, self.stream_key(name)], args=[entry_id, entry_id, 1],
                            client=self.client)
                        moved += int(count)
                entries = await self._page(dead, '(' + entries[-1][0].decode())
        return moved

    async def _page(self, stream: str, start: str) -> Any:
        """The next 500 entries of ``stream`` from ``start`` (``(id`` excludes ``id``)."""
        return await self.client.xrange(stream, start, '+', count=500)


def _dead_letter(queue: str, entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    message_id = fields.get(b'id', b'').decode(errors='replace') or entry_id.decode()
    return DeadLetter(queue, message_id, fields.get(b'body', b''),
                      fields.get(b'error', b'').decode(errors='replace'),
                      int(fields.get(b'attempt', 1)), float(fields.get(b'failed_at', 0)))
