"""Where a send's CPU goes: ``python -m bench.profile_send SYSTEM SCENARIO N [SORT|-]``.

SCENARIO: ``produce`` (one sender awaiting each send) or ``concurrent`` (``SENDERS`` tasks,
each awaiting its own). Prints msg/s and CPU µs per message (``time.process_time``: this
process only, so the broker's work is not in it), then, unless SORT is ``-``, the top
functions of a cProfile of the same run (``SORT``: a ``pstats`` key, ``tottime`` by default).
SYSTEM: one of ``bench.systems``. The figures of a profiled run are cProfile's, not the
plain speed: compare them only with each other.
"""

import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

from .scenarios import SENDERS
from .systems import SYSTEMS, System, message


async def produce(system: System, n: int) -> None:
    for i in range(n):
        await system.send(message(i))


async def concurrent(system: System, n: int) -> None:
    async def sender(first: int) -> None:
        for i in range(first, n, SENDERS):
            await system.send(message(i))

    await asyncio.gather(*(sender(first) for first in range(SENDERS)))


def server_cpu_s() -> float:
    """CPU seconds RabbitMQ's ``beam.smp`` has used so far (0.0 when it is not found here)."""
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rsplit(')', 1)
        except OSError:
            continue
        if fields[0].endswith('(beam.smp'):
            utime, stime = fields[1].split()[11:13]
            return (int(utime) + int(stime)) / os.sysconf('SC_CLK_TCK')
    return 0.0


async def main(name: str, scenario: str, n: int, sort: str) -> None:
    system = SYSTEMS[name]()
    await system.setup()
    run = {'produce': produce, 'concurrent': concurrent}[scenario]
    try:
        await run(system, min(n, 500))  # warm: declarations, first-call costs
        profile = cProfile.Profile() if sort != '-' else None
        if profile is not None:
            profile.enable()
        start, cpu, server = time.perf_counter(), time.process_time(), server_cpu_s()
        await run(system, n)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        server = server_cpu_s() - server
        if profile is not None:
            profile.disable()
        print(f'{name} {scenario}: {n / wall:,.0f} msg/s, {cpu / n * 1e6:.1f} µs CPU/msg, '
              f'RabbitMQ {server / n * 1e6:.0f} µs CPU/msg'
              + (' (profiled)' if profile is not None else ''))
        if profile is not None:
            pstats.Stats(profile).sort_stats(sort).print_stats(45)
    finally:
        await system.teardown()


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]),
                     sys.argv[4] if len(sys.argv) > 4 else 'tottime'))
