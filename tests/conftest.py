"""Fixtures: one ``broker`` fixture parametrised over every transport, real servers only."""

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from microagent_mq import Queue, testing
from microagent_mq.broker import AbstractQueueBroker

REDIS_DSN = os.environ.get('TEST_REDIS_DSN', 'redis://127.0.0.1:6379/15')
AMQP_DSN = os.environ.get('TEST_AMQP_DSN', 'amqp://guest:guest@127.0.0.1:5672/')
SERVERS = {'redis': ('127.0.0.1', 6379), 'amqp': ('127.0.0.1', 5672)}


def server_up(kind: str) -> bool:
    try:
        with socket.create_connection(SERVERS[kind], timeout=1):
            return True
    except OSError:
        return False


def require_server(kind: str) -> None:
    """Skip when the server is down on a laptop; fail in CI, where it must run."""
    if server_up(kind):
        return
    host, port = SERVERS[kind]
    reason = f'{kind} server not reachable at {host}:{port}'
    if os.environ.get('CI') == 'true':
        pytest.fail(f'{reason} (CI=true: integration tests must run)')
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    Queue.reset()
    yield
    Queue.reset()


def free_port() -> int:
    """A loopback port nothing listens on (for 'server unreachable' tests)."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


def rabbitmqctl(*args: str) -> None:
    """Run ``rabbitmqctl`` on the local node; a real fault for RabbitMQ tests."""
    subprocess.run(['rabbitmqctl', *args], check=True, capture_output=True, timeout=120)


def unique(prefix: str = 'q') -> str:
    return f'{prefix}_{uuid.uuid4().hex[:12]}'


def make_broker(kind: str, namespace: str) -> AbstractQueueBroker:
    if kind == 'memory':
        from microagent_mq.tools.memory import MemoryBroker

        return MemoryBroker(f'memory://{namespace}')
    require_server('amqp' if kind == 'amqp_quorum' else kind)
    if kind == 'redis':
        from microagent_mq.tools.redis import RedisBroker

        return RedisBroker(REDIS_DSN, prefix=f'test:{namespace}:')
    from microagent_mq.tools.amqp import AMQPBroker

    # amqp_quorum: every queue that does not say otherwise is a quorum queue
    return AMQPBroker(AMQP_DSN, durability='quorum' if kind == 'amqp_quorum' else 'classic')


@pytest.fixture(params=['memory', pytest.param('redis', marks=pytest.mark.redis),
                        pytest.param('amqp', marks=pytest.mark.amqp),
                        pytest.param('amqp_quorum', marks=pytest.mark.amqp)])
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def broker_factory(broker_kind: str) -> AsyncIterator[Callable[[], AbstractQueueBroker]]:
    """Brokers of one kind sharing one namespace (as separate processes would)."""
    namespace = unique('ns')
    made: list[AbstractQueueBroker] = []

    def factory() -> AbstractQueueBroker:
        broker = make_broker(broker_kind, namespace)
        made.append(broker)
        return broker

    yield factory
    for broker in made:
        await broker.close(grace=1)
    await cleanup(broker_kind, namespace, made)


@pytest.fixture
def broker(broker_factory: Callable[[], AbstractQueueBroker]) -> AbstractQueueBroker:
    return broker_factory()


async def cleanup(kind: str, namespace: str, brokers: list[AbstractQueueBroker]) -> None:
    if kind == 'redis':
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_DSN)
        keys = [k async for k in client.scan_iter(match=f'test:{namespace}:*', count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    elif kind in ('amqp', 'amqp_quorum'):
        await delete_amqp_queues(list(Queue.get_all()), list(Queue.exchanges()))


async def delete_amqp_queues(queues: list[str], exchanges: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_DSN)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            for suffix in ('', '.dlq', '.bindings'):
                await channel.queue_delete(name + suffix)
        for name in exchanges:
            await channel.exchange_delete(name)


async def wait_until(condition: Callable[[], Awaitable[object] | object], timeout_s: float = 20.0,
                     what: str = 'condition') -> None:
    """Poll ``condition`` until true, failing the test after ``timeout_s`` seconds."""
    try:
        await testing.wait_until(condition, timeout_s)
    except TimeoutError:
        pytest.fail(f'timed out waiting for {what}')


class Calls:
    """Records handler calls and lets a test wait for a count of them."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def add(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        self._changed.set()

    async def wait_for(self, count: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout_s):
            while len(self.items) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.items

    def __len__(self) -> int:
        return len(self.items)
