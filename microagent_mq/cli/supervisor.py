"""``run --workers N`` / ``--reload``: worker processes under a supervisor.

Each worker is ``microagent-mq run`` itself (one process, every agent given). The supervisor
restarts a worker that dies (backoff doubling from 0.5 s to 30 s, reset once a worker has lived
a minute, each death logged with its exit status); SIGTERM/SIGINT go to every worker, which
drain their handlers (grace) and exit; a second SIGINT kills them. Exit status: 0 when every
worker stopped cleanly, 1 otherwise. ``--reload`` restarts all workers gracefully when a
``*.py`` file under the watched directories changes (watchfiles, the ``[reload]`` extra).
"""

import asyncio
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from .errors import EXIT_OK, EXIT_RUNTIME, CLIError
from .health import HealthServer
from .observe import AggregateMetrics

log = logging.getLogger('microagent_mq.cli')
BACKOFF_FIRST_S, BACKOFF_MAX_S, STABLE_AFTER_S = 0.5, 30.0, 60.0
KILL_AFTER_S = 10.0  # past the grace, a worker that has not exited is killed


class Worker:
    """One worker process slot: the process in it now, and its restart backoff."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.backoff = BACKOFF_FIRST_S
        self.status_file: Path | None = None


class Supervisor:
    """Starts ``count`` workers with ``worker_args`` and keeps them running until told to stop."""

    def __init__(self, worker_args: Sequence[str], count: int, grace: float | None,
                 reload_dirs: Sequence[str] = (), health_port: int | None = None,
                 metrics_port: int | None = None) -> None:
        self.worker_args = list(worker_args)
        self.workers = [Worker(i) for i in range(count)]
        self.grace = 30.0 if grace is None else grace
        self.reload_dirs = list(reload_dirs)
        self.health_port = health_port
        self._stopping = False
        self._forced = False
        self._failed = False
        self._wake = asyncio.Event()
        self._replacing: set[int] = set()  # pids a reload stops on purpose: not deaths
        self._reloading = False  # between a reload's stop of the old workers and its new ones
        self._status_dir = Path(tempfile.mkdtemp(prefix='microagent-mq-'))
        # --metrics-port: the workers record, the supervisor serves their aggregate.
        self._metrics = AggregateMetrics(metrics_port) if metrics_port is not None else None

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT and every worker has exited; the process exit status."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_signal, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self._on_signal, signal.SIGINT)
        health = HealthServer(self.health_port, self._ready) if self.health_port else None
        if health is not None:
            await health.start()
        if self._metrics is not None:
            self._metrics.start()
        watcher = asyncio.create_task(self._watch()) if self.reload_dirs else None
        try:
            for worker in self.workers:
                await self._spawn(worker)
            log.info('Supervising %d worker(s): %s', len(self.workers),
                     ', '.join(str(w.proc.pid) for w in self.workers if w.proc))
            await self._supervise()
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            if health is not None:
                await health.stop()
            if self._metrics is not None:
                self._metrics.close()
            for worker in self.workers:
                if worker.status_file is not None:
                    worker.status_file.unlink(missing_ok=True)
            try:
                self._status_dir.rmdir()
            except OSError:
                pass
        return EXIT_RUNTIME if self._failed else EXIT_OK

    def _on_signal(self, signum: int) -> None:
        if self._stopping:
            if signum == signal.SIGINT:  # a second Ctrl-C: no more waiting
                log.warning('Second SIGINT: killing the workers')
                self._forced = True
                self._signal_all(signal.SIGKILL)
            return
        log.info('%s: stopping %d worker(s) (grace %.1fs)', signal.Signals(signum).name,
                 len(self.workers), self.grace)
        self._stopping = True
        self._signal_all(signal.SIGTERM)
        self._wake.set()

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.proc.returncode is None:
                try:
                    worker.proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    async def _spawn(self, worker: Worker) -> None:
        worker.status_file = self._status_dir / f'worker-{worker.index}.json'
        worker.status_file.unlink(missing_ok=True)
        env = {**os.environ, 'MQ_SUPERVISED': '1', 'MQ_WORKER_INDEX': str(worker.index),
               'MQ_STATUS_FILE': str(worker.status_file)}
        if self._metrics is not None:
            env.pop('MQ_METRICS_PORT', None)  # the supervisor serves; workers only record
            env.update(self._metrics.worker_env())
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable, '-m', 'microagent_mq', *self.worker_args, env=env)
        worker.started_at = time.monotonic()

    async def _supervise(self) -> None:
        while True:
            running = {asyncio.ensure_future(w.proc.wait()): (w, w.proc) for w in self.workers
                       if w.proc is not None and w.proc.returncode is None}
            if not running and not self._reloading:
                return
            wake = asyncio.ensure_future(self._wake.wait())
            timeout = self.grace + KILL_AFTER_S if self._stopping else None
            done, pending = await asyncio.wait({*running, wake}, timeout=timeout,
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            self._wake.clear()
            if not done and self._stopping:
                log.error('Workers still running %.1fs after SIGTERM: killing them',
                          self.grace + KILL_AFTER_S)
                self._signal_all(signal.SIGKILL)
                self._failed = True
                continue
            for task in done:
                if task in running:
                    worker, proc = running[task]
                    if proc is worker.proc and proc.pid not in self._replacing:
                        await self._exited(worker)
                    # else: a reload replaced it; the reload already started its successor

    async def _exited(self, worker: Worker) -> None:
        assert worker.proc is not None
        code = worker.proc.returncode
        if self._metrics is not None:
            self._metrics.worker_exited(worker.proc.pid)
        if self._stopping:
            never_started = worker.status_file is None or not worker.status_file.exists()
            if code == -signal.SIGTERM and never_started:
                # Stopped while Python itself was starting: it consumed nothing.
                log.info('Worker %d (pid %d) stopped before it started', worker.index, worker.proc.pid)
            elif code != 0:
                self._failed = True
                log.error('Worker %d (pid %d) exited with status %s', worker.index,
                          worker.proc.pid, code)
            else:
                log.info('Worker %d (pid %d) stopped', worker.index, worker.proc.pid)
            return
        lived = time.monotonic() - worker.started_at
        if lived >= STABLE_AFTER_S:
            worker.backoff = BACKOFF_FIRST_S
        log.error('Worker %d (pid %d) died with status %s after %.1fs; restarting in %.1fs',
                  worker.index, worker.proc.pid, code, lived, worker.backoff)
        await asyncio.sleep(worker.backoff)
        worker.backoff = min(worker.backoff * 2, BACKOFF_MAX_S)
        if not self._stopping:
            await self._spawn(worker)

    async def _restart_all(self) -> None:
        log.info('Reloading: restarting %d worker(s)', len(self.workers))
        self._replacing = {w.proc.pid for w in self.workers if w.proc is not None}
        self._reloading = True
        self._signal_all(signal.SIGTERM)
        for worker in self.workers:
            if worker.proc is not None:
                try:
                    await asyncio.wait_for(worker.proc.wait(), self.grace + KILL_AFTER_S)
                except TimeoutError:
                    worker.proc.kill()
                    await worker.proc.wait()
        try:
            for worker in self.workers:
                if not self._stopping:
                    worker.backoff = BACKOFF_FIRST_S
                    await self._spawn(worker)
        finally:
            self._reloading = False
            self._wake.set()

    async def _watch(self) -> None:
        try:
            from watchfiles import awatch
        except ImportError:  # checked before start; here for type checkers
            return
        async for changes in awatch(*self.reload_dirs, watch_filter=_python_files):
            if self._stopping:
                return
            names = sorted({Path(path).name for _, path in changes})
            log.info('Changed: %s', ', '.join(names[:5]) + (' ...' if len(names) > 5 else ''))
            await self._restart_all()

    async def _ready(self) -> tuple[bool, dict[str, Any]]:
        workers: list[dict[str, Any]] = []
        for worker in self.workers:
            status: dict[str, Any] = {'index': worker.index, 'ready': False}
            alive = worker.proc is not None and worker.proc.returncode is None
            if alive and worker.status_file is not None and worker.status_file.exists():
                try:
                    status.update(orjson.loads(worker.status_file.read_bytes()))
                except (OSError, orjson.JSONDecodeError):
                    pass
            status['alive'] = alive
            workers.append(status)
        return all(w['ready'] and w['alive'] for w in workers), {'workers': workers}


def _python_files(change: Any, path: str) -> bool:
    return path.endswith('.py')


def check_reload_available() -> None:
    """``--reload`` needs watchfiles; say how to get it."""
    try:
        import watchfiles  # noqa: F401
    except ImportError as exc:
        raise CLIError("--reload needs watchfiles: pip install 'microagent-mq[reload]'") from exc
