"""Fixtures: one ``broker`` fixture parametrised over every transport, real servers only."""

import asyncio
import os
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest

from microagent_mq import Queue, testing
from microagent_mq.broker import AbstractQueueBroker

from .faults import FaultProxy
from .servers import NatsServer, RabbitNode, RedisClusterNodes, RedisServer
from .servers import free_port as free_port  # re-exported: tests import it from here

# DB 0 by default: every test's keys carry a unique prefix, so they share a DB with anyone.
REDIS_DSN = os.environ.get('TEST_REDIS_DSN', 'redis://127.0.0.1:6379/0')
AMQP_DSN = os.environ.get('TEST_AMQP_DSN', 'amqp://guest:guest@127.0.0.1:5672/')
NATS_DSN = os.environ.get('TEST_NATS_DSN', 'nats://127.0.0.1:4222')
# Set by the redis_cluster_dsn fixture (a cluster of the run's own) unless given: the crash
# tests' worker processes read it from the environment.
CLUSTER_DSN_VAR = 'TEST_REDIS_CLUSTER_DSN'


def _address(dsn: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or '127.0.0.1', parts.port or default_port


SERVERS = {'redis': _address(REDIS_DSN, 6379), 'amqp': _address(AMQP_DSN, 5672),
           'nats': _address(NATS_DSN, 4222)}
SERVERS['amqp_quorum'] = SERVERS['amqp']  # quorum queues on the same RabbitMQ


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


# Commands that would cut or stop what everyone else on the shared node uses: a fault test
# restarts or cuts what it owns instead (own_rabbit, a proxy_to proxy).
DISRUPTIVE = frozenset({'stop_app', 'start_app', 'stop', 'shutdown', 'reset', 'force_reset',
                        'close_all_connections', 'close_connection', 'close_all_user_connections',
                        'delete_user', 'change_password', 'clear_permissions'})


def rabbitmqctl(*args: str) -> None:
    """``rabbitmqctl`` on the shared node, for harmless admin only (a vhost of the test's own)."""
    if DISRUPTIVE & set(args):
        raise ValueError(f'rabbitmqctl {args[0]} would hit everyone on the shared RabbitMQ; '
                         'use the own_rabbit fixture or a proxy_to proxy')
    subprocess.run(['rabbitmqctl', *args], check=True, capture_output=True, timeout=120)


def unique(prefix: str = 'q') -> str:
    return f'{prefix}_{uuid.uuid4().hex[:12]}'


def make_broker(kind: str, namespace: str, dsn: str | None = None,
                **options: Any) -> AbstractQueueBroker:
    """A broker of ``kind``; ``dsn`` points it elsewhere (a proxy, a server of the test's own)."""
    if kind == 'memory':
        from microagent_mq.tools.memory import MemoryBroker

        return MemoryBroker(f'memory://{namespace}')
    if kind == 'redis_cluster':
        from microagent_mq.tools.redis import RedisBroker

        if dsn is None and CLUSTER_DSN_VAR not in os.environ:
            _missing(f'no Redis Cluster: the redis_cluster_dsn fixture sets {CLUSTER_DSN_VAR}')
        return RedisBroker(dsn or os.environ[CLUSTER_DSN_VAR], prefix=f'test:{namespace}:',
                           **options)
    if dsn is None:
        require_server('amqp' if kind == 'amqp_quorum' else kind)
    if kind == 'redis':
        from microagent_mq.tools.redis import RedisBroker

        return RedisBroker(dsn or REDIS_DSN, prefix=f'test:{namespace}:', **options)
    if kind == 'nats':
        from microagent_mq.tools.nats import NATSBroker

        return NATSBroker(dsn or NATS_DSN, prefix=f'test_{namespace}', **options)
    from microagent_mq.tools.amqp import AMQPBroker

    # amqp_quorum: every queue that does not say otherwise is a quorum queue
    options.setdefault('durability', 'quorum' if kind == 'amqp_quorum' else 'classic')
    return AMQPBroker(dsn or AMQP_DSN, **options)


def proxied_dsn(dsn: str, proxy: FaultProxy) -> str:
    """``dsn`` with its host and port replaced by the proxy's."""
    parts = urlsplit(dsn)
    auth = parts.netloc.rpartition('@')[0]
    netloc = f'{auth}@127.0.0.1:{proxy.port}' if auth else f'127.0.0.1:{proxy.port}'
    return parts._replace(netloc=netloc).geturl()


@pytest.fixture
async def proxy_to(broker_kind: str) -> AsyncIterator[Callable[[], Awaitable[tuple[FaultProxy, str]]]]:
    """Fault proxies in front of the shared server of ``broker_kind``: (proxy, DSN through it)."""
    proxies: list[FaultProxy] = []

    async def make() -> tuple[FaultProxy, str]:
        require_server(broker_kind)
        dsn = {'redis': REDIS_DSN, 'amqp': AMQP_DSN, 'nats': NATS_DSN}[broker_kind]
        proxy = await FaultProxy(SERVERS[broker_kind][1], SERVERS[broker_kind][0]).start()
        proxies.append(proxy)
        return proxy, proxied_dsn(dsn, proxy)

    yield make
    for proxy in proxies:
        await proxy.close()


def _missing(what: str) -> NoReturn:
    if os.environ.get('CI') == 'true':
        pytest.fail(f'{what} (CI=true: this test must run)')
    pytest.skip(what)


@pytest.fixture
def own_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RedisServer]:
    """A Redis server of this test's own (``indirect`` param: extra server arguments)."""
    try:
        server = RedisServer(tmp_path / 'redis', list(getattr(request, 'param', [])))
    except FileNotFoundError as exc:
        _missing(str(exc))
    server.start()
    yield server
    server.kill()


