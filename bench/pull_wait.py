"""``python -m bench.pull_wait``: how long ``receive(wait=w)`` takes on an empty queue.

The goal (issue 12): within ``w + 0.25`` s on every broker. Prints, per broker and ``w``,
the median and the worst overshoot over ``ROUNDS`` receives. Needs Redis and RabbitMQ on
127.0.0.1 (a broker whose server is down is skipped).
"""

import asyncio
import statistics
import sys
import time
import uuid

from microagent_mq import Queue
from microagent_mq.broker import AbstractQueueBroker

ROUNDS = 10
WAITS = (0.0, 0.5, 1.0)
GOAL_S = 0.25


def make(kind: str) -> AbstractQueueBroker:
    if kind == 'memory':
        from microagent_mq.tools.memory import MemoryBroker

        return MemoryBroker('memory://bench')
    if kind == 'redis':
        from microagent_mq.tools.redis import RedisBroker

        return RedisBroker('redis://127.0.0.1:6379/15', prefix=f'bench:{uuid.uuid4().hex[:8]}:')
    from microagent_mq.tools.amqp import AMQPBroker

    return AMQPBroker('amqp://guest:guest@127.0.0.1:5672/')


async def measure(kind: str) -> bool:
    broker = make(kind)
    queue = Queue(f'bench_pull_{uuid.uuid4().hex[:8]}')
    ok = True
    try:
        await broker.receive(queue.name)  # connect and declare outside the measure
        for wait in WAITS:
            over = []
            for _ in range(ROUNDS):
                began = time.monotonic()
                await broker.receive(queue.name, wait=wait)
                over.append(time.monotonic() - began - wait)
            worst = max(over)
            ok &= worst <= GOAL_S
            print(f'{kind:7} wait={wait:<4} overshoot median {statistics.median(over) * 1000:6.1f} ms, '
                  f'worst {worst * 1000:6.1f} ms {"ok" if worst <= GOAL_S else "OVER GOAL"}')
    except OSError as exc:
        print(f'{kind:7} skipped: {exc}')
    finally:
        if kind == 'amqp':  # a shared server: leave no queue behind
            channel = await (await broker.connection()).channel()  # type: ignore[attr-defined]
            for name in (queue.name, f'{queue.name}.dlq'):
                await channel.queue_delete(name)
            await channel.close()
        await broker.close()
    return ok


async def main() -> int:
    ok = True
    for kind in ('memory', 'redis', 'amqp'):
        ok &= await measure(kind)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(asyncio.run(main()))
