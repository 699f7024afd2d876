"""Admin commands (``queues``, ``dlq list|requeue|purge``, ``purge``) on every broker, in process."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from microagent_mq import MicroAgent, Queue, Reject, consumer
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.cli import main

from .conftest import AMQP_DSN, REDIS_DSN, cleanup, delete_amqp_queues, require_server, unique, wait_until

KINDS = ['memory', pytest.param('redis', marks=pytest.mark.redis),
         pytest.param('amqp', marks=pytest.mark.amqp)]


@pytest.fixture(params=KINDS)
async def setup(request: pytest.FixtureRequest, tmp_path: Path
                ) -> AsyncIterator[tuple[AbstractQueueBroker, str, Path]]:
    """A broker with the CLI's own settings (default prefix), and a queues file of one queue."""
    kind = str(request.param)
    name = unique('admin')
    dsn = {'memory': f'memory://{name}', 'redis': REDIS_DSN, 'amqp': AMQP_DSN}[kind]
    if kind != 'memory':
        require_server(kind)
    from microagent_mq.factory import broker_from_dsn

    broker = broker_from_dsn(dsn)
    queues = tmp_path / 'queues.json'
    queues.write_bytes(orjson.dumps({'queues': [{'name': name}]}))
    yield broker, dsn, queues
    await broker.close(grace=1)
    if kind == 'redis':
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_DSN)
        await client.delete(f'mq:{name}', f'mq:{name}:delayed', f'mq:{name}.dlq')
        await client.aclose()
    elif kind == 'amqp':
        await delete_amqp_queues([name], [])
    await cleanup('memory', '', [])


async def cli(dsn: str, queues: Path, *args: str) -> tuple[int, Any]:
    """Run the command in a thread (it runs its own event loop); its exit code and JSON output."""
    import contextlib
    import io

    out = io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out):
            return main([*args, '--broker', dsn, '--queues', str(queues), '--log-level', 'ERROR'])

    code = await asyncio.to_thread(run)
    text = out.getvalue().strip()
    return code, orjson.loads(text) if '--json' in args and text else text


async def test_every_admin_command(setup: tuple[AbstractQueueBroker, str, Path]) -> None:
    broker, dsn, queues = setup
    queue = Queue(orjson.loads(queues.read_bytes())['queues'][0]['name'])

    class Rejecting(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            raise Reject(f'no {n}')

    agent = Rejecting(broker=broker)
    await agent.start()
    await broker.send_many(queue.name, [{'n': 1}, {'n': 2}, {'n': 3}])
    await wait_until(lambda: _dead_count(broker, queue.name, 3), what='three dead letters')
    await agent.stop()
    await broker.send_many(queue.name, [{'n': 10}, {'n': 11}])

    code, rows = await cli(dsn, queues, 'queues', '--json')
    assert code == 0
    row = next(r for r in rows if r['queue'] == queue.name)
    assert (row['ready'], row['dead']) == (2, 3)
    assert row['in_flight'] in (0, None) and row['delayed'] in (0, None)  # None: RabbitMQ cannot tell
    code, text = await cli(dsn, queues, 'queues')
    assert code == 0 and queue.name in text and text.splitlines()[0].startswith('QUEUE')

    code, letters = await cli(dsn, queues, 'dlq', 'list', queue.name, '--limit', '2', '--json')
    assert code == 0 and len(letters) == 2
    assert {letter['body']['n'] for letter in letters} <= {1, 2, 3}
    assert all(letter['attempts'] == 1 and letter['error'].startswith('rejected: no')
               and letter['failed_at'] for letter in letters)
    chosen = letters[0]

    code, result = await cli(dsn, queues, 'dlq', 'requeue', queue.name, '--id', chosen['id'], '--json')
    assert (code, result) == (0, {'queue': queue.name, 'requeued': 1})
    assert await broker.queue_length(queue.name) == 3
    remaining = await broker.dead_letters(queue.name)
    assert len(remaining) == 2 and chosen['id'] not in {letter.message_id for letter in remaining}

    code, _ = await cli(dsn, queues, 'dlq', 'purge', queue.name)
    assert code == 2  # no --yes: refused
    assert len(await broker.dead_letters(queue.name)) == 2
    code, result = await cli(dsn, queues, 'dlq', 'purge', queue.name, '--yes', '--json')
    assert (code, result) == (0, {'queue': queue.name, 'deleted': 2})
    assert await broker.dead_letters(queue.name) == []

    code, _ = await cli(dsn, queues, 'purge', queue.name)
    assert code == 2
    code, text = await cli(dsn, queues, 'purge', queue.name, '--yes')
    assert (code, text) == (0, f'deleted 3 message(s) from {queue.name}')
    assert await broker.queue_length(queue.name) == 0


async def test_requeue_without_ids_moves_every_letter(setup: tuple[AbstractQueueBroker, str, Path]) -> None:
    broker, dsn, queues = setup
    queue = Queue(orjson.loads(queues.read_bytes())['queues'][0]['name'])

    class Rejecting(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            raise Reject('no')

    agent = Rejecting(broker=broker)
    await agent.start()
    await broker.send_many(queue.name, [{'n': 1}, {'n': 2}])
    await wait_until(lambda: _dead_count(broker, queue.name, 2), what='two dead letters')
    await agent.stop()
    code, text = await cli(dsn, queues, 'dlq', 'requeue', queue.name)
    assert (code, text) == (0, f'requeued 2 dead letter(s) into {queue.name}')
    assert await broker.queue_length(queue.name) == 2


async def _dead_count(broker: AbstractQueueBroker, name: str, count: int) -> bool:
    return len(await broker.dead_letters(name)) == count


async def test_stats_count_in_flight_and_delayed_and_purge_spares_them(
        setup: tuple[AbstractQueueBroker, str, Path]) -> None:
    broker, dsn, queues = setup
    queue = Queue(orjson.loads(queues.read_bytes())['queues'][0]['name'])
    release, started, handled = asyncio.Event(), asyncio.Event(), []

    class Slow(MicroAgent):
        @consumer(queue, concurrency=1, prefetch=0)
        async def handle(self, n: int) -> None:
            started.set()
            await release.wait()
            handled.append(n)

    agent = Slow(broker=broker)
    await agent.start()
    await broker.send(queue.name, {'n': 0})
    await started.wait()
    await broker.send_many(queue.name, [{'n': 1}, {'n': 2}])
    await broker.send(queue.name, {'n': 3}, delay=60)
    amqp = broker.dsn.startswith('amqp')
    expected = (2, None, None, 0) if amqp else (2, 1, 1, 0)  # RabbitMQ cannot tell two of them
    await wait_until(lambda: _stats_are(broker, queue.name, expected), what=f'stats {expected}')
    code, result = await cli(dsn, queues, 'purge', queue.name, '--yes', '--json')
    assert (code, result) == (0, {'queue': queue.name, 'deleted': 2 if amqp else 3})
    stats = await broker.queue_stats(queue.name)
    assert (stats.ready, stats.in_flight) == (0, None if amqp else 1)
    release.set()
    await wait_until(lambda: handled == [0], what='the message in flight handled')
    await agent.stop()


async def _stats_are(broker: AbstractQueueBroker, name: str, expected: tuple[Any, ...]) -> bool:
    stats = await broker.queue_stats(name)
    return (stats.ready, stats.delayed, stats.in_flight, stats.dead) == expected
