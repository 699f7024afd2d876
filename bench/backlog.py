"""``make bench-backlog``: a consumer's memory while it drains a backlog of a million messages.

``python -m bench.backlog [--brokers redis amqp] [--messages 1000000]``: fills a queue of a
unique name with ``send_many`` (batches of ``FILL_BATCH``), starts a consumer in a process of
its own (an agent with the default options: concurrency 1, prefetch 'auto'), waits until it has
handled every message, and reports that process's peak RSS (``ru_maxrss``) beside its RSS once
connected and consuming its first message, and the drain rate. Then deletes that queue (the
servers are shared: only what this run made). Issue #18, item 6: the peak must stay under
60 MB, bounded by the prefetch, not by the backlog.
"""

import argparse
import asyncio
import json
import subprocess
import sys
import time
import uuid
from typing import Any

from .scenarios import peak_rss_mb
from .systems import AMQP_DSN, REDIS_DSN, message

FILL_BATCH = 10_000
PREFIX = 'backlog:'


def make_broker(kind: str) -> Any:
    if kind == 'redis':
        from microagent_mq.tools.redis import RedisBroker
        return RedisBroker(REDIS_DSN, prefix=PREFIX)
    from microagent_mq.tools.amqp import AMQPBroker
    return AMQPBroker(AMQP_DSN)


async def fill(kind: str, queue: str, n: int) -> float:
    from microagent_mq import Queue
    Queue(queue)
    broker = make_broker(kind)
    start = time.perf_counter()
    try:
        for first in range(0, n, FILL_BATCH):
            await broker.send_many(queue, [message(i) for i in range(first, min(first + FILL_BATCH, n))])
    finally:
        await broker.close()
    return n / (time.perf_counter() - start)


async def consume(kind: str, queue: str, n: int) -> dict[str, float]:
    """In the child process: drain ``n`` messages of ``queue``; its figures."""
    from microagent_mq import MicroAgent, Queue, consumer
    declared = Queue(queue)
    count = 0
    first = asyncio.Event()
    done = asyncio.Event()

    class Drain(MicroAgent):
        @consumer(declared, timeout=30)
        async def handle(self, **data: Any) -> None:
            nonlocal count
            count += 1
            first.set()
            if count >= n:
                done.set()

    broker = make_broker(kind)
    agent = Drain(broker=broker)
    start = time.perf_counter()
    await agent.start()
    await first.wait()
    rss_started = peak_rss_mb()
    await done.wait()
    seconds = time.perf_counter() - start
    await agent.stop(grace=5)
    await broker.close()
    return {'handled': count, 'msg_per_s': count / seconds, 'rss_started_mb': rss_started,
            'peak_rss_mb': peak_rss_mb()}


async def delete(kind: str, queue: str) -> None:
    if kind == 'redis':
        import redis.asyncio as aioredis
        client = aioredis.Redis.from_url(REDIS_DSN)
        keys = [f'{PREFIX}{queue}', f'{PREFIX}{queue}.dlq', f'{PREFIX}{queue}:delayed']
        keys += [key async for key in client.scan_iter(match=f'{PREFIX}sent:*')]
        await client.delete(*keys)
        await client.aclose()
        return
    import aio_pika
    connection = await aio_pika.connect(AMQP_DSN)
    async with connection:
        channel = await connection.channel()
        for name in (queue, f'{queue}.dlq', f'{queue}.bindings'):
            await channel.queue_delete(name)


def run(kind: str, n: int) -> dict[str, Any]:
    queue = f'backlog_{uuid.uuid4().hex[:10]}'
    try:
        fill_rate = asyncio.run(fill(kind, queue, n))
        print(f'{kind}: {n:,} messages in {queue} ({fill_rate:,.0f} msg/s); draining', flush=True)
        out = subprocess.run([sys.executable, '-m', 'bench.backlog', '--consume', kind, queue, str(n)],
                             capture_output=True, text=True, timeout=1800, check=True)
        figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        asyncio.run(delete(kind, queue))
    figures.update(broker=kind, messages=n, fill_msg_per_s=fill_rate)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--brokers', nargs='*', default=['redis', 'amqp'])
    parser.add_argument('--messages', type=int, default=1_000_000)
    parser.add_argument('--consume', nargs=3, metavar=('BROKER', 'QUEUE', 'N'), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:
        kind, queue, n = args.consume
        print(json.dumps(asyncio.run(consume(kind, queue, int(n)))))
        return
    for kind in args.brokers:
        result = run(kind, args.messages)
        verdict = 'met' if result['peak_rss_mb'] < 60 else 'NOT met'
        print(f"{kind}: drained {result['handled']:,} at {result['msg_per_s']:,.0f} msg/s; consumer RSS "
              f"{result['rss_started_mb']:.1f} MB once consuming, peak {result['peak_rss_mb']:.1f} MB "
              f'(target < 60 MB: {verdict})', flush=True)


if __name__ == '__main__':
    main()
