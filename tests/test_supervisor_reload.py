"""``--reload`` must not race the supervisor's own restart of a dead worker (found in review)."""

import asyncio
import sys
from pathlib import Path

import pytest

from microagent_mq.cli.supervisor import Supervisor, Worker

from .conftest import wait_until

SLEEPER = 'import time; time.sleep(120)'  # dies of the SIGTERM a restart sends


async def test_a_reload_starts_one_process_per_worker(tmp_path: Path) -> None:
    supervisor = Supervisor([], 2, grace=5)
    spawned: list[asyncio.subprocess.Process] = []

    async def spawn(worker: Worker) -> None:  # a stand-in worker process owned by this test
        worker.status_file = tmp_path / f'worker-{worker.index}.json'
        worker.proc = await asyncio.create_subprocess_exec(sys.executable, '-c', SLEEPER)
        spawned.append(worker.proc)

    supervisor._spawn = spawn  # type: ignore[method-assign]
    for worker in supervisor.workers:
        await spawn(worker)
    supervising = asyncio.create_task(supervisor._supervise())
    try:
        await supervisor._restart_all()  # what a changed *.py file triggers
        # The restart's 2 new workers, plus any the supervisor spawned on its own.
        try:
            await wait_until(lambda: len(spawned) > 4, timeout_s=3, what='a duplicate spawn')
        except pytest.fail.Exception:
            pass
        alive = [p for p in spawned if p.returncode is None]
        tracked = {w.proc for w in supervisor.workers}
        assert len(spawned) == 4
        assert set(alive) <= tracked, f'{len(alive)} workers alive, {len(tracked)} supervised'
    finally:
        supervisor._stopping = True
        while not supervising.done():  # kill what this test started, a late spawn included
            for proc in spawned:
                if proc.returncode is None:
                    proc.kill()
            supervisor._wake.set()
            await asyncio.wait({supervising}, timeout=0.5)
        for proc in spawned:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
