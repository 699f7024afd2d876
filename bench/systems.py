"""The systems measured: microagent_mq on each broker, and the raw client doing the same work."""

import asyncio
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

REDIS_DSN = 'redis://127.0.0.1:6379/14'
# A Redis Cluster of your own for the redis_cluster system (none is started here), e.g.
# BENCH_REDIS_CLUSTER_DSN=redis+cluster://127.0.0.1:7000,127.0.0.1:7001,127.0.0.1:7002
REDIS_CLUSTER_DSN_VAR = 'BENCH_REDIS_CLUSTER_DSN'
AMQP_DSN = 'amqp://guest:guest@127.0.0.1:5672/'
NATS_DSN = 'nats://127.0.0.1:4222'
BATCH = 32  # the raw consumers prefetch as many as ours does by default on RabbitMQ (+1 handler)
# Ours reads up to 257 at a time from Redis and NATS under a backlog of fast handlers
# (prefetch='auto'): the raw readers read as many.
READ_MAX = 257


def message(i: int) -> dict[str, Any]:
    return {'user_id': i, 'text': 'hello'}


@dataclass(frozen=True)
class Payload:
    """The typed equivalent of ``message(i)`` (made a ``Message`` subclass per run)."""

    user_id: int
    text: str


class Counter:
    """Counts handler calls; wakes a waiter at a target count."""

    def __init__(self) -> None:
        self.count = 0
        self.target = 0
        self.done: asyncio.Future[float] | None = None

    def expect(self, total: int) -> 'asyncio.Future[float]':
        self.target = total
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def __call__(self, **data: Any) -> None:
        self.count += 1
        if self.count >= self.target and self.done is not None and not self.done.done():
            self.done.set_result(time.perf_counter())


class System(ABC):
    """What every measured system does."""

    def __init__(self) -> None:
        self.queue = f'bench_{uuid.uuid4().hex[:10]}'
        self.handled = Counter()

    def item(self, i: int) -> Any:
        """What this system sends as message ``i``."""
        return message(i)

    @abstractmethod
    async def setup(self) -> None: ...

    @abstractmethod
    async def send(self, data: dict[str, Any]) -> None: ...

    @abstractmethod
    async def send_many(self, items: list[dict[str, Any]]) -> None: ...

    @abstractmethod
    async def start_consumer(self) -> None: ...

    @abstractmethod
    async def teardown(self) -> None: ...


