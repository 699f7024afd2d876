"""Concurrent Redis sends share round trips (``tools/redis_batcher``), each still its own send:
stored before it returns, in its sender's order, with its own error, stored once."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from redis.exceptions import ResponseError

from microagent_mq import Queue
from microagent_mq.tools import redis_batcher
from microagent_mq.tools.redis import RedisBroker

from .conftest import REDIS_DSN, require_server, unique
from .servers import RedisServer
from .test_redis_lost_reply import proxied  # noqa: F401 - the fixture

pytestmark = pytest.mark.redis


@pytest.fixture
async def broker() -> AsyncIterator[RedisBroker]:
    require_server('redis')
    prefix = f'test:{unique("ns")}:'
    broker = RedisBroker(REDIS_DSN, prefix=prefix)
    yield broker
    client: Any = broker.client
    keys = [k async for k in client.scan_iter(match=f'{prefix}*')]
    if keys:
        await client.delete(*keys)
    await broker.close()


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every pipeline (a round trip of more than one call) the batchers send."""
    sizes: list[int] = []
    real = redis_batcher.ScriptBatcher._exchange

    async def spy(self: redis_batcher.ScriptBatcher, commands: list[Any]) -> list[Any]:
        if len(commands) > 1:
            sizes.append(len(commands))
        return await real(self, commands)

    monkeypatch.setattr(redis_batcher.ScriptBatcher, '_exchange', spy)
    return sizes


async def bodies(broker: RedisBroker, queue: str) -> list[dict[str, Any]]:
    entries: Any = await broker.client.xrange(broker.stream_key(queue))
    return [orjson.loads(fields[b'body']) for _, fields in entries]


async def test_concurrent_sends_share_round_trips_keep_order_and_all_arrive(
        broker: RedisBroker, batches: list[int]) -> None:
    queues = [Queue(unique()).name for _ in range(2)]

    async def sender(number: int) -> None:
        for i in range(10):
            await broker.send(queues[number % 2], {'sender': number, 'i': i})

    await asyncio.gather(*(sender(number) for number in range(40)))
    stored = [body for queue in queues for body in await bodies(broker, queue)]
    assert len(stored) == 400
    for number in range(40):  # every message once, each sender's in its order
        assert [b['i'] for b in stored if b['sender'] == number] == list(range(10))
    round_trips = len(batches) + (400 - sum(batches))  # pipelines, and sends that went alone
    assert round_trips < 40  # most sends shared a round trip with many others


async def test_a_lone_sender_sends_no_pipeline(broker: RedisBroker, batches: list[int]) -> None:
    queue = Queue(unique()).name
    for i in range(20):
        await broker.send(queue, {'i': i})
    assert [b['i'] for b in await bodies(broker, queue)] == list(range(20))
    assert batches == []


async def test_an_error_goes_to_its_own_sender_only(broker: RedisBroker, batches: list[int]) -> None:
    good, bad, other = (Queue(unique()).name for _ in range(3))
    await broker.client.set(broker.stream_key(bad), 'not a stream')  # XADD on it: WRONGTYPE
    results = await asyncio.gather(
        broker.send(good, {'n': 1}),  # goes alone; the next three wait and share one pipeline
        broker.send(other, {'n': 2}), broker.send(bad, {'n': 3}), broker.send(other, {'n': 4}),
        return_exceptions=True)
    assert batches == [3]
    assert results[0] is None and results[1] is None and results[3] is None
    assert isinstance(results[2], ResponseError) and 'WRONGTYPE' in str(results[2])
    assert await bodies(broker, good) == [{'n': 1}]
    assert await bodies(broker, other) == [{'n': 2}, {'n': 4}]


async def test_a_sender_cancelled_while_waiting_sends_nothing(broker: RedisBroker) -> None:
    first, second, third = (Queue(unique()).name for _ in range(3))
    alone = asyncio.create_task(broker.send(first, {'n': 1}))
    waiting = asyncio.create_task(broker.send(second, {'n': 2}))
    after = asyncio.create_task(broker.send(third, {'n': 3}))
    await asyncio.sleep(0)  # all three ran: one on the wire, two waiting for it
    waiting.cancel()
    await asyncio.gather(alone, after)
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await bodies(broker, first) == [{'n': 1}]
    assert await bodies(broker, second) == []
    assert await bodies(broker, third) == [{'n': 3}]


async def test_a_pipeline_whose_reply_is_lost_stores_each_message_once(
        proxied: Any, batches: list[int]) -> None:  # noqa: F811 - the fixture
    proxy, through, direct = proxied
    lead, queue = Queue(unique()).name, Queue(unique()).name
    await through.send(lead, {'n': 0})  # connected, scripts loaded
    proxy.lose_reply_to(through.stream_key(queue).encode())
    await asyncio.gather(through.send(lead, {'n': 1}),
                         *(through.send(queue, {'n': n}) for n in range(20)))
    assert batches == [20]
    assert (proxy.lost, proxy.requests) == (1, 2)  # the pipeline, sent again by redis-py
    assert await direct.client.xlen(direct.stream_key(queue)) == 20


async def test_scripts_missing_on_the_server_are_loaded_for_a_pipeline(
        own_redis: RedisServer, batches: list[int]) -> None:
    broker = RedisBroker(own_redis.dsn, prefix='t:')
    queue = Queue(unique()).name
    try:
        await broker.send(queue, {'n': 0})
        await broker.client.script_flush()  # as after a restart of Redis
        await asyncio.gather(*(broker.send(queue, {'n': n}) for n in range(1, 11)))
        assert batches == [9]
        assert sorted(b['n'] for b in await bodies(broker, queue)) == list(range(11))
    finally:
        await broker.close()
