"""A Redis link that stops answering (TCP stays up, no reply comes: a stalled proxy, a
frozen server) fails its command over instead of hanging it. The broker's pool aborts a
connection held past ``command_timeout`` (``tools/redis_pool``, which replaced redis-py's
timer per command) and redis-py sends the command again on a new connection."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from microagent_mq import BrokerUnavailable, Queue
from microagent_mq.tools.redis import RedisBroker

from .conftest import REDIS_DSN, require_server, unique, wait_until
from .faults import FaultProxy

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    require_server('redis')
    parts = urlsplit(REDIS_DSN)
    async with FaultProxy(parts.port or 6379, parts.hostname or '127.0.0.1') as proxy:
        yield proxy


def through(proxy: FaultProxy, prefix: str, **options: Any) -> RedisBroker:
    parts = urlsplit(REDIS_DSN)
    userinfo = parts.netloc.rpartition('@')[0]
    netloc = f'{userinfo}@127.0.0.1:{proxy.port}' if userinfo else f'127.0.0.1:{proxy.port}'
    return RedisBroker(parts._replace(netloc=netloc).geturl(), prefix=prefix, **options)


@pytest.fixture
async def direct() -> AsyncIterator[RedisBroker]:
    broker = RedisBroker(REDIS_DSN, prefix=f'test:{unique("ns")}:')
    yield broker
    client: Any = broker.client
    if keys := [k async for k in client.scan_iter(match=f'{broker.prefix}*')]:
        await client.delete(*keys)
    await broker.close()


async def bodies(broker: RedisBroker, queue: str) -> list[dict[str, Any]]:
    entries: Any = await broker.client.xrange(broker.stream_key(queue))
    return [orjson.loads(fields[b'body']) for _, fields in entries]


async def test_a_send_on_a_stalled_link_goes_again_on_a_new_one_and_is_stored_once(
        proxy: FaultProxy, direct: RedisBroker) -> None:
    broker = through(proxy, direct.prefix, command_timeout=0.5)
    queue = Queue(unique()).name
    try:
        await broker.send(queue, {'n': 0})  # connected, scripts loaded
        assert proxy.accepted == 1
        proxy.stall()
        sending = asyncio.create_task(broker.send(queue, {'n': 1}))
        # Without the pool's guard the send waits on the first connection for ever.
        await wait_until(lambda: proxy.accepted >= 2, what='the send on a new connection')
        proxy.resume()  # the stalled request reaches Redis too: its mark makes it a no-op
        await asyncio.wait_for(sending, 60)
        assert await bodies(direct, queue) == [{'n': 0}, {'n': 1}]
    finally:
        proxy.resume()
        await broker.close()


async def test_a_send_on_a_link_that_stays_stalled_raises_broker_unavailable(
        proxy: FaultProxy, direct: RedisBroker) -> None:
    broker = through(proxy, direct.prefix, command_timeout=0.3, send_retries=2)
    queue = Queue(unique()).name
    try:
        await broker.send(queue, {'n': 0})
        proxy.stall()
        with pytest.raises(BrokerUnavailable):
            await asyncio.wait_for(broker.send(queue, {'n': 1}), 60)  # not a hang
        assert proxy.accepted >= 3  # the first connection, then one per retry
    finally:
        proxy.resume()
        await broker.close(grace=1)
