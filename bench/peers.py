"""The peers measured beside us by ``python -m bench --peers`` (the optional ``[bench]`` extra).

Each does the scenarios' work its own documented way, with the options closest to ours:
- **faststream** (``faststream.redis`` / ``faststream.rabbit``): Redis, a stream with a consumer
  group (``StreamSub``, reads of 32, acked after the handler); RabbitMQ, a durable queue,
  persistent messages, publisher confirms, prefetch 33, acked after the handler.
- **microagent 1.x** (``microagent.tools``): what it offers. Redis: a list (``RPUSH`` /
  ``BLPOP``, no acknowledgement: a message is lost if its consumer dies); RabbitMQ: aiormq,
  publisher confirms, a non-durable queue, non-persistent messages, no prefetch limit, acked
  after the handler. Its consumer waits ``BIND_TIME`` (1 s) before reading: set to 0 here.
Neither has a ``send_many``: the *drain* scenario fills their queues with concurrent sends.
"""

import asyncio
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .systems import AMQP_DSN, BATCH, REDIS_DSN, System

PEERS = {'faststream': 'faststream', 'microagent1': 'microagent'}  # name: its distribution


def installed(peer: str) -> str | None:
    """The installed version of ``peer``'s distribution, None when it is not installed."""
    try:
        return version(PEERS[peer])
    except PackageNotFoundError:
        return None


class Peer(System):
    """A peer: ``send_many`` as concurrent sends (none has a batch send for these queues)."""

    async def send_many(self, items: list[dict[str, Any]]) -> None:
        for first in range(0, len(items), 100):
            await asyncio.gather(*(self.send(item) for item in items[first:first + 100]))


class FastStreamRedis(Peer):
    async def setup(self) -> None:
        from faststream.redis import RedisBroker, StreamSub
        self.stream = f'bench:{self.queue}'
        self.broker = RedisBroker(REDIS_DSN, logger=None)
        handled = self.handled

        @self.broker.subscriber(stream=StreamSub(self.stream, group='g', consumer='c',
                                                 max_records=BATCH))
        async def handle(body: dict[str, Any]) -> None:
            handled(**body)

        await self.broker.connect()
        # The group from the stream's start, as the raw client makes it: faststream's own
        # starts at '$', after the messages the drain scenario queued beforehand.
        import redis.asyncio as aioredis
        client = aioredis.Redis.from_url(REDIS_DSN)
        await client.xgroup_create(self.stream, 'g', id='0', mkstream=True)
        await client.aclose()

    async def send(self, data: dict[str, Any]) -> None:
        await self.broker.publish(data, stream=self.stream)

    async def start_consumer(self) -> None:
        await self.broker.start()

    async def teardown(self) -> None:
        await self.broker.stop()
        import redis.asyncio as aioredis
        client = aioredis.Redis.from_url(REDIS_DSN)
        await client.delete(self.stream)
        await client.aclose()


class FastStreamRabbit(Peer):
    async def setup(self) -> None:
        from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
        self.broker = RabbitBroker(AMQP_DSN, logger=None,
                                   default_channel=Channel(prefetch_count=BATCH + 1))
        self.rabbit_queue = RabbitQueue(self.queue, durable=True)
        handled = self.handled

        @self.broker.subscriber(self.rabbit_queue)
        async def handle(body: dict[str, Any]) -> None:
            handled(**body)

        await self.broker.connect()
        await self.broker.declare_queue(self.rabbit_queue)

    async def send(self, data: dict[str, Any]) -> None:
        await self.broker.publish(data, queue=self.rabbit_queue, persist=True)

    async def start_consumer(self) -> None:
        await self.broker.start()

    async def teardown(self) -> None:
        await self.broker.stop()
        await _delete_amqp_queue(self.queue)


class MicroAgent1(Peer):
    """microagent 1.x, Redis or RabbitMQ: an agent with one consumer, sends through the broker."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def setup(self) -> None:
        import microagent
        queue = microagent.Queue(name=self.queue)
        handled = self.handled

        class BenchAgent(microagent.MicroAgent):
            @microagent.consumer(queue, timeout=30)
            async def handle(self, amqp: Any = None, **data: Any) -> None:
                handled(**data)

        if self.kind == 'redis':
            from microagent.tools.redis import RedisBroker
            self.broker: Any = RedisBroker(REDIS_DSN)
            self.broker.BIND_TIME = 0
        else:
            from microagent.tools.amqp import AMQPBroker
            self.broker = AMQPBroker(AMQP_DSN)
        self.agent = BenchAgent(broker=self.broker)
        self.bound = getattr(self.broker, self.queue)
        await self.bound.length()  # connects; on RabbitMQ declares the queue (else sends are lost)

    async def send(self, data: dict[str, Any]) -> None:
        await self.bound.send(data)

    async def start_consumer(self) -> None:
        await self.agent.start(enable_servers_running=False)

    async def teardown(self) -> None:
        await self.broker.close()
        if self.kind == 'redis':
            import redis.asyncio as aioredis
            client = aioredis.Redis.from_url(REDIS_DSN)
            await client.delete(self.queue)
            await client.aclose()
        else:
            await _delete_amqp_queue(self.queue)


async def _delete_amqp_queue(name: str) -> None:
    import aio_pika
    connection = await aio_pika.connect(AMQP_DSN)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)


PEER_SYSTEMS: dict[str, Any] = {
    'redis-faststream': FastStreamRedis,
    'amqp-faststream': FastStreamRabbit,
    'redis-microagent1': lambda: MicroAgent1('redis'),
    'amqp-microagent1': lambda: MicroAgent1('amqp'),
}
