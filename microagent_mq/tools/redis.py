"""``RedisBroker``: crash-safe queues on Redis Streams, one consumer group per queue.

Keys, for queue ``q`` and the default prefix ``mq:``: the stream ``mq:q``, its delayed
messages in the sorted set ``mq:q:delayed`` (score: due time in ms), dead letters in the
stream ``mq:q.dlq``, and short-lived marks ``mq:sent:...`` that make a send retried by
redis-py after a lost reply a no-op. Entry fields: see ``redis_codec``. On a Redis Cluster
the queue's name is the hash tag of its keys (``mq:{q}``...; see ``redis_cluster``).

Duplicates: a send or settlement retried after a lost reply is not repeated (see
``redis_scripts``). A message is handled twice only when its consumer stopped renewing its
hold for ``visibility_timeout`` (died, or its event loop was blocked that long) after the
handler had started, or when an ack is lost with its connection.
"""

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any, cast

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry as RedisRetry
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("RedisBroker needs redis: pip install 'microagent-mq[redis]'") from exc

from ..broker import AbstractQueueBroker
from ..consumer import Consumer
from ..dsn import check_redis_db, cluster_nodes, mask_dsn, parse_dsn
from ..exceptions import BrokerUnavailable, ConfigurationError, QueueException
from ..transport import DeadLetter, Outgoing, QueueStats, Retained, Subscription
from . import redis_features as features
from .redis_batcher import ScriptBatcher
from .redis_cluster import (
    CLUSTER_ERRORS,
    REDIS_CLUSTER_SCHEMES,
    check_prefix,
    cluster_client,
    cluster_error,
    tagged,
)
from .redis_codec import due_ms, encoded_headers, entry_fields, ts_ms
from .redis_consumer import GROUP, RELEASED_IDLE_MS, RedisSubscription
from .redis_delayed import MOVE_BATCH, DelayedMover
from .redis_layout import featured_name, layout_named, layout_of
from .redis_level_consumer import LevelSubscription
from .redis_level_scripts import LevelScripts
from .redis_pool import COMMAND_TIMEOUT_S, WaitingPool
from .redis_reader import SharedReader
from .redis_retained import retained
from .redis_scripts import Scripts

REQUEUE_BATCH = 100
# A consumer's hold on a message it fetched, renewed on a heartbeat while it lives: a crashed
# consumer's messages go to another after this long, however long handlers may take.
DEFAULT_VISIBILITY_S = 10.0
ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


