"""``microagent-mq outbox relay``: publishes, stops cleanly on SIGTERM, one-line errors."""

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from microagent_mq import Queue
from microagent_mq.outbox import Outbox
from microagent_mq.tools.redis import RedisBroker

from .conftest import REDIS_DSN, require_server, unique, wait_until

ROOT = Path(__file__).resolve().parent.parent


def relay_command(db: str, table: str, queues: Path, broker: str) -> list[str]:
    return [sys.executable, '-m', 'microagent_mq.cli', 'outbox', 'relay', '--db', db, '--table', table,
            '--broker', broker, '--queues', str(queues), '--poll-interval', '0.05']


@pytest.mark.redis
async def test_relay_publishes_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    require_server('redis')
    queue = unique('q')
    queues = tmp_path / 'queues.json'
    queues.write_text(json.dumps({'queues': [{'name': queue}]}))
    db = f'sqlite+aiosqlite:///{tmp_path}/app.db'
    engine = create_async_engine(db)
    outbox = Outbox(engine, 'mq_outbox')
    await outbox.create()
    Queue(queue)
    async with AsyncSession(engine) as session, session.begin():
        for n in range(5):
            await outbox.add(session, queue, {'n': n})
    reader = RedisBroker(REDIS_DSN)  # the CLI's broker uses the default prefix mq:
    proc = subprocess.Popen(relay_command(db, 'mq_outbox', queues, REDIS_DSN), cwd=ROOT,  # noqa: ASYNC220
                            stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    try:
        await wait_until(lambda: _length(reader, queue, 5), what='the relay to publish 5')
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        client = reader._client
        for key in (f'mq:{queue}', f'mq:{queue}:delayed', f'mq:{queue}.dlq'):
            if client is not None:
                await client.delete(key)
        await reader.close()
        await engine.dispose()
    assert proc.returncode == 0, err
    assert 'Outbox relay stopped after publishing 5 message(s)' in err
    assert 'Traceback' not in err


async def _length(broker: RedisBroker, queue: str, n: int) -> bool:
    return await broker.queue_length(queue) == n


def test_missing_table_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run(relay_command(f'sqlite+aiosqlite:///{tmp_path}/empty.db', 'mq_outbox',
                                          ROOT / 'queues.json', 'memory://x'),
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"microagent-mq: error: outbox table 'mq_outbox' does not exist in "
        f"sqlite+aiosqlite:///{tmp_path}/empty.db: await outbox.create(), or add outbox.table to your "
        f"migrations")