@pytest.fixture
def own_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A NATS server with JetStream of this test's own (restart it: port and store are kept)."""
    try:
        server = NatsServer(tmp_path / 'nats')
    except FileNotFoundError as exc:
        _missing(str(exc))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope='session')
def own_rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitNode]:
    """A RabbitMQ node of the test run's own, started on first use, stopped at the end."""
    try:
        node = RabbitNode(tmp_path_factory.mktemp('rabbit'))
    except FileNotFoundError as exc:
        _missing(str(exc))
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope='session')
def redis_cluster_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-master Redis Cluster of the run's own (or ``TEST_REDIS_CLUSTER_DSN``), torn down after."""
    if CLUSTER_DSN_VAR in os.environ:
        yield os.environ[CLUSTER_DSN_VAR]
        return
    try:
        cluster = RedisClusterNodes(tmp_path_factory.mktemp('redis-cluster'))
    except FileNotFoundError as exc:
        _missing(str(exc))
    try:
        cluster.start()
        os.environ[CLUSTER_DSN_VAR] = cluster.dsn
        yield cluster.dsn
    finally:
        os.environ.pop(CLUSTER_DSN_VAR, None)
        cluster.kill()


@pytest.fixture(params=['memory', pytest.param('redis', marks=pytest.mark.redis),
                        pytest.param('redis_cluster', marks=pytest.mark.redis_cluster),
                        pytest.param('amqp', marks=pytest.mark.amqp),
                        pytest.param('nats', marks=pytest.mark.nats),
                        pytest.param('amqp_quorum', marks=pytest.mark.amqp)])
def broker_kind(request: pytest.FixtureRequest) -> str:
    if request.param == 'redis_cluster':
        request.getfixturevalue('redis_cluster_dsn')  # started on first use
    return str(request.param)


@pytest.fixture
async def broker_factory(broker_kind: str) -> AsyncIterator[Callable[..., AbstractQueueBroker]]:
    """Brokers of one kind sharing one namespace (as separate processes would).

    ``factory(dsn)`` reaches the same server another way (through a ``proxy_to`` proxy).
    """
    namespace = unique('ns')
    made: list[AbstractQueueBroker] = []

    def factory(dsn: str | None = None) -> AbstractQueueBroker:
        broker = make_broker(broker_kind, namespace, dsn)
        made.append(broker)
        return broker

    yield factory
    for broker in made:
        await broker.close(grace=1)
    await cleanup(broker_kind, namespace, made)


@pytest.fixture
def broker(broker_factory: Callable[..., AbstractQueueBroker]) -> AbstractQueueBroker:
    return broker_factory()


async def cleanup(kind: str, namespace: str, brokers: list[AbstractQueueBroker]) -> None:
    if kind == 'redis':
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_DSN)
        keys = [k async for k in client.scan_iter(match=f'test:{namespace}:*', count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    elif kind == 'redis_cluster':
        from microagent_mq.tools.redis import RedisBroker

        admin = RedisBroker(os.environ[CLUSTER_DSN_VAR])
        keys = [k async for k in admin.client.scan_iter(match=f'test:{namespace}:*', count=1000)]
        if keys:
            await admin.client.delete(*keys)  # redis-py splits it per slot
        await admin.close()
    elif kind in ('amqp', 'amqp_quorum'):
        await delete_amqp_queues(list(Queue.get_all()), list(Queue.exchanges()))
    elif kind == 'nats':
        await delete_nats_streams(f'test_{namespace}')


async def delete_nats_streams(prefix: str, queue: str = '') -> None:
    """Delete the streams of ``prefix`` (of its ``queue`` only, if given): never anyone else's."""
    import json

    import nats

    client = await nats.connect(NATS_DSN)
    try:
        reply = await client.request('$JS.API.STREAM.NAMES', json.dumps({'subject': f'{prefix}.>'}).encode())
        names = json.loads(reply.data).get('streams') or []
        js = client.jetstream()
        for name in names:
            if name == f'{prefix}-{queue}' or name.startswith(f'{prefix}-{queue}' + ('-' if queue else '')):
                await js.delete_stream(name)
    finally:
        await client.close()


async def delete_amqp_queues(queues: list[str], exchanges: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_DSN)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            for suffix in ('', '.dlq', '.bindings', '.due', '.journal', '.journal.bindings'):
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