@dataclass(repr=False, eq=False)
class RedisBroker(AbstractQueueBroker):
    """``RedisBroker('redis://[:password@]host[:port]/db')``; also ``rediss://``, ``unix://``,
    and ``redis+cluster://host:port[,host:port...]`` (or ``cluster=True``) for a Redis Cluster.

    ``prefix``: prepended to every key, so applications can share a database.
    ``max_connections``: the connection pool's size; one more connection reads for every
    idle consumer at once (``redis_reader``), so a process uses at most this plus one.
    ``connect_timeout`` / ``send_retries``: how long a send may try before it raises
    ``BrokerUnavailable`` (redis-py's own retry with exponential backoff and jitter; every
    write is idempotent, so a retry after a lost reply stores nothing twice).
    ``command_timeout``: how long one command may wait for its reply before its connection
    is taken as dead and the command is sent again on a new one (``redis_pool``; a
    ``socket_timeout`` in the DSN's query applies as well). A cluster's client keeps
    redis-py's own ``socket_timeout`` instead.

    A consumer's ``visibility_timeout`` is, on Redis, how long the messages of a consumer
    that stopped renewing them (it died, or its event loop was blocked) stay hidden before
    another consumer takes them over; a live consumer renews its hold every third of it, so
    a handler may run longer. Default ``DEFAULT_VISIBILITY_S``.
    """

    prefix: str = 'mq:'
    connect_timeout: float = 2.0
    send_retries: int = 6
    cluster: bool = False  # implied by a redis+cluster:// DSN
    max_connections: int = 8
    command_timeout: float = COMMAND_TIMEOUT_S

    def __post_init__(self) -> None:
        super().__post_init__()
        self._parts = parse_dsn(self.dsn, ('redis', 'rediss', 'unix', *REDIS_CLUSTER_SCHEMES))
        self.cluster = self.cluster or self._parts.scheme in REDIS_CLUSTER_SCHEMES
        if self.cluster:
            if self._parts.scheme == 'unix':
                raise ConfigurationError('a Redis Cluster is reached over TCP: use '
                                         'redis+cluster://host:port, not unix://')
            check_prefix(self.prefix)
            cluster_nodes(self._parts, self.dsn)  # a bad DSN fails now, not on first use
        else:
            check_redis_db(self._parts, self.dsn)
        self._client: aioredis.Redis | None = None
        self._reader: SharedReader | None = None
        self._delayed = DelayedMover(self)
        # Marks of publishes done (see _sent_mark): this sender's own, counted.
        self._sender = os.urandom(6).hex()
        self._publishes = itertools.count()
        self._mark_block, self._mark_key = -1, ''
        self._sends = ScriptBatcher(lambda: self.client)

    # keys -------------------------------------------------------------------------------

    # Every other key of a queue derives from its stream key: on a cluster they share its
    # hash tag, so its scripts and transactions stay in one slot.

    def stream_key(self, queue: str) -> str:
        """The stream holding queue ``queue``."""
        return tagged(self.prefix, queue) if self.cluster else f'{self.prefix}{queue}'

    def delayed_key(self, queue: str) -> str:
        """The sorted set of delayed messages of ``queue``."""
        return f'{self.stream_key(queue)}:delayed'

    def dead_key(self, queue: str) -> str:
        """The stream of dead letters of ``queue``."""
        return f'{self.stream_key(queue)}.dlq'

    # connection -------------------------------------------------------------------------

    @property
    def client(self) -> 'aioredis.Redis':
        """The shared redis-py client (a connection pool), made on first use."""
        if self._client is None:
            retry = RedisRetry(ExponentialWithJitterBackoff(cap=1.0, base=0.05),
                               self.send_retries)
            options: dict[str, Any] = dict(
                retry=retry, retry_on_error=[RedisConnectionError, RedisTimeoutError],
                socket_connect_timeout=self.connect_timeout, socket_keepalive=True)
            if self.cluster:
                # Typed as Redis: the commands used here have the same signatures on both.
                # Connections per node unbounded, as on a single Redis (RedisCluster's default
                # is 100): consumers read on their own there (no shared reader, see _shared_reader).
                self._client = cast(aioredis.Redis, cluster_client(
                    self.dsn, self._parts, max_connections=2**31, **options))
            else:
                # Past max_connections a command waits for a free connection instead of
                # failing (consumers never hold one while idle: see redis_reader).
                # No socket_timeout: a timer per command; the pool guards them all with one.
                pool = WaitingPool.from_url(self.dsn, max_connections=self.max_connections,
                                            command_timeout=self.command_timeout,
                                            socket_timeout=None, **options)
                self._client = aioredis.Redis.from_pool(pool)
            self._scripts = Scripts(self._client)
            self._level_scripts = LevelScripts(self._client)
        return self._client

    @property
    def _connected(self) -> 'aioredis.Redis | None':
        """The client if connected, never making one (for work that must not reconnect)."""
        return self._client

    @property
    def _levels(self) -> LevelScripts:
        """The scripts of queues with options, registered on the client."""
        self.client  # noqa: B018 - connects on first use
        return self._level_scripts

    @property
    def _lua(self) -> Scripts:
        """The Lua scripts, registered on the client."""
        self.client  # noqa: B018 - connects on first use
        return self._scripts

    def _shared_reader(self) -> SharedReader | None:
        """The one blocking read idle consumers share (None: each reads on its own, as in
        cluster mode, where a read of many streams would cross slots)."""
        if self.cluster:
            return None
        if self._reader is None:
            self._reader = SharedReader(self.client, GROUP, self.uid, self.log)
        return self._reader

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Turn 'Redis is unreachable' (after redis-py's retries) into ``BrokerUnavailable``."""
        try:
            yield
        except (*ERRORS, *CLUSTER_ERRORS) as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> QueueException:
        if isinstance(exc, CLUSTER_ERRORS):  # a cluster, or a plain DSN at a cluster node
            error = cluster_error(exc, self.dsn, self.cluster)
            if error is None:
                raise exc
            return error
        server = 'Redis Cluster' if self.cluster else 'Redis'
        return BrokerUnavailable(f'{server} at {mask_dsn(self.dsn)} is unreachable: {exc}')

    async def _disconnect(self) -> None:
        await self._delayed.stop()
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()
        await self._sends.close()  # sends already made finish on this client
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # sending ----------------------------------------------------------------------------

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        if self.cluster and len(queues := dict.fromkeys(q for m in batch for q in m.queues)) != 1:
            # One script per queue (one slot each), in turn: a failure leaves the queues
            # before it with their copies, those after it without (docs: "Redis Cluster").
            for queue in queues:
                await self._publish([replace(m, queues=(queue,)) for m in batch if queue in m.queues])
            return
        scripts = self._lua
        message = batch[0]
        try:
            if (len(batch) == 1 and len(message.queues) == 1 and not message.delay
                    and not featured_name(message.queues[0])):
                mark, offset = self._sent_mark(message.queues[0])
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
            if keys:
                await self._eval(scripts.publish, *keys, *args, keys=len(keys))
            else:  # a queue with priorities, retention or a bound: checked, by level
                await self._publish_checked(batch)
            for delayed in batch:  # the mover polls these queues from now on
                if delayed.delay:
                    for queue in delayed.queues:
                        self._delayed.poke(queue)
        except (*ERRORS, *CLUSTER_ERRORS) as exc:  # as guard(), without a context manager
            raise self._unavailable(exc) from exc

    async def _publish_checked(self, batch: Sequence[Outgoing]) -> None:
        keys, args = features.checked_args(self, batch, features.layouts(self, batch))
        try:
            await self._eval(self._levels.publish_checked, *keys, *args, keys=len(keys))
        except ResponseError as exc:
            raise features.queue_full(exc) or exc from None

    async def _eval(self, script: Any, *keys_and_args: Any, keys: int = 2) -> Any:
        """EVALSHA straight (cheaper than redis-py's script wrapper on the send path); on a
        single Redis, sends made while one is in flight share the next round trip
        (``redis_batcher``). A cluster's client routes each call to its slot's node itself."""
        if not self.cluster:
            return await self._sends.call(script, keys, *keys_and_args)
        # the Script's own EVALSHA, with EVAL on a node that does not know it yet
        return await script(keys=keys_and_args[:keys], args=keys_and_args[keys:])

    def _sent_mark(self, queue: str) -> tuple[str, int]:
        """A new mark that a publish ran: one bit per publish, a bitmap per 65,536 of them.

        On a cluster the mark of a publish to ``queue`` is in that queue's slot (a script's
        keys share one), so there is a bitmap per queue as well.
        """
        number = next(self._publishes)
        block = number >> 16
        if block != self._mark_block:
            self._mark_block = block
            self._mark_key = f'{self.prefix}sent:{self._sender}:{block:x}'
        if self.cluster:
            return f'{self.stream_key(queue)}:sent:{self._sender}:{block:x}', number & 0xFFFF
        return self._mark_key, number & 0xFFFF

    def _publish_args(self, batch: Sequence[Outgoing]) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of the PUBLISH script; each queue's messages keep their order.

        Empty when the batch reaches a queue with priorities, retention or a bound.
        """
        first = batch[0]
        if first.queues and featured_name(first.queues[0]):
            return [], []
        mark, offset = self._sent_mark(first.queues[0] if first.queues else '')
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
                own = records.get(queue)
                if own is None:
                    if featured_name(queue):
                        return [], []
                    own = records[queue] = []
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
        member = getattr(consumer, 'member', None)
        layout = layout_of(self, consumer.queue)
        subscription = (RedisSubscription(self, queue, float(visibility), member) if layout is None
                        else LevelSubscription(self, layout, float(visibility), member))
        async with self.guard():
            await subscription.create_group()
        self._delayed.watch(queue)
        return subscription

    async def _move_due(self, queue: str, now_ms: int) -> Any:
        """One queue's move, as a call of its own (on a cluster: in the queue's slot)."""
        layout = layout_named(self, queue)
        if layout is not None and len(layout.streams) > 1:  # into each one's level
            keys = [layout.delayed, layout.clock, *layout.streams]
            return await self._eval(self._levels.move_due_levels, *keys, now_ms, MOVE_BATCH,
                                    keys=len(keys))
        return await self._eval(self._lua.move_due, self.delayed_key(queue), self.stream_key(queue),
                                now_ms, MOVE_BATCH)

    async def _pipe_move_due(self, pipe: Any, queue: str, now_ms: int) -> None:
        """One queue's move, into ``pipe`` (a single Redis's pipeline)."""
        layout = layout_named(self, queue)
        if layout is not None and len(layout.streams) > 1:  # into each one's level
            await self._levels.move_due_levels(keys=[layout.delayed, layout.clock, *layout.streams],
                                               args=[now_ms, MOVE_BATCH], client=pipe)
            return
        await self._lua.move_due(keys=[self.delayed_key(queue), self.stream_key(queue)],
                                 args=[now_ms, MOVE_BATCH], client=pipe)

    async def _move_some(self, queues: list[str]) -> list[str]:
        """Move up to MOVE_BATCH due messages of each queue; the queues that may have more."""
        return await self._delayed.move(queues)

    async def _trim(self) -> None:
        """Trim the retaining queues consumed here past their retention (see TRIM).

        Here, not on the send path: sends stay as cheap, and trimming removes handled
        entries only, which exist where consumers run, so where this mover runs.
        """
        layouts = [layout for queue in list(self._delayed.watched)
                   if (layout := layout_named(self, queue)) is not None and layout.retaining]
        if not layouts:
            return
        if self.cluster:  # a cluster pipeline runs no scripts: a call each, side by side
            await asyncio.gather(*(self._levels.trim(keys=list(layout.streams),
                                                     args=[GROUP, layout.retention_ms])
                                   for layout in layouts))
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for layout in layouts:
                await self._levels.trim(keys=list(layout.streams),
                                        args=[GROUP, layout.retention_ms], client=pipe)
            await pipe.execute()

    # inspecting ---------------------------------------------------------------------------

    async def _length(self, name: str, **options: Any) -> int:
        # Waiting: not pending for a consumer, or released by one, or delayed and due.
        if (layout := layout_named(self, name)) is not None:
            async with self.guard():
                return await features.length(self, layout)
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
        targets, copy = self._requeue_targets(name)
        async with self.guard():
            newest: Any = await self.client.xrevrange(dead, count=1)
            if not newest:
                return 0
            start: bytes | str = '-'
            while True:
                count, last = await self._lua.requeue(
                    keys=[dead, *targets],
                    args=[start, newest[0][0], REQUEUE_BATCH, copy], client=self.client)
                moved += int(count)
                if int(count) < REQUEUE_BATCH:
                    return moved
                start = b'(' + last

    def _requeue_targets(self, name: str) -> tuple[list[str], str]:
        """The streams a dead letter of ``name`` goes back to (by level), and the field that
        marks it a copy on a retaining queue (history lists the original send only)."""
        layout = layout_named(self, name)
        if layout is None:
            return [self.stream_key(name)], ''
        return list(layout.streams), 'again' if layout.retaining else ''

    async def _retained(self, name: str, since: float | None, until: float | None,
                        after: Any, limit: int) -> tuple[list[Retained], Any]:
        layout = layout_named(self, name)
        if layout is None or not layout.retaining:
            raise self._unsupported(f'history of queue {name!r}, declared without retention')
        async with self.guard():
            return await retained(self, layout, since, until, after, limit)

    # operators' primitives (admin commands) -------------------------------------------------

    async def _stats(self, name: str) -> QueueStats:
        if (layout := layout_named(self, name)) is not None:
            async with self.guard():
                return await features.stats(self, layout)
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
        if (layout := layout_named(self, name)) is not None:
            async with self.guard():
                return await features.purge(self, layout)
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
        targets, copy = self._requeue_targets(name)
        async with self.guard():
            entries = await self._page(dead, '-')
            while entries:
                for entry_id, fields in entries:
                    message_id = fields.get(b'id', b'').decode(errors='replace') or entry_id.decode()
                    if message_id in ids:  # moved by the requeue script: one entry, atomically
                        count, _ = await self._lua.requeue(
                            keys=[dead, *targets], args=[entry_id, entry_id, 1, copy],
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
