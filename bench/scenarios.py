"""One scenario of one system, in this process: ``python -m bench.scenarios SYSTEM SCENARIO N``.

Prints one JSON line: the figures of that run.
"""

import asyncio
import gc
import resource
import sys
import time
from typing import Any

import orjson

from .systems import SYSTEMS, System, message


async def produce(system: System, n: int) -> dict[str, float]:
    start = time.perf_counter()
    for i in range(n):
        await system.send(message(i))
    return {'msg_per_s': n / (time.perf_counter() - start)}


async def publish(system: System, n: int) -> dict[str, float]:
    """N sends of items made beforehand: the cost of sending them, not of building them.

    Made 1,000 at a time, then frozen out of the garbage collector's sight: a dataclass
    instance is tracked by the collector where a dict of plain values is not, so the young
    collections during the sends would otherwise charge the objects' upkeep to the sends.
    """
    cpu = wall = 0.0
    for first in range(0, n, 1000):
        items = [system.item(i) for i in range(first, min(first + 1000, n))]
        gc.freeze()
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        for item in items:
            await system.send(item)
        cpu += time.process_time() - cpu_start
        wall += time.perf_counter() - wall_start
    gc.unfreeze()
    return {'msg_per_s': n / wall, 'cpu_us': cpu / n * 1e6}


async def send_many(system: System, n: int) -> dict[str, float]:
    items = [message(i) for i in range(n)]
    start = time.perf_counter()
    await system.send_many(items)
    return {'msg_per_s': n / (time.perf_counter() - start)}


async def end_to_end(system: System, n: int) -> dict[str, float]:
    await system.start_consumer()
    done = system.handled.expect(n)
    cpu = time.process_time()
    start = time.perf_counter()
    for i in range(n):
        await system.send(message(i))
    finished = await asyncio.wait_for(done, 120)
    return {'msg_per_s': n / (finished - start), 'cpu_us': _cpu_us(cpu, n)}


async def drain(system: System, n: int) -> dict[str, float]:
    for first in range(0, n, 1000):
        await system.send_many([message(i) for i in range(first, min(first + 1000, n))])
    done = system.handled.expect(n)
    cpu = time.process_time()
    start = time.perf_counter()
    await system.start_consumer()
    finished = await asyncio.wait_for(done, 120)
    return {'msg_per_s': n / (finished - start), 'rss_mb': _peak_rss_mb(),
            'cpu_us': _cpu_us(cpu, n)}


async def round_trip(system: System, n: int) -> dict[str, float]:
    await system.start_consumer()
    times = []
    for i in range(n):
        done = system.handled.expect(i + 1)
        start = time.perf_counter()
        await system.send(message(i))
        times.append(await asyncio.wait_for(done, 30) - start)
    times.sort()
    return {'p50_us': times[len(times) // 2] * 1e6, 'p99_us': times[int(len(times) * 0.99)] * 1e6}


def _cpu_us(since: float, n: int) -> float:
    """CPU microseconds per message in this process: steadier than wall time on a busy box."""
    return (time.process_time() - since) / n * 1e6


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SCENARIOS: dict[str, Any] = {
    'produce': produce, 'send_many': send_many, 'end_to_end': end_to_end, 'drain': drain,
    'round_trip': round_trip, 'publish': publish,
    # end to end on a queue with options, against the plain queue (``compared`` in __main__)
    'retention': end_to_end, 'priority': end_to_end,
}


async def main(system_name: str, scenario: str, n: int) -> dict[str, float]:
    system = SYSTEMS[system_name]()
    await system.setup()
    try:
        return dict(await SCENARIOS[scenario](system, n))
    finally:
        await system.teardown()


if __name__ == '__main__':
    use_uvloop = '--uvloop' in sys.argv
    args = [a for a in sys.argv[1:] if a != '--uvloop']
    runner_args: dict[str, Any] = {}
    if use_uvloop:
        import uvloop
        runner_args['loop_factory'] = uvloop.new_event_loop
    with asyncio.Runner(**runner_args) as runner:
        result = runner.run(main(args[0], args[1], int(args[2])))
    sys.stdout.write(orjson.dumps(result).decode() + '\n')
