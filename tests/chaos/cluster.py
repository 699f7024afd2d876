"""The chaos run's moving parts: a broker server of its own, and worker processes."""

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from microagent_mq.broker import AbstractQueueBroker

from ..servers import NatsServer, RabbitNode, RedisServer

ROOT = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).parent / 'microagent-mq'


class Backend(ABC):
    """A broker server the run owns: restart it, write raw messages, read dead letters."""

    kind: str
    port: int

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def restart(self) -> None:
        """Blocking: the server goes down and comes back on the same port, data kept."""

    @abstractmethod
    def dsn(self, port: int | None = None) -> str:
        """The DSN of the server, or of ``port`` (a proxy in front of it)."""

    @abstractmethod
    def broker(self, port: int | None = None) -> AbstractQueueBroker: ...

    @abstractmethod
    async def write_raw(self, queue: str, bodies: list[bytes], with_id: bool) -> None:
        """Put ``bodies`` in ``queue`` as they are, bypassing the library's send."""


class RedisBackend(Backend):
    kind = 'redis'

    def __init__(self, folder: Path) -> None:
        self.server = RedisServer(folder / 'redis', aof=True)  # AOF: data survives restarts
        self.port = self.server.port

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.kill()

    def restart(self) -> None:
        self.server.restart()

    def dsn(self, port: int | None = None) -> str:
        return f'redis://127.0.0.1:{port or self.port}/0'

    def broker(self, port: int | None = None) -> AbstractQueueBroker:
        from microagent_mq.tools.redis import RedisBroker

        return RedisBroker(self.dsn(port))

    async def write_raw(self, queue: str, bodies: list[bytes], with_id: bool) -> None:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(self.dsn())
        for body in bodies:
            fields: dict[Any, Any] = {'body': body}
            if with_id:
                fields['id'] = uuid.uuid4().hex
            await client.xadd(f'mq:{queue}', fields)
        await client.aclose()


class RabbitBackend(Backend):
    kind = 'amqp'

    def __init__(self, folder: Path) -> None:
        self.node = RabbitNode(folder / 'rabbit')
        self.port = self.node.port

    def start(self) -> None:
        self.node.start()

    def stop(self) -> None:
        self.node.stop()

    def restart(self) -> None:
        self.node.stop_app()
        time.sleep(1)  # down for a moment: clients see refused connections, not a blip
        self.node.start_app()

    def dsn(self, port: int | None = None) -> str:
        return f'amqp://guest:guest@127.0.0.1:{port or self.port}/'

    def broker(self, port: int | None = None) -> AbstractQueueBroker:
        from microagent_mq.tools.amqp import AMQPBroker

        return AMQPBroker(self.dsn(port), send_timeout=60)

    async def write_raw(self, queue: str, bodies: list[bytes], with_id: bool) -> None:
        import aio_pika

        connection = await aio_pika.connect(self.dsn())
        async with connection:
            channel = await connection.channel()
            await channel.declare_queue(queue, durable=True)
            for body in bodies:
                message = aio_pika.Message(body, message_id=uuid.uuid4().hex if with_id else None,
                                           delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await channel.default_exchange.publish(message, queue)


class NatsBackend(Backend):
    kind = 'nats'

    def __init__(self, folder: Path) -> None:
        self.server = NatsServer(folder / 'nats')  # JetStream file store: data survives restarts
        self.port = self.server.port

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def restart(self) -> None:
        self.server.stop()  # graceful (SIGTERM): clients see their connections close
        time.sleep(1)  # down for a moment: clients see refused connections, not a blip
        self.server.start()

    def dsn(self, port: int | None = None) -> str:
        return f'nats://127.0.0.1:{port or self.port}'

    def broker(self, port: int | None = None) -> AbstractQueueBroker:
        from microagent_mq.tools.nats import NATSBroker

        return NATSBroker(self.dsn(port), send_timeout=60)

    async def write_raw(self, queue: str, bodies: list[bytes], with_id: bool) -> None:
        """Plain nats-py into the queue's stream (the workers declared it): ``with_id`` adds
        only JetStream's ``Nats-Msg-Id``, without it there are no headers at all."""
        import nats

        from microagent_mq.tools.nats_codec import MSG_ID, Names

        client = await nats.connect(self.dsn())
        try:
            js = client.jetstream()
            for body in bodies:
                headers = {MSG_ID: uuid.uuid4().hex} if with_id else None
                await js.publish(Names('mq').subject(queue), body, headers=headers)
        finally:
            await client.close()


class Workers:
    """``microagent-mq run`` processes; one that exits unsignalled is a death, and replaced."""

    def __init__(self, dsn: str, queues_file: Path, folder: Path, env: dict[str, str]) -> None:
        self.dsn, self.queues_file, self.folder = dsn, queues_file, folder
        self.env = {**os.environ, **env, 'CHAOS_RECORDS': str(folder)}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self.logs: dict[int, Path] = {}
        self.born: dict[int, float] = {}
        self.signalled: set[int] = set()
        self.deaths: list[str] = []

    def spawn(self) -> int:
        path = self.folder / f'worker-{time.time_ns()}.log'
        log = path.open('wb')
        proc = subprocess.Popen(
            [str(CLI), 'run', 'tests.chaos.agent:ChaosAgent', '--broker', self.dsn,
             '--queues', str(self.queues_file), '--grace', '5', '--log-level', 'INFO'],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs[proc.pid] = proc
        self.logs[proc.pid], self.born[proc.pid] = path, time.monotonic()
        return proc.pid

    async def wait_ready(self, timeout_s: float = 120) -> None:
        """Until every worker logged that it runs (its consumers are bound)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            logs = [p.read_text(errors='replace') for p in self.folder.glob('worker-*.log')]
            if sum('Running ChaosAgent' in text for text in logs) >= len(self.procs):
                return
            self.reap()
            await asyncio.sleep(0.2)
        raise RuntimeError('workers did not start; see worker-*.log')

    def busy(self, pids: list[int]) -> list[int]:
        """Those of ``pids`` with a handler running now (an ``S`` line not yet ended)."""
        found = []
        for pid in pids:
            path = self.folder / f'records-{pid}.log'
            if not path.exists():
                continue
            tail = path.read_bytes()[-4096:].decode(errors='replace').splitlines()[1:]
            starts = {line.split()[2] for line in tail if line.startswith('S main')}
            ends = {line.split()[2] for line in tail if line.startswith('E main')}
            if starts - ends:
                found.append(pid)
        return found

    def signal(self, pid: int, signum: int) -> None:
        self.signalled.add(pid)
        self.procs[pid].send_signal(signum)
        if signum == signal.SIGKILL:
            self.procs.pop(pid).wait()

    def reap(self) -> None:
        """Forget exited workers; an exit nobody asked for is a death, and a new one starts."""
        for pid, proc in list(self.procs.items()):
            if proc.poll() is None:
                continue
            del self.procs[pid]
            if pid not in self.signalled:
                last = self.logs[pid].read_text(errors='replace').strip().splitlines()[-1:]
                self.deaths.append(f'worker {pid} exited with {proc.returncode}: {last}')
                self.spawn()

    def running(self, min_age_s: float = 0.0) -> list[int]:
        """Workers alive and not signalled, started at least ``min_age_s`` ago."""
        now = time.monotonic()
        return [pid for pid, proc in self.procs.items()
                if proc.poll() is None and pid not in self.signalled
                and now - self.born[pid] >= min_age_s]

    def stop_all(self) -> None:
        for pid in list(self.procs):
            self.signalled.add(pid)
            self.procs[pid].terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
