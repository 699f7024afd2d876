"""Faults: a relay SIGKILLed between publish and mark, two relays at once, the broker down."""

import asyncio
import collections
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from microagent_mq import MicroAgent, Queue, consumer
from microagent_mq.outbox import Outbox, OutboxRelay
from microagent_mq.tools.redis import RedisBroker

from .conftest import REDIS_DSN, cleanup, require_server, unique, wait_until
from .outbox_support import Proxy, RecordingBroker, db_url

ROOT = Path(__file__).resolve().parent.parent
TOTAL = 1000


@pytest.fixture(params=['sqlite', 'postgres'])
async def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Outbox]:
    engine = create_async_engine(db_url(request.param, tmp_path))
    box = Outbox(engine, table=unique('mq_outbox'))
    await box.create()
    yield box
    await box.drop()
    await engine.dispose()


async def fill(outbox: Outbox, queue: str, total: int, per_transaction: int = 100) -> None:
    for start in range(0, total, per_transaction):
        async with AsyncSession(outbox.engine) as session, session.begin():
            for n in range(start, min(start + per_transaction, total)):
                await outbox.add(session, queue, {'n': n})


class Relays:
    """Relay subprocesses (tests/outbox_relay_worker.py); every one is killed at the end."""

    def __init__(self, outbox: Outbox, namespace: str, queue: str) -> None:
        url = outbox.engine.url.render_as_string(hide_password=False)
        self.args = [sys.executable, '-m', 'tests.outbox_relay_worker', url, outbox.table.name,
                     namespace, queue]
        self.procs: list[asyncio.subprocess.Process] = []
        self.sent = 0  # 'sent' lines read: messages published by some relay

    async def start(self) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(*self.args, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        self.procs.append(proc)
        assert await self.line(proc) == 'ready'
        return proc

    async def line(self, proc: asyncio.subprocess.Process) -> str:
        assert proc.stdout is not None
        return (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()

    async def kill_after(self, proc: asyncio.subprocess.Process, sends: int) -> None:
        """SIGKILL the relay once it published ``sends`` more messages (mid-pass: batch of 50)."""
        for _ in range(sends):
            if await self.line(proc) == 'sent':
                self.sent += 1
        proc.kill()
        await proc.wait()
        await self.drain(proc)  # what it wrote before it died

    async def drain(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            self.sent += line.strip() == b'sent'

    async def close(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.mark.redis
async def test_relay_killed_between_publish_and_mark_handled_exactly_once(outbox: Outbox) -> None:
    require_server('redis')
    namespace, queue = unique('ns'), Queue(unique('q'))
    handled: collections.Counter[int] = collections.Counter()

    class Agent(MicroAgent):
        @consumer(queue, idempotent=True)
        async def handle(self, n: int) -> None:
            handled[n] += 1

    broker = RedisBroker(REDIS_DSN, prefix=f'test:{namespace}:')
    agent = Agent(broker=broker)
    relays = Relays(outbox, namespace, queue.name)
    await fill(outbox, queue.name, TOTAL)
    try:
        await agent.start()
        for _ in range(4):  # killed mid-pass, four times
            await relays.kill_after(await relays.start(), 20)
        last = await relays.start()
        await wait_until(lambda: _none_pending(outbox), timeout_s=60, what='every row published')
        last.send_signal(signal.SIGTERM)
        await relays.drain(last)
        assert await last.wait() == 0

        def settled() -> bool:
            duplicates = agent.info()['consumers'][0]['duplicates']
            return sum(handled.values()) + duplicates >= relays.sent

        await wait_until(settled, timeout_s=60, what='every published copy consumed')
        await wait_until(lambda: _length_is(broker, queue.name, 0), what='the queue to drain')
        duplicates = agent.info()['consumers'][0]['duplicates']
    finally:
        await relays.close()
        await agent.stop()
        await cleanup('redis', namespace, [broker])
    # Kills landed between publish and mark: copies were sent, and every one was skipped
    # (>=: a copy published in the instant before a kill may have gone unreported).
    assert relays.sent > TOTAL
    assert duplicates >= relays.sent - TOTAL
    assert sorted(handled) == list(range(TOTAL))
    assert set(handled.values()) == {1}  # exactly once each


async def _none_pending(outbox: Outbox) -> bool:
    return await outbox.pending() == 0


async def test_two_relays_never_publish_one_row_both(outbox: Outbox) -> None:
    """PostgreSQL: each pass locks its rows (SKIP LOCKED); SQLite: a pass takes the write lock."""
    Queue('q1')
    await fill(outbox, 'q1', 600)
    hub = f'memory://{unique("ns")}'
    brokers = [RecordingBroker(hub), RecordingBroker(hub)]
    relays = [OutboxRelay(outbox, b, batch_size=40) for b in brokers]

    async def drain(relay: OutboxRelay) -> None:
        while await relay.run_once():  # each pass waits on the database: the passes interleave
            pass

    await asyncio.gather(*(drain(r) for r in relays))
    first, second = (set(b.published) for b in brokers)
    assert not first & second
    assert len(first | second) == 600
    if outbox.dialect == 'postgresql':  # SQLite's busy wait may let one relay do everything
        assert first and second
    assert await outbox.pending() == 0


@pytest.mark.redis
async def test_broker_down_five_seconds_then_everything_published(outbox: Outbox) -> None:
    require_server('redis')
    namespace, queue = unique('ns'), Queue(unique('q'))
    proxy = Proxy(('127.0.0.1', 6379))
    await proxy.start()
    dsn = f'redis://127.0.0.1:{proxy.port}/{REDIS_DSN.rsplit("/", 1)[1]}'
    relay_broker = RedisBroker(dsn, prefix=f'test:{namespace}:', connect_timeout=0.5, send_retries=1)
    reader = RedisBroker(REDIS_DSN, prefix=f'test:{namespace}:')
    relay = OutboxRelay(outbox, relay_broker, poll_interval=0.05, retry_max=1.0)
    try:
        await relay.start()
        await fill(outbox, queue.name, 50, per_transaction=10)
        await wait_until(lambda: _length_is(reader, queue.name, 50), what='the first 50')
        await proxy.down()
        down_at = time.monotonic()
        await fill(outbox, queue.name, 50, per_transaction=10)
        # Down for 5 s, and long enough for the relay to fail a few passes.
        await wait_until(lambda: relay.failures >= 3 and time.monotonic() - down_at >= 5,
                         what='an outage of 5 s')
        assert await outbox.pending() == 50
        await proxy.up()
        await wait_until(lambda: _none_pending(outbox), what='the rows published after the outage')
        assert await reader.queue_length(queue.name) == 100
    finally:
        await relay.stop()
        await relay_broker.close()
        await proxy.close()
        await reader.close()
        await cleanup('redis', namespace, [])


async def _length_is(broker: RedisBroker, name: str, length: int) -> bool:
    return await broker.queue_length(name) == length
