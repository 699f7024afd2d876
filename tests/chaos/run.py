"""One chaos run on one broker: produce during faults, drain, count, then the sub-runs."""

import asyncio
import json
import random
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent_mq import Queue
from microagent_mq.broker import AbstractQueueBroker

from ..faults import FaultProxy
from .cluster import Backend, NatsBackend, RabbitBackend, RedisBackend, Workers
from .record import Fault, Outcome, ends, read_lines, report

SETTLE_S = 15.0  # after the drain: longer than a visibility timeout, so late copies show
SUB_RUN_TIMEOUT_S = 45.0
VICTIM_MIN_AGE_S = 5.0
FAULTS = ['sigkill', 'sigterm', 'cut', 'cut', 'latency', 'lost_reply']  # cuts weigh double

POISON = {  # label -> a body no handler of ``n: int`` can take
    'not_json': b'not json at all',
    'array': b'[1, 2, 3]',
    'number': b'42',
    'invalid_utf8': b'{"n": "\xff\xfe"}',
    'empty': b'',
    'truncated': b'{"n": 12',
    'missing_arg': b'{"m": 1}',
    'unexpected_arg': b'{"n": 3000001, "extra": true}',
}
FOREIGN_COUNT = 20
FOREIGN_BASE = 4_000_000


@dataclass
class Settings:
    broker: str = 'redis'
    messages: int = 10_000
    workers: int = 3
    concurrency: int = 8
    duration_s: float = 60.0
    restarts: int = 2
    drain_timeout_s: float = 300.0
    seed: int | None = None


async def chaos(settings: Settings, folder: Path) -> dict[str, Any]:
    """Run it all on ``settings.broker``; returns the report (JSON-able)."""
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    backends: dict[str, type[Backend]] = {'redis': RedisBackend, 'amqp': RabbitBackend,
                                          'nats': NatsBackend}
    backend = backends[settings.broker](folder)
    started = time.monotonic()
    await asyncio.to_thread(backend.start)
    server_start_s = time.monotonic() - started
    try:
        async with FaultProxy(backend.port) as proxy:
            result = await _run(settings, folder, backend, proxy)
    finally:
        await asyncio.to_thread(backend.stop)
    result['server_start_s'] = round(server_start_s, 1)
    return result


async def _run(settings: Settings, folder: Path, backend: Backend,
               proxy: FaultProxy) -> dict[str, Any]:
    base = f'chaos_{uuid.uuid4().hex[:8]}'
    names = [base, f'{base}_poison', f'{base}_foreign']
    queues_file = folder / 'queues.json'
    queues_file.write_text(json.dumps({'queues': [{'name': name} for name in names]}))
    for name in names:
        Queue(name)
    records = folder / 'records'
    records.mkdir(exist_ok=True)
    workers = Workers(backend.dsn(proxy.port), queues_file, records,
                      {'CHAOS_QUEUE': base, 'CHAOS_CONCURRENCY': str(settings.concurrency)})
    direct = backend.broker()  # the checker reads directly, never through the proxy
    outcome = Outcome()
    rng = random.Random(settings.seed)
    try:
        for _ in range(settings.workers):
            workers.spawn()
        await workers.wait_ready()
        producing = asyncio.create_task(_produce(settings, backend.broker(proxy.port), base,
                                                 outcome, rng))
        await _fault_loop(settings, backend, proxy, workers, outcome, rng)
        faults_ended = time.monotonic()
        proxy.latency_s = 0.0
        await producing
        outcome.drain_s = await _drain(settings, direct, base, records, workers, outcome,
                                       faults_ended)
        await asyncio.sleep(SETTLE_S)
        outcome.dead = await _dead(direct, base)
        workers.reap()
        outcome.worker_deaths = len(workers.deaths)
        result = report(read_lines(records), outcome)
        result['worker_death_details'] = workers.deaths[:10]
        deaths_before = len(workers.deaths)
        result['poison'] = await _poison(backend, direct, f'{base}_poison', records)
        result['foreign'] = await _foreign(backend, direct, f'{base}_foreign', records)
        workers.reap()
        result['sub_run_worker_deaths'] = len(workers.deaths) - deaths_before
    finally:
        workers.stop_all()
        await direct.close()
    result['broker'] = backend.kind
    result['settings'] = settings.__dict__
    return result


async def _produce(settings: Settings, broker: AbstractQueueBroker, queue: str, outcome: Outcome,
                   rng: random.Random) -> None:
    """Send 0..N-1, singles and batches, paced over most of the fault period."""
    window_s = settings.duration_s * 0.8
    started, n = time.monotonic(), 0
    try:
        while n < settings.messages:
            size = 1 if rng.random() < 0.6 else rng.randint(2, 50)
            batch = list(range(n, min(n + size, settings.messages)))
            while True:
                try:
                    if len(batch) == 1:
                        await broker.send(queue, {'n': batch[0]})
                    else:
                        await broker.send_many(queue, [{'n': i} for i in batch])
                    break
                except Exception:  # any failure: retried, counted, never dropped
                    outcome.producer_errors += 1
                    outcome.retried_sends.update(batch)
                    await asyncio.sleep(0.2)
            outcome.sent.update(batch)
            n += len(batch)
            ahead_s = started + window_s * n / settings.messages - time.monotonic()
            if ahead_s > 0:
                await asyncio.sleep(ahead_s)
    finally:
        await broker.close()


