"""Faults that are real: consumer processes killed with SIGKILL (connection cuts: test_faults)."""

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from microagent_mq import Queue
from microagent_mq.broker import AbstractQueueBroker

from .conftest import cleanup, make_broker, unique, wait_until

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=[pytest.param('redis', marks=pytest.mark.redis),
                        pytest.param('redis_cluster', marks=pytest.mark.redis_cluster),
                        pytest.param('amqp', marks=pytest.mark.amqp),
                        pytest.param('nats', marks=pytest.mark.nats),
                        pytest.param('amqp_quorum', marks=pytest.mark.amqp)])
def server_kind(request: pytest.FixtureRequest) -> str:
    if request.param == 'redis_cluster':
        request.getfixturevalue('redis_cluster_dsn')  # its DSN reaches the workers by env
    return str(request.param)


class Workers:
    """Consumer subprocesses for one test, all killed at the end."""

    def __init__(self, kind: str, namespace: str, queue: str, folder: Path) -> None:
        self.kind, self.namespace, self.queue, self.folder = kind, namespace, queue, folder
        self.procs: list[subprocess.Popen[str]] = []

    async def start(self, mode: str, **options: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            [sys.executable, '-m', 'tests.crash_worker', self.kind, self.namespace, self.queue,
             mode, str(self.folder), json.dumps(options)],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
        assert line.strip() == 'ready', f'worker did not start: {line!r}'
        return proc

    def started(self, n: int) -> list[Path]:
        return list(self.folder.glob(f'started-*-{n}'))

    def handled(self) -> list[int]:
        return [int(line) for f in self.folder.glob('handled-*') for line in f.read_text().split()]

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()


@pytest.fixture
async def setup(server_kind: str, tmp_path: Path) -> AsyncIterator[
        tuple[AbstractQueueBroker, Workers]]:
    namespace = unique('ns')
    queue = Queue(unique())
    broker = make_broker(server_kind, namespace)
    workers = Workers(server_kind, namespace, queue.name, tmp_path)
    yield broker, workers
    workers.kill_all()
    await broker.close()
    await cleanup(server_kind, namespace, [broker])


async def test_sigkill_mid_handler_message_goes_to_another_consumer(
        setup: tuple[AbstractQueueBroker, Workers]) -> None:
    broker, workers = setup
    options = {'timeout': 1, 'visibility_timeout': 2}
    doomed = await workers.start('hang', **options)
    await broker.send(workers.queue, {'n': 1})
    await wait_until(lambda: bool(workers.started(1)), what='handler started')
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    await workers.start('record', **options)
    await wait_until(lambda: workers.handled() == [1], timeout_s=30, what='message handled again')


async def test_max_attempts_holds_across_kills(
        setup: tuple[AbstractQueueBroker, Workers]) -> None:
    broker, workers = setup
    options = {'timeout': 1, 'visibility_timeout': 2, 'max_attempts': 2}
    await broker.send(workers.queue, {'n': 1})
    for kills in (1, 2):
        doomed = await workers.start('hang', **options)
        await wait_until(lambda k=kills: len(workers.started(1)) == k, timeout_s=30,
                         what=f'delivery {kills}')
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    await workers.start('record', **options)

    async def dead() -> bool:
        return len(await broker.dead_letters(workers.queue)) == 1

    await wait_until(dead, timeout_s=30, what='dead letter after two crashes')
    letter = (await broker.dead_letters(workers.queue))[0]
    assert letter.data == {'n': 1}
    assert 'max_attempts' in letter.error
    assert workers.handled() == []


async def test_two_processes_share_2000_messages(
        setup: tuple[AbstractQueueBroker, Workers]) -> None:
    broker, workers = setup
    await workers.start('record', concurrency=4)
    await workers.start('record', concurrency=4)
    for start in range(0, 2000, 500):
        await broker.send_many(workers.queue, [{'n': i} for i in range(start, start + 500)])
    await wait_until(lambda: len(workers.handled()) >= 2000, timeout_s=60, what='2000 handled')
    assert sorted(workers.handled()) == list(range(2000))
    assert await broker.queue_length(workers.queue) == 0
