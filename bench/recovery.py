"""Redis crash recovery at default settings: ``python -m bench.recovery [--rounds N]``.

A worker (``@consumer`` defaults: timeout 60 s, concurrency 1, prefetch 32) takes 10
messages and hangs in the first handler; it is SIGKILLed. Measured: seconds from the kill
until every one of the 10 was handled by another worker, (a) one already running beside
it, (b) one started right after the kill. Not a test: run it by hand (it takes a minute).
"""

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from .systems import REDIS_DSN

MESSAGES = 10


async def worker(mode: str, prefix: str, queue_name: str, folder: str) -> None:
    """A worker process: ``hang`` notes the message and hangs; ``record`` notes it handled."""
    from microagent_mq import MicroAgent, Queue, consumer
    from microagent_mq.tools.redis import RedisBroker

    queue, out = Queue(queue_name), Path(folder)

    class Worker(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            if mode == 'hang':
                (out / f'started-{n}').touch()
                await asyncio.sleep(3600)
            with (out / f'handled-{os.getpid()}').open('a') as file:
                file.write(f'{n}\n')

    agent = Worker(broker=RedisBroker(REDIS_DSN, prefix=prefix))
    await agent.start()
    print('ready', flush=True)
    await asyncio.Event().wait()  # until killed


def start(mode: str, prefix: str, queue: str, folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, '-m', 'bench.recovery', '--worker', mode, prefix,
                             queue, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == 'ready'
    return proc


def handled(folder: Path) -> set[int]:
    return {int(n) for f in folder.glob('handled-*') for n in f.read_text().split()}


def wait_for(condition: object, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.01)


def one_round(peer_running: bool) -> float:
    """Seconds from the SIGKILL until all messages were handled again."""
    import redis

    prefix, queue = f'bench-recovery:{uuid.uuid4().hex[:8]}:', f'q_{uuid.uuid4().hex[:8]}'
    client = redis.Redis.from_url(REDIS_DSN)
    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        try:
            procs.append(start('hang', prefix, queue, folder))
            from microagent_mq import Queue
            from microagent_mq.tools.redis import RedisBroker

            async def send() -> None:
                Queue(queue)
                broker = RedisBroker(REDIS_DSN, prefix=prefix)
                await broker.send_many(queue, [{'n': n} for n in range(MESSAGES)])
                await broker.close()

            asyncio.run(send())
            wait_for(lambda: (folder / 'started-0').exists(), 30)  # the rest: its buffer
            if peer_running:
                procs.append(start('record', prefix, queue, folder))
            procs[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            procs[0].wait()
            if not peer_running:
                procs.append(start('record', prefix, queue, folder))
            wait_for(lambda: handled(folder) == set(range(MESSAGES)), 300)
            return time.monotonic() - killed
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
            keys = list(client.scan_iter(match=f'{prefix}*'))
            if keys:
                client.delete(*keys)
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--worker', nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker(*args.worker))
        return
    for label, peer in (('peer already running', True), ('worker restarted', False)):
        times = [one_round(peer) for _ in range(args.rounds)]
        print(f'{label:22} median {statistics.median(times):5.1f} s  '
              f'(min {min(times):.1f}, max {max(times):.1f}, {args.rounds} rounds)', flush=True)


if __name__ == '__main__':
    main()
