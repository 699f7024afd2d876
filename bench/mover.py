"""How long the Redis delayed mover takes to move a backlog: ``python -m bench.mover [N]``.

N messages (default 10,000) are sent with a 1 ms delay and no consumer running; then the
mover starts and the time until none is left delayed is printed. Run it by hand.
"""

import asyncio
import sys
import time
import uuid
from typing import Any

from microagent_mq.testing import wait_until

from .systems import REDIS_DSN


async def main(n: int) -> None:
    from microagent_mq import Queue
    from microagent_mq.tools.redis import RedisBroker

    queue = Queue(f'mover_{uuid.uuid4().hex[:8]}').name
    broker = RedisBroker(REDIS_DSN, prefix=f'bench-mover-{uuid.uuid4().hex[:6]}:')
    for first in range(0, n, 1000):
        await broker.send_many(queue, [{'n': i} for i in range(first, min(first + 1000, n))],
                               delay=0.001)
    await asyncio.sleep(0.05)  # every one of them is due now
    started = time.perf_counter()
    broker._delayed.watch(queue)
    await wait_until(lambda: _none_delayed(broker, queue), timeout_s=600, interval_s=0.005)
    elapsed = time.perf_counter() - started
    moved = await broker.client.xlen(broker.stream_key(queue))
    print(f'{n:,} due messages moved in {elapsed:.2f} s ({moved:,} in the stream)')
    keys = [k async for k in broker.client.scan_iter(match=f'{broker.prefix}*')]
    if keys:
        await broker.client.delete(*keys)
    await broker.close()


async def _none_delayed(broker: Any, queue: str) -> bool:
    return not await broker.client.zcard(broker.delayed_key(queue))


if __name__ == '__main__':
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000))
