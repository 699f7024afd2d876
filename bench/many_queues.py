"""Many queues, cheap idle (issue #18 item 5): ``python -m bench.many_queues`` (``make bench-queues``).

One agent with one consumer on each of ``--queues`` queues (default 200). For ``--idle``
seconds nothing is sent; the script reports the broker connections the process holds, its
CPU time as a % of one core and, on Redis, the commands per second the server counted
(``INFO commandstats`` deltas). Then ``--messages`` messages are sent spread over the queues
and the end-to-end throughput is printed.

Redis runs on a server of the script's own (a free port, ``redis-server`` from PATH), so
nobody else's commands are counted. RabbitMQ uses the shared server (127.0.0.1:5672) with
queues of unique names, deleted afterwards; its connections are counted on the broker
object (one aio-pika connection, channels under it).
"""

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from microagent_mq import MicroAgent, Queue, consumer
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.testing import wait_until

from .systems import AMQP_DSN


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def many_consumers(names: list[str], handled: list[int]) -> type[MicroAgent]:
    """An agent class with one consumer per queue of ``names``; each call counts itself."""

    def handler() -> Any:  # a function of its own per queue: @consumer marks the function
        async def handle(self: MicroAgent, n: int) -> None:
            handled[0] += 1
        return handle

    attrs: dict[str, Any] = {f'on_{i}': consumer(Queue(name), timeout=30)(handler())
                             for i, name in enumerate(names)}
    return type('ManyQueues', (MicroAgent,), attrs)


async def redis_figures(dsn: str, client_name: str, seconds: float) -> dict[str, Any]:
    """Commands/s counted by the server over ``seconds``, by command, and the connections
    other than the measuring one."""
    import redis.asyncio as aioredis

    probe = aioredis.Redis.from_url(dsn)
    await probe.client_setname(client_name)
    before = await probe.info('commandstats')
    started = time.monotonic()
    await asyncio.sleep(seconds)
    after = await probe.info('commandstats')
    elapsed = time.monotonic() - started
    clients = [c for c in await probe.client_list() if c.get('name') != client_name]
    await probe.aclose()
    per_command = {}
    for key, stats in after.items():
        calls = stats['calls'] - before.get(key, {}).get('calls', 0)
        if key in ('cmdstat_info',):  # the probe's own
            calls -= 1
        if calls > 0:
            per_command[key.removeprefix('cmdstat_')] = round(calls / elapsed, 1)
    return {'commands_per_s': round(sum(per_command.values()), 1),
            'by_command': dict(sorted(per_command.items(), key=lambda kv: -kv[1])),
            'connections': len(clients)}


async def run(kind: str, queues: int, idle_s: float, messages: int, dsn: str) -> dict[str, Any]:
    namespace = uuid.uuid4().hex[:8]
    names = [f'many_{namespace}_{i}' for i in range(queues)]
    broker: AbstractQueueBroker
    if kind == 'redis':
        from microagent_mq.tools.redis import RedisBroker

        broker = RedisBroker(dsn, prefix=f'bench-many-{namespace}:')
    else:
        from microagent_mq.tools.amqp import AMQPBroker

        broker = AMQPBroker(dsn)
    handled = [0]
    agent = many_consumers(names, handled)(broker=broker)
    result: dict[str, Any] = {'broker': kind, 'queues': queues}
    try:
        await agent.start()
        await asyncio.sleep(2.0)  # settle: first claims, group creation, channel opening
        cpu_before, wall_before = cpu_s(), time.monotonic()
        if kind == 'redis':
            result.update(await redis_figures(dsn, f'probe-{namespace}', idle_s))
        else:
            await asyncio.sleep(idle_s)
            result.update(amqp_connections(broker))
        result['idle_cpu_pct'] = round(100 * (cpu_s() - cpu_before)
                                       / (time.monotonic() - wall_before), 2)
        print(json.dumps(result), file=sys.stderr, flush=True)  # the idle part, come what may
        started = time.perf_counter()
        try:
            for i in range(messages):
                await broker.send(names[i % queues], {'n': i})
            await wait_until(lambda: handled[0] >= messages, timeout_s=300, interval_s=0.01)
        except Exception as exc:  # today's pool runs out past ~100 queues: say so, go on
            result['e2e_error'] = repr(exc)
        else:
            result['e2e_msg_per_s'] = round(messages / (time.perf_counter() - started))
        result['messages'] = messages
    finally:
        await agent.stop()
        await broker.close()
        if kind == 'amqp':
            await delete_amqp(dsn, names)
    return result


def amqp_connections(broker: Any) -> dict[str, Any]:
    """The AMQP connections and channels this broker holds (aio-pika's own counts)."""
    connection = broker._connection
    channels = len(getattr(getattr(connection, 'transport', None), 'connection', None).channels
                   ) if connection is not None and connection.transport else 0
    return {'connections': 1 if connection is not None and not connection.is_closed else 0,
            'channels': channels}


async def delete_amqp(dsn: str, names: list[str]) -> None:
    import aio_pika

    connection = await aio_pika.connect(dsn)
    async with connection:
        channel = await connection.channel()
        for name in names:
            for suffix in ('', '.dlq', '.bindings'):
                await channel.queue_delete(name + suffix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--brokers', nargs='*', default=['redis', 'amqp'])
    parser.add_argument('--queues', type=int, default=200)
    parser.add_argument('--idle', type=float, default=20.0, help='idle seconds measured')
    parser.add_argument('--messages', type=int, default=20_000)
    args = parser.parse_args()
    for kind in args.brokers:
        if kind == 'redis':
            from tests.servers import RedisServer

            with tempfile.TemporaryDirectory() as folder:
                server = RedisServer(Path(folder))
                server.start()
                try:
                    result = asyncio.run(run(kind, args.queues, args.idle, args.messages,
                                             server.dsn))
                finally:
                    server.kill()
        else:
            result = asyncio.run(run(kind, args.queues, args.idle, args.messages, AMQP_DSN))
        print(json.dumps(result), flush=True)


if __name__ == '__main__':
    sys.exit(main())
