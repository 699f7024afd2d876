"""Redis specifics: key layout, prefixes, failures of the server itself."""

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent_mq import BrokerUnavailable, MicroAgent, Queue, consumer
from microagent_mq.tools.redis import RedisBroker

from .conftest import REDIS_DSN, Calls, free_port, require_server, unique, wait_until


@pytest.fixture
async def redis_broker() -> AsyncIterator[RedisBroker]:
    """A RedisBroker on the test server with a prefix of its own, its keys deleted after."""
    require_server('redis')
    broker = RedisBroker(REDIS_DSN, prefix=f'test:{unique("ns")}:')
    yield broker
    await broker.close(grace=1)
    client: Any = broker.client
    keys = [k async for k in client.scan_iter(match=f'{broker.prefix}*')]
    if keys:
        await client.delete(*keys)
    await broker.close()


async def test_key_layout_and_fields(redis_broker: RedisBroker) -> None:
    Queue('mailer')
    await redis_broker.mailer.send({'user_id': 1})
    await redis_broker.mailer.send({'user_id': 2}, delay=60)
    client: Any = redis_broker.client
    p = redis_broker.prefix
    keys = sorted(k for k in await client.keys(f'{p}*') if b':sent:' not in k)
    assert keys == [f'{p}mailer'.encode(), f'{p}mailer:delayed'.encode()]
    [(_, fields)] = await client.xrange(f'{p}mailer')
    assert fields[b'body'] == b'{"user_id":1}'  # plain JSON: any producer can send
    assert set(fields) == {b'body', b'id', b'ts'}  # no headers field when there are none
    assert await client.zcard(f'{p}mailer:delayed') == 1
    assert await redis_broker.queue_length('mailer') == 1  # the delayed one is not due


async def test_prefixes_keep_applications_apart() -> None:
    require_server('redis')
    Queue('shared_name')
    first = RedisBroker(REDIS_DSN, prefix=f'{unique("a")}:')
    second = RedisBroker(REDIS_DSN, prefix=f'{unique("b")}:')
    try:
        await first.shared_name.send({'n': 1})
        await first.shared_name.send({'n': 2})
        assert await first.shared_name.length() == 2
        assert await second.shared_name.length() == 0
    finally:
        for broker in (first, second):
            await broker.client.delete(broker.stream_key('shared_name'))
            await broker.close()


async def test_unreachable_redis_raises_within_bounded_time() -> None:
    Queue('mailer')
    broker = RedisBroker(f'redis://127.0.0.1:{free_port()}/0', send_retries=2,
                         connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable, match=r'Redis at redis://127\.0\.0\.1:\d+/0'):
        await broker.mailer.send({'a': 1})
    assert time.monotonic() - started < 10
    await broker.close()


@pytest.fixture
def own_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[int, Any]]:
    """A Redis server of this test's own, so that killing it disturbs nobody else."""
    extra = list(getattr(request, 'param', []))
    binary = shutil.which('redis-server')
    if binary is None:
        if os.environ.get('CI') == 'true':
            pytest.fail('redis-server is not installed (CI=true: this test must run)')
        pytest.skip('redis-server is not installed')
    port = free_port()

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([binary, '--port', str(port), '--bind', '127.0.0.1', '--save', '',
                                 '--appendonly', 'no', '--dir', str(tmp_path), *extra],
                                stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(('127.0.0.1', port), timeout=0.2).close()
                return proc
            except OSError:
                time.sleep(0.05)
        raise RuntimeError('redis-server did not start')

    procs = [start()]

    def restart() -> None:
        procs[-1].kill()
        procs[-1].wait()
        procs.append(start())

    yield port, restart
    for proc in procs:
        proc.kill()
        proc.wait()


async def test_consumer_survives_a_redis_restart(own_redis: tuple[int, Any]) -> None:
    port, restart = own_redis
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})

    dsn = f'redis://127.0.0.1:{port}/0'
    consuming, sending = RedisBroker(dsn), RedisBroker(dsn)
    agent = Agent(broker=consuming)
    await agent.start()
    await sending.send(queue.name, {'n': 1})
    await calls.wait_for(1)
    await asyncio.to_thread(restart)  # the data is gone with it: the group must come back
    await sending.send(queue.name, {'n': 2})  # its scripts are gone too: loaded again
    await sending.send_many(queue.name, [{'n': n} for n in range(3, 6)])
    await wait_until(lambda: sorted({c['n'] for c in calls.items}) == [1, 2, 3, 4, 5],
                     timeout_s=30, what='messages after the restart')
    await agent.stop(grace=1)
    await sending.close()


