"""The chaos workers' agent: ``microagent-mq run tests.chaos.agent:ChaosAgent``.

Configured by the environment the chaos run gives each worker: ``CHAOS_QUEUE`` (the main
queue; ``<it>_poison`` and ``<it>_foreign`` serve the sub-runs), ``CHAOS_RECORDS`` (a
folder), ``CHAOS_CONCURRENCY``. Every handling appends two lines to this process's record
file, outside the broker: ``S <kind> <n> <pid> <time>`` when it starts, ``E ...`` when it ends.
One ``os.write`` on an ``O_APPEND`` descriptor per line: a SIGKILL never leaves half a line.
"""

import asyncio
import os
import random
import time
from pathlib import Path

from microagent_mq import MicroAgent, Queue, consumer

BASE = os.environ.get('CHAOS_QUEUE', 'chaos')
CONCURRENCY = int(os.environ.get('CHAOS_CONCURRENCY', '8'))
# A short handler timeout: a SIGKILLed worker's messages come back after the visibility
# timeout (handler timeout + 10 s on Redis today), which must fit in the run.
TIMEOUT_S = 2
_fd: int | None = None


def _record(mark: str, kind: str, n: int) -> None:
    global _fd
    if _fd is None:
        folder = Path(os.environ.get('CHAOS_RECORDS', '.'))
        _fd = os.open(folder / f'records-{os.getpid()}.log', os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.write(_fd, f'{mark} {kind} {n} {os.getpid()} {time.time():.6f}\n'.encode())


async def _handle(kind: str, n: int) -> None:
    _record('S', kind, n)
    await asyncio.sleep(random.uniform(0, 0.05))  # some work: messages are in flight when killed
    _record('E', kind, n)


class ChaosAgent(MicroAgent):
    """Records each handling; never fails by itself."""

    @consumer(Queue(BASE), timeout=TIMEOUT_S, concurrency=CONCURRENCY)
    async def main(self, n: int) -> None:
        await _handle('main', n)

    @consumer(Queue(f'{BASE}_poison'), timeout=TIMEOUT_S, concurrency=CONCURRENCY)
    async def poison(self, n: int) -> None:
        await _handle('poison', n)

    @consumer(Queue(f'{BASE}_foreign'), timeout=TIMEOUT_S, concurrency=CONCURRENCY)
    async def foreign(self, n: int) -> None:
        await _handle('foreign', n)
