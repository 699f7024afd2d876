"""``history``, ``replay`` and ``send --priority`` from the command line, on every broker."""

import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from microagent_mq.broker import AbstractQueueBroker

from .conftest import AMQP_DSN, REDIS_DSN, cleanup, delete_amqp_queues, require_server, unique
from .test_cli_admin import cli

KINDS = ['memory', pytest.param('redis', marks=pytest.mark.redis),
         pytest.param('amqp', marks=pytest.mark.amqp)]


@pytest.fixture(params=KINDS)
async def setup(request: pytest.FixtureRequest, tmp_path: Path
                ) -> AsyncIterator[tuple[AbstractQueueBroker, str, Path, str]]:
    """A broker with the CLI's settings, and a queues file of one retaining priority queue."""
    kind = str(request.param)
    name = unique('hist')
    dsn = {'memory': f'memory://{name}', 'redis': REDIS_DSN, 'amqp': AMQP_DSN}[kind]
    if kind != 'memory':
        require_server(kind)
    from microagent_mq import load_queues
    from microagent_mq.factory import broker_from_dsn

    queues = tmp_path / 'queues.json'
    queues.write_bytes(orjson.dumps({'queues': [{'name': name, 'retention': '1h', 'max_priority': 2}]}))
    load_queues(str(queues))
    broker = broker_from_dsn(dsn)
    yield broker, dsn, queues, name
    await broker.close(grace=1)
    if kind == 'redis':
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_DSN)
        keys = [key async for key in client.scan_iter(match=f'mq:{name}*')]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    elif kind == 'amqp':
        await delete_amqp_queues([name, f'{name}.journal'], [])
    await cleanup('memory', '', [])


async def test_send_with_priority_then_history_and_replay(
        setup: tuple[AbstractQueueBroker, str, Path, str]) -> None:
    broker, dsn, queues, name = setup
    before = time.time()
    assert (await cli(dsn, queues, 'send', name, '{"n": 1}'))[0] == 0
    assert (await cli(dsn, queues, 'send', name, '{"n": 2}', '--priority', '2'))[0] == 0
    code, rows = await cli(dsn, queues, 'history', name, '--json')
    assert code == 0
    assert [row['body'] for row in rows] == [{'n': 1}, {'n': 2}]  # in the order sent
    code, rows = await cli(dsn, queues, 'history', name, '--json', '--limit', '1')
    assert [row['body'] for row in rows] == [{'n': 1}]
    code, text = await cli(dsn, queues, 'history', name)
    assert text.count('sent_at=') == 2 and '{"n":2}' in text

    code, result = await cli(dsn, queues, 'replay', name, '--json', '--from-id', rows[0]['id'])
    assert (code, result) == (0, {'queue': name, 'replayed': 2})
    code, text = await cli(dsn, queues, 'replay', name, '--since', str(before), '--until',
                           str(before - 10))
    assert (code, text) == (0, f'replayed 0 message(s) into {name}')
    # taken by priority: the copy of 2 and 2 itself first, in the order they were sent
    received = await broker.receive(name, max_count=4, wait=5)
    assert [r.data['n'] for r in received] == [2, 2, 1, 1]
    for r in received:
        await r.ack()


async def test_bad_input_is_one_line(setup: tuple[AbstractQueueBroker, str, Path, str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    _, dsn, queues, name = setup
    assert (await cli(dsn, queues, 'send', name, '{"n": 1}', '--priority', '3'))[0] != 0
    with pytest.raises(SystemExit):
        await cli(dsn, queues, 'replay', name, '--since', 'yesterday')
    assert "'yesterday' is no time" in capsys.readouterr().err
