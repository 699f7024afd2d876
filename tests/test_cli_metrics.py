"""``run --metrics-port``: metrics scraped over HTTP, from one process and from --workers N."""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from microagent_mq.cli.observe import Observers
from microagent_mq.middleware import MetricsMiddleware, TracingMiddleware
from microagent_mq.tools.memory import MemoryBroker

from .conftest import free_port, unique
from .test_cli_worker import poll

# Each worker process sends this mix to its own memory broker once it has started.
AGENTS = '''
from microagent_mq import MessageInfo, MicroAgent, Queue, consumer, on

MIX = ['ok', 'ok', 'once', 'fail', 'skip', 'skip', 'skip']


class Mixed(MicroAgent):
    @consumer(Queue.get('work'), max_attempts=2, predicate=lambda body: body['kind'] != 'skip',
              retry_delay=0.01, retry_delay_max=0.05)
    async def handle(self, kind: str, info: MessageInfo) -> None:
        if kind == 'fail' or (kind == 'once' and info.attempt == 1):
            raise RuntimeError(kind)

    @on('post_start')
    async def produce(self) -> None:
        await self.broker.send_many('work', [{'kind': kind} for kind in MIX])
'''
# For one MIX: ok x2 handled; once: retried then handled; fail: retried then dead-lettered;
# skip x3 filtered.
PER_WORKER = {'handled': 3, 'retried': 2, 'dead_lettered': 1, 'filtered': 3}


def scrape(port: int) -> dict[str, float]:
    """Messages per outcome of queue 'work', summed over whatever processes the endpoint shows."""
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == 'microagent_mq_messages_total' and sample.labels.get('queue') == 'work':
                outcome = sample.labels['outcome']
                counts[outcome] = counts.get(outcome, 0) + sample.value
    return counts


@pytest.mark.parametrize('workers', [1, 2])
def test_scraped_counts_after_a_known_mix(tmp_path: Path, workers: int) -> None:
    (tmp_path / 'queues.json').write_text(json.dumps({'queues': [{'name': 'work'}]}))
    (tmp_path / 'metrics_agents_mod.py').write_text(AGENTS)
    port = free_port()
    env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'MQ_METRICS_PORT': str(port)}
    env.pop('PROMETHEUS_MULTIPROC_DIR', None)
    proc = subprocess.Popen(
        [sys.executable, '-m', 'microagent_mq', 'run', 'metrics_agents_mod:Mixed', '--no-uvloop',
         '--broker', f'memory://{unique()}', '--workers', str(workers), '--grace', '5'],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    expected = {outcome: count * workers for outcome, count in PER_WORKER.items()}
    try:
        poll(lambda: scrape(port) == expected, what=f'scraped counts {expected}')
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert scrape(port) == {}  # the endpoint went away with the process that served it
    assert proc.returncode == 0, err


async def test_observers_install_the_middlewares_asked_for() -> None:
    broker = MemoryBroker(f'memory://{unique()}')
    Observers(broker, None, False)
    assert broker.middlewares == []
    Observers(broker, None, True)
    assert [type(m) for m in broker.middlewares] == [TracingMiddleware]
    Observers(broker, free_port(), False)
    assert type(broker.middlewares[-1]) is MetricsMiddleware
