"""Redis Cluster specifics: hash-tagged keys, fan-out across slots, clear errors, a dead node.

The contract and crash suites run on the cluster too (broker kind ``redis_cluster``).
"""

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent_mq import BrokerUnavailable, ConfigurationError, InvalidDSN, Queue
from microagent_mq.tools.redis import RedisBroker
from microagent_mq.transport import Outgoing

from .conftest import REDIS_DSN, _missing, free_port, require_server, unique
from .servers import RedisClusterNodes

pytestmark = pytest.mark.redis_cluster


@pytest.fixture
async def cluster_broker(redis_cluster_dsn: str) -> AsyncIterator[RedisBroker]:
    """A broker on the run's cluster, with a prefix of its own, its keys deleted after."""
    broker = RedisBroker(redis_cluster_dsn, prefix=f'test:{unique("ns")}:', send_retries=1)
    yield broker
    client: Any = broker.client
    keys = [k async for k in client.scan_iter(match=f'{broker.prefix}*', count=1000)]
    if keys:
        await client.delete(*keys)
    await broker.close()


def _nodes(dsn: str) -> list[str]:
    return dsn.removeprefix('redis+cluster://').split(',')


async def names_on_distinct_nodes(broker: RedisBroker, count: int) -> list[str]:
    """Queue names whose keys live on ``count`` different nodes (so in different slots)."""
    client: Any = broker.client
    await client.initialize()
    names: dict[str, str] = {}
    while len(names) < count:
        name = unique()
        node = client.get_node_from_key(broker.stream_key(name)).name
        names.setdefault(node, name)
    return list(names.values())


# keys --------------------------------------------------------------------------------------


def test_single_node_keys_are_as_before_and_cluster_keys_share_one_hash_tag() -> None:
    from redis.crc import key_slot

    plain = RedisBroker('redis://localhost:6379/0', prefix='mq:')
    assert (plain.stream_key('q'), plain.delayed_key('q'), plain.dead_key('q')) == (
        'mq:q', 'mq:q:delayed', 'mq:q.dlq')  # no migration for single-node users
    assert plain._sent_mark('q')[0].startswith('mq:sent:')
    cluster = RedisBroker('redis+cluster://localhost:7000,localhost:7001', prefix='mq:')
    mark = cluster._sent_mark('q')[0]
    keys = [cluster.stream_key('q'), cluster.delayed_key('q'), cluster.dead_key('q'), mark]
    assert keys[:3] == ['mq:{q}', 'mq:{q}:delayed', 'mq:{q}.dlq']
    assert mark.startswith('mq:{q}:sent:')
    assert len({key_slot(key.encode()) for key in keys}) == 1  # scripts' keys: one slot
    assert RedisBroker('redis://localhost:7000', cluster=True).stream_key('q') == 'mq:{q}'


@pytest.mark.parametrize(('dsn', 'options', 'error'), [
    ('redis+cluster://a:7000,b:x', {}, InvalidDSN),
    ('redis+cluster://a:7000,', {}, InvalidDSN),
    ('redis+cluster://a:7000/1', {}, InvalidDSN),  # a cluster has database 0 only
    ('redis+cluster://a:7000', {'prefix': 'app{x}:'}, ConfigurationError),  # would be the tag
    ('unix:///tmp/redis.sock', {'cluster': True}, ConfigurationError),
])
def test_bad_cluster_settings_fail_at_construction(dsn: str, options: dict[str, Any],
                                                   error: type[Exception]) -> None:
    with pytest.raises(error):
        RedisBroker(dsn, **options)


def test_password_of_a_cluster_dsn_never_shows() -> None:
    broker = RedisBroker('redis+cluster://user:s3cret@a:7000,b:7001')
    assert 's3cret' not in repr(broker)
    assert 's3cret' not in str(broker.info())


# sending across slots -----------------------------------------------------------------------


async def test_fanout_and_batches_reach_queues_on_every_node(cluster_broker: RedisBroker) -> None:
    exchange = unique('ex')
    names = await names_on_distinct_nodes(cluster_broker, 3)
    for name in names:
        Queue(name, exchange)
    await cluster_broker.send(exchange, {'n': 0})
    await cluster_broker.send(exchange, {'n': 1}, delay=60)  # delayed copies, per queue too
    # One batch spanning queues of every slot, each queue's messages in order.
    await cluster_broker._publish([Outgoing(f'{{"n": {n}}}'.encode(), f'm{n}', (names[n % 3],))
                                   for n in range(2, 11)])
    client: Any = cluster_broker.client
    for index, name in enumerate(names):
        entries = await client.xrange(cluster_broker.stream_key(name))
        bodies = [fields[b'body'] for _, fields in entries]
        assert bodies == [b'{"n":0}', *(f'{{"n": {n}}}'.encode() for n in range(2, 11)
                                        if n % 3 == index)]
        assert await client.zcard(cluster_broker.delayed_key(name)) == 1
        assert await cluster_broker.queue_length(name) == len(bodies)