async def _fault_loop(settings: Settings, backend: Backend, proxy: FaultProxy, workers: Workers,
                      outcome: Outcome, rng: random.Random) -> None:
    """A fault every 1-3 s for the duration; broker restarts at even intervals."""
    end = time.monotonic() + settings.duration_s
    restarts = [time.monotonic() + settings.duration_s * (i + 1) / (settings.restarts + 1)
                for i in range(settings.restarts)]
    deck: list[str] = []
    while time.monotonic() < end:
        await asyncio.sleep(rng.uniform(1, 3))
        workers.reap()
        proxy.latency_s = 0.0
        if restarts and time.monotonic() >= restarts[0]:
            restarts.pop(0)
            began = time.time()
            await asyncio.to_thread(backend.restart)
            outcome.faults.append(Fault('broker_restart', began, until=time.time()))
            continue
        if not deck:  # shuffled rounds: every kind comes up, even in a short run
            deck = rng.sample(FAULTS, len(FAULTS))
        kind = deck.pop()
        # A victim that has been consuming a while (one still starting holds no message).
        victims = workers.running(VICTIM_MIN_AGE_S) or workers.running()
        if kind == 'sigkill':  # one in a handler, when there is one: it measures redelivery
            victims = workers.busy(victims) or victims
        if kind in ('sigkill', 'sigterm') and not victims:
            kind = 'cut'  # every worker is on its way down already
        pid = rng.choice(victims) if kind in ('sigkill', 'sigterm') else 0
        outcome.faults.append(Fault(kind, time.time(), pid))
        if kind in ('sigkill', 'sigterm'):
            workers.signal(pid, signal.SIGKILL if kind == 'sigkill' else signal.SIGTERM)
            workers.spawn()
        elif kind == 'cut':
            proxy.cut()
        elif kind == 'latency':
            proxy.latency_s = rng.uniform(0.02, 0.2)  # until the next fault
        else:
            proxy.lose_next_reply()


async def _drain(settings: Settings, direct: AbstractQueueBroker, queue: str, records: Path,
                 workers: Workers, outcome: Outcome, since: float) -> float | None:
    """Seconds from the end of the faults until every sent message was handled or dead."""
    deadline = since + settings.drain_timeout_s
    while time.monotonic() < deadline:
        workers.reap()
        missing = outcome.sent - set(ends(read_lines(records)))
        if not missing or not missing - set(await _dead(direct, queue)):
            return time.monotonic() - since
        await asyncio.sleep(1)
    return None


async def _dead(direct: AbstractQueueBroker, queue: str) -> dict[int, str]:
    """Dead letters of ``queue`` by ``n`` (bodies that are no message of ours are skipped)."""
    dead: dict[int, str] = {}
    for letter in await direct.dead_letters(queue, limit=1_000_000):
        try:
            dead[int(json.loads(letter.body)['n'])] = letter.error
        except (ValueError, KeyError, TypeError):
            continue
    return dead


async def _poison(backend: Backend, direct: AbstractQueueBroker, queue: str,
                  records: Path) -> dict[str, str]:
    """Raw malformed bodies: each should be dead-lettered at once, with its reason."""
    await backend.write_raw(queue, list(POISON.values()), with_id=True)
    outcome: dict[str, str] = {}
    deadline = time.monotonic() + SUB_RUN_TIMEOUT_S
    while time.monotonic() < deadline and len(outcome) < len(POISON):
        letters = {letter.body: letter.error for letter in await direct.dead_letters(queue)}
        handled = {line.n for line in read_lines(records) if line.kind == 'poison'}
        for label, body in POISON.items():
            if body in letters:
                outcome[label] = f'dead-lettered: {letters[body][:100]}'
            elif label == 'unexpected_arg' and 3000001 in handled:
                outcome[label] = 'handled (extra argument ignored)'
        await asyncio.sleep(1)
    return {label: outcome.get(label, 'neither handled nor dead-lettered (stuck)') for label in POISON}


async def _foreign(backend: Backend, direct: AbstractQueueBroker, queue: str,
                   records: Path) -> dict[str, int]:
    """Plain JSON from a producer that is not this library: no id, no headers."""
    numbers = range(FOREIGN_BASE, FOREIGN_BASE + FOREIGN_COUNT)
    await backend.write_raw(queue, [json.dumps({'n': n}).encode() for n in numbers], with_id=False)
    deadline = time.monotonic() + SUB_RUN_TIMEOUT_S
    while True:
        done = ends(read_lines(records), 'foreign')
        dead = len(await direct.dead_letters(queue))
        if len(done) + dead >= FOREIGN_COUNT or time.monotonic() > deadline:
            break
        await asyncio.sleep(1)
    return {'written': FOREIGN_COUNT, 'handled': len(done), 'dead_letters': dead,
            'duplicates': sum(1 for h in done.values() if len(h) > 1),
            'stuck': FOREIGN_COUNT - len(done) - dead}