class Ours(System):
    """microagent_mq: an agent with one consumer, sending through ``broker.<queue>``."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def setup(self) -> None:
        from microagent_mq import MicroAgent, consumer

        queue = self.declare()
        handled = self.handled

        class BenchAgent(MicroAgent):
            @consumer(queue, timeout=30)
            async def handle(self, **data: Any) -> None:
                handled(**data)

        if self.kind == 'memory':
            from microagent_mq.tools.memory import MemoryBroker
            self.broker: Any = MemoryBroker(f'memory://{self.queue}')
        elif self.kind == 'redis':
            from microagent_mq.tools.redis import RedisBroker
            self.broker = RedisBroker(REDIS_DSN, prefix='bench:')
        elif self.kind == 'redis_cluster':
            from microagent_mq.tools.redis import RedisBroker
            self.broker = RedisBroker(os.environ[REDIS_CLUSTER_DSN_VAR], prefix='bench:')
        elif self.kind == 'nats':
            from microagent_mq.tools.nats import NATSBroker
            self.broker = NATSBroker(NATS_DSN, prefix='bench')
        else:
            from microagent_mq.tools.amqp import AMQPBroker
            self.broker = AMQPBroker(AMQP_DSN)
        self.agent = BenchAgent(broker=self.broker)
        self.bound = getattr(self.broker, self.queue)
        await self.bound.length()  # connect before timing

    def declare(self) -> Any:
        from microagent_mq import Queue

        return Queue(self.queue)

    async def send(self, data: dict[str, Any]) -> None:
        await self.bound.send(data)

    async def send_many(self, items: list[dict[str, Any]]) -> None:
        await self.bound.send_many(items)

    async def start_consumer(self) -> None:
        await self.agent.start()

    async def teardown(self) -> None:
        await self.agent.stop(grace=1)
        await self.broker.close()
        await _cleanup(self.kind, self.queue)


class OursWithOptions(Ours):
    """microagent_mq on a queue declared with options (issue 13), sending as ``Ours`` does.

    ``priority``: sends carry priorities 0-2 in turn (the queue has ``max_priority=2``).
    """

    def __init__(self, kind: str, priority: bool = False, **options: Any) -> None:
        super().__init__(kind)
        self.options = {'max_priority': 2, **options} if priority else options
        self.priority = priority
        self.sent = 0

    def declare(self) -> Any:
        from microagent_mq import Queue

        return Queue(self.queue, **self.options)

    async def send(self, data: dict[str, Any]) -> None:
        if self.priority:
            self.sent += 1
            await self.bound.send(data, priority=self.sent % 3)
        else:
            await self.bound.send(data)


class OursTyped(Ours):
    """microagent_mq publishing a frozen dataclass ``Message`` instead of sending the dict."""

    async def setup(self) -> None:
        await super().setup()
        from microagent_mq import Message

        @dataclass(frozen=True)
        class TypedPayload(Payload, Message, queue=self.queue):
            pass

        self.cls = TypedPayload

    def item(self, i: int) -> Any:
        return self.cls(i, 'hello')

    async def send(self, data: Any) -> None:
        await self.broker.publish(data)

    async def send_many(self, items: list[Any]) -> None:
        await self.broker.publish_many(items)


class RawMemory(System):
    """asyncio.Queue with the same JSON encode / decode."""

    async def setup(self) -> None:
        self.q: asyncio.Queue[bytes] = asyncio.Queue()

    async def send(self, data: dict[str, Any]) -> None:
        self.q.put_nowait(orjson.dumps(data))

    async def send_many(self, items: list[dict[str, Any]]) -> None:
        for item in items:
            self.q.put_nowait(orjson.dumps(item))

    async def start_consumer(self) -> None:
        async def consume() -> None:
            while True:
                self.handled(**orjson.loads(await self.q.get()))
        self.task = asyncio.create_task(consume())

    async def teardown(self) -> None:
        if hasattr(self, 'task'):
            self.task.cancel()


class RawRedis(System):
    """redis-py with the same stream commands: XADD; XREADGROUP batches; XACK + XDEL."""

    async def setup(self) -> None:
        import redis.asyncio as aioredis
        self.r = aioredis.Redis.from_url(REDIS_DSN)
        self.stream = f'bench:{self.queue}'
        await self.r.xgroup_create(self.stream, 'g', id='0', mkstream=True)

    async def send(self, data: dict[str, Any]) -> None:
        await self.r.xadd(self.stream, {'body': orjson.dumps(data), 'id': 'x'})

    async def send_many(self, items: list[dict[str, Any]]) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            for item in items:
                pipe.xadd(self.stream, {'body': orjson.dumps(item), 'id': 'x'})
            await pipe.execute()

    async def start_consumer(self) -> None:
        self.stopping = False

        async def consume() -> None:
            while not self.stopping:  # a flag: redis-py may swallow a cancel mid-command
                reply: Any = await self.r.xreadgroup('g', 'c', {self.stream: '>'}, count=READ_MAX,
                                                     block=100)
                if not reply:
                    continue
                ids = []
                for entry_id, fields in reply[0][1]:
                    self.handled(**orjson.loads(fields[b'body']))
                    ids.append(entry_id)
                async with self.r.pipeline(transaction=False) as pipe:
                    pipe.xack(self.stream, 'g', *ids)
                    pipe.xdel(self.stream, *ids)
                    await pipe.execute()
        self.task = asyncio.create_task(consume())

    async def teardown(self) -> None:
        if hasattr(self, 'task'):
            self.stopping = True
            await asyncio.gather(self.task, return_exceptions=True)
        await self.r.delete(self.stream)
        await self.r.aclose()


class RawRedisNoTimeout(RawRedis):
    """``RawRedis`` without redis-py 8's default ``socket_timeout`` (5 s): no timer per command,
    as the broker's pool (its guard is one watchdog, ``tools/redis_pool``). Not in the plan:
    ``python -m bench.scenarios redis-raw-notimeout end_to_end 5000`` beside ``redis``."""

    async def setup(self) -> None:
        import redis.asyncio as aioredis
        self.r = aioredis.Redis.from_url(REDIS_DSN, socket_timeout=None)
        self.stream = f'bench:{self.queue}'
        await self.r.xgroup_create(self.stream, 'g', id='0', mkstream=True)


class RawAMQP(System):
    """aio-pika with the same confirms, persistence and acks."""

    async def setup(self) -> None:
        import aio_pika
        self.aio_pika = aio_pika
        self.connection = await aio_pika.connect_robust(AMQP_DSN)
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.declare_queue(self.queue, durable=True)

    async def send(self, data: dict[str, Any]) -> None:
        await self.channel.default_exchange.publish(self._message(data), self.queue)

    def _message(self, data: dict[str, Any]) -> Any:
        return self.aio_pika.Message(orjson.dumps(data), message_id='x',
                                     delivery_mode=self.aio_pika.DeliveryMode.PERSISTENT,
                                     headers={'x-attempt': 1})

    async def send_many(self, items: list[dict[str, Any]]) -> None:
        await asyncio.gather(*(self.channel.default_exchange.publish(self._message(item),
                                                                     self.queue) for item in items))

    async def start_consumer(self) -> None:
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=BATCH + 1)
        queue = await channel.declare_queue(self.queue, durable=True)

        async def on_message(msg: Any) -> None:
            self.handled(**orjson.loads(msg.body))
            await msg.ack()
        await queue.consume(on_message)

    async def teardown(self) -> None:
        await self.channel.queue_delete(self.queue)
        await self.connection.close()


class RawNATS(System):
    """nats-py with the same JetStream work: a work-queue stream, publishes awaited until
    stored (with a de-duplication id), a durable pull consumer fetching batches, explicit acks."""

    async def setup(self) -> None:
        import nats
        from nats.js import api
        self.nc = await nats.connect(NATS_DSN)
        self.js = self.nc.jetstream()
        self.stream, self.subject = f'benchraw-{self.queue}', f'benchraw.{self.queue}'
        await self.js.add_stream(api.StreamConfig(
            name=self.stream, subjects=[self.subject], retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE))
        await self.js.add_consumer(self.stream, api.ConsumerConfig(
            durable_name='c', ack_policy=api.AckPolicy.EXPLICIT, ack_wait=40, max_ack_pending=-1))
        self.ids = 0

    def _headers(self) -> dict[str, str]:
        self.ids += 1
        return {'Nats-Msg-Id': f'raw-{self.ids}'}

    async def send(self, data: dict[str, Any]) -> None:
        await self.js.publish(self.subject, orjson.dumps(data), headers=self._headers())

    async def send_many(self, items: list[dict[str, Any]]) -> None:
        acks = [await self.js.publish_async(self.subject, orjson.dumps(item), headers=self._headers())
                for item in items]
        await asyncio.gather(*acks)

    async def start_consumer(self) -> None:
        import nats.errors
        self.stopping = False
        pull = await self.js.pull_subscribe_bind('c', stream=self.stream)

        async def consume() -> None:
            while not self.stopping:
                try:
                    msgs = await pull.fetch(READ_MAX, timeout=0.5)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                for msg in msgs:
                    self.handled(**orjson.loads(msg.data))
                    await msg.ack()
        self.task = asyncio.create_task(consume())

    async def teardown(self) -> None:
        if hasattr(self, 'task'):
            self.stopping = True
            await asyncio.gather(self.task, return_exceptions=True)
        await self.js.delete_stream(self.stream)
        await self.nc.close()


async def _cleanup(kind: str, queue: str) -> None:
    if kind == 'redis':
        import redis.asyncio as aioredis
        r = aioredis.Redis.from_url(REDIS_DSN)
        # the stream, its dead letters, delayed set and priority levels; nobody else's keys
        keys = [key async for key in r.scan_iter(match=f'bench:{queue}*', count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()
    elif kind == 'redis_cluster':
        from microagent_mq.tools.redis import RedisBroker
        admin = RedisBroker(os.environ[REDIS_CLUSTER_DSN_VAR], prefix='bench:')
        keys = [k async for k in admin.client.scan_iter(match=f'bench:{{{queue}}}*')]
        if keys:
            await admin.client.delete(*keys)
        await admin.close()
    elif kind == 'nats':
        import nats
        import nats.js.errors
        client = await nats.connect(NATS_DSN)
        js = client.jetstream()
        for suffix in ('', '-delayed', '-dlq', '-free'):
            try:
                await js.delete_stream(f'bench-{queue}{suffix}')
            except nats.js.errors.NotFoundError:
                pass
        await client.close()
    elif kind == 'amqp':
        import aio_pika
        connection = await aio_pika.connect(AMQP_DSN)
        async with connection:
            channel = await connection.channel()
            for suffix in ('', '.dlq', '.journal', '.bindings'):
                await channel.queue_delete(f'{queue}{suffix}')


SYSTEMS: dict[str, Callable[[], System]] = {
    'memory': lambda: Ours('memory'),
    'memory-raw': RawMemory,
    'memory-typed': lambda: OursTyped('memory'),
    'redis-typed': lambda: OursTyped('redis'),
    'amqp-typed': lambda: OursTyped('amqp'),
    'redis': lambda: Ours('redis'),
    'redis-raw': RawRedis,
    'redis-raw-notimeout': RawRedisNoTimeout,
    'redis_cluster': lambda: Ours('redis_cluster'),
    'amqp': lambda: Ours('amqp'),
    'amqp-raw': RawAMQP,
    'nats': lambda: Ours('nats'),
    'nats-raw': RawNATS,
}
# Queues with options (issue 13), compared with the plain queue of the same broker.
for _kind in ('memory', 'redis', 'amqp'):
    SYSTEMS[f'{_kind}-retention'] = lambda kind=_kind: OursWithOptions(kind, retention='1h')
    SYSTEMS[f'{_kind}-priority'] = lambda kind=_kind: OursWithOptions(kind, priority=True)