async def test_a_send_run_twice_is_stored_once(cluster_broker: RedisBroker,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # What redis-py's retry after a lost reply does: the same script, the same mark, again.
    name = Queue(unique()).name
    mark = cluster_broker._sent_mark(name)
    monkeypatch.setattr(cluster_broker, '_sent_mark', lambda queue: mark)
    for _ in range(2):
        await cluster_broker.send(name, {'n': 1})
        await cluster_broker.send_many(name, [{'n': 2}, {'n': 3}])
    assert await cluster_broker.queue_length(name) == 1  # the mark guards every script


async def test_more_blocking_reads_than_redis_py_default_pool_on_one_node(
        cluster_broker: RedisBroker) -> None:
    # A broker consuming many queues holds a connection per queue in a blocking read.
    client: Any = cluster_broker.client
    stream = cluster_broker.stream_key(Queue(unique()).name)
    await client.xgroup_create(stream, 'g', id='0', mkstream=True)
    replies = await asyncio.gather(*(client.xreadgroup('g', f'c{i}', {stream: '>'}, block=300)
                                     for i in range(120)))
    assert replies == [[] for _ in range(120)]


# clear errors -------------------------------------------------------------------------------


async def test_cluster_dsn_at_a_plain_redis_says_it_is_not_a_cluster_node() -> None:
    require_server('redis')
    host = REDIS_DSN.split('//')[1].split('/')[0]
    broker = RedisBroker(f'redis+cluster://{host}', prefix=f'test:{unique("ns")}:')
    try:
        with pytest.raises(ConfigurationError, match=r'is not a Redis Cluster node \(cluster_enabled:0\)'):
            await broker.send(Queue(unique()).name, {'n': 1})
    finally:
        await broker.close()


async def test_plain_dsn_at_a_cluster_node_says_use_redis_cluster(
        cluster_broker: RedisBroker, redis_cluster_dsn: str) -> None:
    first = _nodes(redis_cluster_dsn)[0]
    client: Any = cluster_broker.client
    await client.initialize()
    name = next(n for n in iter(unique, None)  # a queue another node serves: MOVED
                if client.get_node_from_key(cluster_broker.stream_key(n)).name != first)
    Queue(name)
    plain = RedisBroker(f'redis://{first}/0', prefix=cluster_broker.prefix, send_retries=0)
    try:
        with pytest.raises(ConfigurationError, match='use redis\\+cluster://'):
            await plain.send(name, {'n': 1})
    finally:
        await plain.close()


async def test_unreachable_cluster_is_broker_unavailable() -> None:
    broker = RedisBroker(f'redis+cluster://127.0.0.1:{free_port()}', connect_timeout=0.2,
                         send_retries=0)
    try:
        with pytest.raises(BrokerUnavailable, match=r'Redis Cluster at .* is unreachable'):
            await broker.send(Queue(unique()).name, {'n': 1})
    finally:
        await broker.close()


# a node dies in the middle of a fan-out -------------------------------------------------------


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """A cluster of this test's own: it kills one of its nodes."""
    try:
        cluster = RedisClusterNodes(tmp_path / 'cluster')
    except FileNotFoundError as exc:
        _missing(str(exc))
    cluster.start()
    yield cluster
    cluster.kill()


@pytest.mark.timeout(120)
async def test_fanout_stops_at_a_dead_node_earlier_queues_keep_their_copy(
        own_cluster: RedisClusterNodes) -> None:
    broker = RedisBroker(own_cluster.dsn, prefix='t:', connect_timeout=0.5, send_retries=1)
    try:
        before, doomed, after = await names_on_distinct_nodes(broker, 3)
        client: Any = broker.client
        dead = client.get_node_from_key(broker.stream_key(doomed)).port
        next(node for node in own_cluster.nodes if node.port == dead).kill()
        with pytest.raises(BrokerUnavailable):
            await broker._publish([Outgoing(b'{"n": 1}', 'm1', (before, doomed, after))])
        # Queue by queue, in order: the one before the dead node has its copy, the one after
        # it has none (the send raised, so the caller knows to send again).
        assert len(await client.xrange(broker.stream_key(before))) == 1
        assert len(await client.xrange(broker.stream_key(after))) == 0
    finally:
        await broker.close()