@pytest.mark.parametrize('own_redis', [['--requirepass', 's3cret']], indirect=True)
async def test_password_in_dsn_works_and_stays_secret(own_redis: tuple[int, Any],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    port, _ = own_redis
    Queue('mailer')
    broker = RedisBroker(f'redis://:s3cret@127.0.0.1:{port}/0')
    await broker.mailer.send({'a': 1})
    assert await broker.mailer.length() == 1
    await broker.close()
    wrong = RedisBroker(f'redis://:wrong-s3cret@127.0.0.1:{port}/0', send_retries=0)
    with pytest.raises(BrokerUnavailable, match=r'redis://:\*\*\*@127') as raised:
        await wrong.mailer.send({'a': 1})
    assert 'wrong-s3cret' not in str(raised.value)
    assert 'wrong-s3cret' not in repr(wrong) and 'wrong-s3cret' not in caplog.text
    await wrong.close()


async def test_buffered_messages_stay_with_a_live_consumer_past_visibility() -> None:
    """A live consumer renews its hold on a heartbeat: what waits in its buffer longer than
    the visibility timeout is neither taken over nor handled twice."""
    require_server('redis')
    queue = Queue(unique())
    handled: list[tuple[str, int]] = []
    prefix = f'test:{unique("ns")}:'

    def agent_class(name: str) -> type[MicroAgent]:
        class Agent(MicroAgent):
            @consumer(queue, timeout=1, visibility_timeout=1.5, prefetch=8)
            async def handle(self, n: int) -> None:
                handled.append((name, n))
                await asyncio.sleep(0.6)  # work: the rest of the batch waits in the buffer

        return Agent

    first = RedisBroker(REDIS_DSN, prefix=prefix)
    second = RedisBroker(REDIS_DSN, prefix=prefix)
    await first.send_many(queue.name, [{'n': n} for n in range(5)])
    slow = agent_class('first')(broker=first)
    await slow.start()  # fetches all five in one batch
    await wait_until(lambda: len(handled) == 1, what='first message')
    other = agent_class('second')(broker=second)
    await other.start()  # would take over what idles past 1.5 s, were it not renewed
    await wait_until(lambda: sorted(n for _, n in handled) == [0, 1, 2, 3, 4], timeout_s=30,
                     what='every message once')
    await wait_until(lambda: _length_zero(first, queue.name), what='all acknowledged')
    assert len(handled) == 5
    assert {name for name, _ in handled} == {'first'}
    await slow.stop(grace=5)
    await other.stop(grace=5)
    keys = [k async for k in first.client.scan_iter(match=f'{prefix}*')]
    await first.client.delete(*keys)
    await first.close()


async def _length_zero(broker: RedisBroker, name: str) -> bool:
    client: Any = broker.client
    summary = await client.xpending(broker.stream_key(name), 'microagent_mq')
    return int(summary['pending']) == 0 and await broker.queue_length(name) == 0


@pytest.mark.parametrize('own_redis', [['--requirepass', 's3cret']], indirect=True)
async def test_password_in_dsn_query_stays_secret(own_redis: tuple[int, Any],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Item 15: ``?password=`` never shows in repr, info(), errors or logs."""
    port, _ = own_redis
    queue = Queue(unique())
    broker = RedisBroker(f'redis://127.0.0.1:{port}/0?password=s3cret')
    await broker.send(queue.name, {'a': 1})
    assert await broker.queue_length(queue.name) == 1
    assert 's3cret' not in repr(broker) and 's3cret' not in str(broker.info())
    await broker.close()
    wrong = RedisBroker(f'redis://127.0.0.1:{port}/0?password=wrong-s3cret', send_retries=0)
    with pytest.raises(BrokerUnavailable, match=r'password=\*\*\*') as raised:
        await wrong.send(queue.name, {'a': 1})

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, a: int) -> None:
            pass

    with pytest.raises(BrokerUnavailable) as on_bind:
        await Agent(broker=wrong).start()
    for text in (str(raised.value), str(on_bind.value), repr(wrong), str(wrong.info()),
                 caplog.text):
        assert 's3cret' not in text
    await wrong.close()
