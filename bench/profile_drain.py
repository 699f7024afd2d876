"""Where a drain's time goes: ``python -m bench.profile_drain SYSTEM N [SORT]``.

Fills a queue with N messages (not profiled), then profiles with cProfile from the
consumer's start until the N-th message was handled, and prints the top functions
(``SORT``: a ``pstats`` key, ``tottime`` by default). SYSTEM: one of ``bench.systems``.
"""

import asyncio
import cProfile
import pstats
import sys
import time

from .systems import SYSTEMS, message


async def main(name: str, n: int, sort: str) -> None:
    system = SYSTEMS[name]()
    await system.setup()
    try:
        for first in range(0, n, 1000):
            await system.send_many([message(i) for i in range(first, min(first + 1000, n))])
        done = system.handled.expect(n)
        profile = cProfile.Profile()
        profile.enable()
        start, cpu = time.perf_counter(), time.process_time()
        await system.start_consumer()
        finished = await asyncio.wait_for(done, 300)
        profile.disable()
        print(f'{name}: {n / (finished - start):,.0f} msg/s, '
              f'{(time.process_time() - cpu) / n * 1e6:.0f} µs CPU/msg (profiled)')
        pstats.Stats(profile).sort_stats(sort).print_stats(35)
    finally:
        await system.teardown()


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else 'tottime'))
