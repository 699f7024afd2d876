"""Commit-to-handler latency of the outbox on PostgreSQL, LISTEN/NOTIFY against polling.

``python -m bench.outbox_latency [N] [--poll]``: N transactions one after another (default 300),
each adding one row; the time from the start of the commit to the handler's call, through an
``OutboxRelay`` whose poll interval is 5 s, so only NOTIFY explains a lower figure (``--poll``
uses a SQLite file instead: no NOTIFY, poll_interval 0.2 s, for comparison). Prints JSON.
"""

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid

from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from microagent_mq import MicroAgent, Queue, consumer
from microagent_mq.outbox import Outbox, OutboxRelay
from microagent_mq.tools.memory import MemoryBroker

PG_URL = os.environ.get('BENCH_PG_URL', 'postgresql+asyncpg://postgres@127.0.0.1:5432/test')


async def main(n: int, poll: bool) -> dict[str, float | str | int]:
    folder = tempfile.mkdtemp()
    url = f'sqlite+aiosqlite:///{folder}/bench.db' if poll else PG_URL
    engine = create_async_engine(url)
    outbox = Outbox(engine, table=f'mq_outbox_bench_{uuid.uuid4().hex[:8]}')
    await outbox.create()
    queue = Queue(f'latency_{uuid.uuid4().hex[:8]}')
    started: dict[int, float] = {}
    latencies: list[float] = []
    arrived = asyncio.Event()

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            latencies.append(time.perf_counter() - started[n])
            arrived.set()

    broker = MemoryBroker(f'memory://{queue.name}')
    relay = OutboxRelay(outbox, broker, poll_interval=0.2 if poll else 5.0)
    agent = Agent(broker=broker)
    try:
        await agent.start()
        await relay.start()
        for i in range(n):
            arrived.clear()
            async with AsyncSession(engine) as session:
                async with session.begin():
                    await outbox.add(session, queue.name, {'n': i})
                    started[i] = time.perf_counter()  # the commit starts as the block ends
            await asyncio.wait_for(arrived.wait(), 30)
    finally:
        await relay.stop()
        await agent.stop()
        await outbox.drop()
        await engine.dispose()
    ms = sorted(x * 1000 for x in latencies)
    return {'database': engine.dialect.name, 'messages': n, 'p50_ms': round(statistics.median(ms), 2),
            'p90_ms': round(ms[int(len(ms) * 0.9)], 2), 'max_ms': round(ms[-1], 2)}


if __name__ == '__main__':
    args = [a for a in sys.argv[1:] if not a.startswith('--')]
    print(json.dumps(asyncio.run(main(int(args[0]) if args else 300, '--poll' in sys.argv))))
