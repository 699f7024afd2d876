"""The production worker: processes, signals, reload, --only, env, logs, health, errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from microagent_mq import __version__

from .conftest import REDIS_DSN, free_port, require_server, unique

pytestmark = pytest.mark.timeout(120)

AGENTS = '''
import asyncio, os, time
from microagent_mq import MicroAgent, Queue, consumer, on

LOG = os.environ['TEST_LOG']
FIRST, SECOND = Queue.get(os.environ['TEST_Q1']), Queue.get(os.environ['TEST_Q2'])


def record(line):
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, (line + '\\n').encode())
    finally:
        os.close(fd)


class Worker(MicroAgent):
    @consumer(FIRST, concurrency=4, timeout=5)  # a killed worker's messages return in 15 s
    async def first(self, n, pause=0.0):
        record(f'start {os.getpid()} {n}')
        await asyncio.sleep(pause)
        if n == -1:
            raise RuntimeError('boom')
        record(f'end {os.getpid()} {n}')

    @consumer(SECOND)
    async def second(self, n, pause=0.0):
        record(f'second {os.getpid()} {n}')


class Broken(MicroAgent):
    @on('pre_start')
    async def explode(self):
        raise RuntimeError('no database')
'''


class Project:
    """A temporary project: queues.json, an agents module, and a log its handlers append to."""

    def __init__(self, root: Path, broker: str) -> None:
        self.root, self.broker = root, broker
        self.q1, self.q2 = unique('w'), unique('w')
        self.log = root / 'handled.log'
        (root / 'queues.json').write_text(json.dumps(
            {'queues': [{'name': self.q1}, {'name': self.q2}]}))
        (root / 'test_agents_mod.py').write_text(AGENTS)
        self.env = {**os.environ, 'TEST_LOG': str(self.log), 'TEST_Q1': self.q1,
                    'TEST_Q2': self.q2, 'PYTHONUNBUFFERED': '1'}

    def cli(self, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, '-m', 'microagent_mq', *args], cwd=self.root,
                              env={**self.env, **(env or {})}, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, '-m', 'microagent_mq', 'run', 'test_agents_mod:Worker',
             '--broker', self.broker, '--no-uvloop', *args],
            cwd=self.root, env={**self.env, **(env or {})}, stderr=subprocess.PIPE, text=True)

    def lines(self, kind: str) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [line.split() for line in self.log.read_text().splitlines()
                if line.startswith(kind + ' ')]

    def send_many(self, queue: str, count: int, **extra: Any) -> None:
        code = (
            'import asyncio, sys\n'
            'from microagent_mq import load_queues\n'
            'from microagent_mq.factory import broker_from_dsn\n'
            'async def main():\n'
            '    load_queues("queues.json")\n'
            f'    broker = broker_from_dsn({self.broker!r})\n'
            f'    await broker.send_many({queue!r}, [{{"n": i, **{extra!r}}} for i in range({count})])\n'
            '    await broker.close()\n'
            'asyncio.run(main())\n')
        subprocess.run([sys.executable, '-c', code], cwd=self.root, check=True, timeout=60)


def poll(condition: Any, timeout: float = 60, what: str = 'condition') -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f'timed out waiting for {what}')
        time.sleep(0.05)


@pytest.fixture
def redis_project(tmp_path: Path) -> Iterator[Project]:
    require_server('redis')
    project = Project(tmp_path, REDIS_DSN)
    yield project
    import redis

    client = redis.Redis.from_url(REDIS_DSN)
    for name in (project.q1, project.q2):
        client.delete(f'mq:{name}', f'mq:{name}:delayed', f'mq:{name}.dlq')
    client.close()


def stop(proc: subprocess.Popen[str], signum: int = signal.SIGTERM, timeout: float = 60) -> str:
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=timeout)
    return err


# one process ----------------------------------------------------------------------------

def test_version(tmp_path: Path) -> None:
    project = Project(tmp_path, 'memory://')
    assert project.cli('--version').stdout.strip() == f'microagent-mq {__version__}'


@pytest.mark.parametrize(('args', 'message'), [
    (['length', 'x', '--log-level', 'verbose'], "argument --log-level: expected one of CRITICAL"),
    (['run', 'test_agents_mod:Worker', '--workers', '0'], 'argument --workers: expected 1 or more'),
    (['length', 'x', '--nope'], 'unrecognized arguments: --nope'),
    (['run', 'test_agents_mod:Worker', '--health-port', '70000'], 'expected a port from 0 to 65535'),
])
def test_usage_errors_are_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = Project(tmp_path, 'memory://').cli(*args)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith('microagent-mq: error: ') and message in line


def test_runtime_errors_are_one_line_exit_1(tmp_path: Path) -> None:
    project = Project(tmp_path, 'memory://')
    cases = [
        (['length', project.q1, '--broker', 'redis://localhost/abc'],
         "the path must be a database number, not 'abc'"),
        (['send', project.q1, '{"n": 1}', '--topic', 'a.b', '--broker', 'memory://x'],
         'is a queue; topics route messages sent to an exchange'),
        (['run', 'test_agents_mod:Broken', '--no-uvloop'],
         'Broken failed to start: RuntimeError: no database'),
    ]
    if os.environ.get('CI') == 'true' or _up(6379):
        cases.append((['length', project.q1, '--broker', 'redis://127.0.0.1:6379/99'],
                      'DB index is out of range'))
    for args, message in cases:
        result = project.cli(*args)
        assert result.returncode == 1, (args, result.stderr)
        errors = [line for line in result.stderr.splitlines() if ' error: ' in line]
        assert len(errors) == 1 and message in errors[0], (args, result.stderr)
        assert 'Traceback' not in result.stderr


def _up(port: int) -> bool:
    try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        return True
    except OSError:
        return False


def test_memory_send_and_length_warn_that_nothing_outlives_the_process(tmp_path: Path) -> None:
    project = Project(tmp_path, 'memory://')
    result = project.cli('send', project.q1, '{"n": 1}', '--broker', 'memory://x')
    assert result.returncode == 0
    assert 'nothing outlives it' in result.stderr


def test_help_shows_env_variables_with_secrets_masked(tmp_path: Path) -> None:
    project = Project(tmp_path, 'memory://')
    result = project.cli('run', '--help', env={'MQ_BROKER': 'redis://:hunter2@localhost/0'})
    text = ' '.join(result.stdout.split())
    for name in ('MQ_BROKER', 'MQ_QUEUES', 'MQ_WORKERS', 'MQ_LOG_LEVEL', 'MQ_LOG_FORMAT',
                 'MQ_GRACE', 'MQ_ONLY', 'MQ_HEALTH_PORT', 'MQ_RELOAD'):
        assert name in text
    assert 'hunter2' not in result.stdout and 'redis://:***@localhost/0' in text


def test_env_configuration_json_logs_and_only(tmp_path: Path) -> None:
    project = Project(tmp_path, 'memory://')
    # memory broker: the messages come from a pre_start-less producer inside the run: use an
    # env-configured run that consumes only the second queue and logs JSON.
    proc = project.start(env={'MQ_ONLY': project.q2, 'MQ_LOG_FORMAT': 'json',
                              'MQ_LOG_LEVEL': 'DEBUG'})
    assert proc.stderr is not None
    records = []
    for line in proc.stderr:
        records.append(json.loads(line))  # every line is one JSON object
        if 'SIGINT or SIGTERM stops' in line:
            break
    err = stop(proc)
    records += [json.loads(line) for line in err.splitlines()]
    assert proc.returncode == 0
    consuming = [r['message'] for r in records if r['message'].startswith('Consuming ')]
    assert consuming == [f'Consuming {project.q2} with Worker.second']  # --only via MQ_ONLY
    assert {'time', 'level', 'logger', 'message'} <= set(records[0])


def test_json_logs_carry_queue_message_id_and_attempt(redis_project: Project) -> None:
    project = redis_project
    proc = project.start('--log-format', 'json')
    project.send_many(project.q1, 1, n=-1)  # n=-1 makes the handler raise
    assert proc.stderr is not None
    found = None
    for line in proc.stderr:
        record = json.loads(line)
        if record['message'].startswith('Handler Worker.first failed'):
            found = record
            break
    stop(proc)
    assert found is not None
    assert found['queue'] == project.q1 and found['attempt'] == 1 and found['message_id']
    assert 'RuntimeError: boom' in found['exception']


def test_only_names_an_unknown_queue(tmp_path: Path) -> None:
    project = Project(tmp_path, 'memory://')
    result = project.cli('run', 'test_agents_mod:Worker', '--only', 'nope', '--no-uvloop')
    assert result.returncode == 2
    assert 'no agent given consumes that queue' in result.stderr


# health ---------------------------------------------------------------------------------

def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f'http://127.0.0.1:{port}{path}', timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


def own_redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(['redis-server', '--port', str(port), '--bind', '127.0.0.1',
                             '--save', '', '--appendonly', 'no', '--dir', str(folder)],
                            stdout=subprocess.DEVNULL)
    poll(lambda: _up(port), 20, 'the test-owned redis-server')
    return proc


def test_readyz_follows_the_broker(tmp_path: Path) -> None:
    if subprocess.run(['which', 'redis-server'], capture_output=True).returncode:
        pytest.skip('redis-server not installed')
    redis_port, health = free_port(), free_port()
    server = own_redis(redis_port, tmp_path)
    project = Project(tmp_path, f'redis://127.0.0.1:{redis_port}/0')
    proc = project.start('--health-port', str(health))
    try:
        poll(lambda: get(health, '/readyz')[0] == 200, what='ready')
        assert get(health, '/livez') == (200, {'status': 'ok'})
        server.kill()
        server.wait()
        poll(lambda: get(health, '/readyz')[0] == 503, what='not ready while Redis is down')
        _, body = get(health, '/readyz')
        assert 'unreachable' in body['broker']
        server = own_redis(redis_port, tmp_path)
        poll(lambda: get(health, '/readyz')[0] == 200, what='ready again')
        assert get(health, '/nope')[0] == 404
    finally:
        stop(proc)
        server.kill()
        server.wait()


# worker processes -------------------------------------------------------------------------

def children(pid: int) -> set[str]:
    result = subprocess.run(['pgrep', '-P', str(pid)], capture_output=True, text=True)
    return set(result.stdout.split())


def pids(project: Project, kind: str = 'end') -> set[str]:
    return {fields[1] for fields in project.lines(kind)}


def test_three_workers_share_3000_messages(redis_project: Project) -> None:
    project = redis_project
    proc = project.start('--workers', '3')
    try:
        project.send_many(project.q1, 3000, pause=0.001)
        poll(lambda: len(project.lines('end')) >= 3000, what='3000 handled')
        handled = sorted(int(fields[2]) for fields in project.lines('end'))
        assert handled == list(range(3000))
        assert len(pids(project)) == 3  # every worker took part
    finally:
        err = stop(proc)
    assert proc.returncode == 0, err


def test_a_killed_worker_is_restarted_and_nothing_is_lost(redis_project: Project) -> None:
    project = redis_project
    proc = project.start('--workers', '2')
    try:
        project.send_many(project.q1, 50)
        poll(lambda: len(pids(project)) == 2 or len(project.lines('end')) >= 50, what='workers')
        victim = sorted(pids(project, 'start'))[0]
        os.kill(int(victim), signal.SIGKILL)
        project.send_many(project.q1, 50, pause=0.001)  # a second batch: n 0..49 again
        poll(lambda: len(project.lines('end')) >= 100,
             what=f'100 handled (have {len(project.lines("end"))}, log {project.log.read_text()[-2000:]})')
        ended = [int(fields[2]) for fields in project.lines('end')]
        assert sorted(set(ended)) == list(range(50))  # the killed worker's messages too
        poll(lambda: len(children(proc.pid) - {victim}) == 2, what='a restarted worker')
    finally:
        err = stop(proc)
    assert 'died with status -9' in err


def test_sigterm_drains_in_flight_handlers_then_exits_zero(redis_project: Project) -> None:
    project = redis_project
    proc = project.start('--workers', '2', '--grace', '30')
    project.send_many(project.q1, 8, pause=1.0)
    poll(lambda: len(project.lines('start')) >= 4, what='handlers running')
    err = stop(proc)
    assert proc.returncode == 0, err
    started = {fields[2] for fields in project.lines('start')}
    ended = {fields[2] for fields in project.lines('end')}
    assert started == ended  # every handler that began had time to finish


def test_reload_restarts_the_workers_when_a_module_changes(redis_project: Project) -> None:
    project = redis_project
    proc = project.start('--reload', '--reload-dir', str(project.root))
    try:
        project.send_many(project.q2, 1)
        poll(lambda: len(project.lines('second')) == 1, what='first worker')
        first = pids(project, 'second')
        module = project.root / 'test_agents_mod.py'
        module.write_text(module.read_text().replace("record(f'second", "record(f'second"
                                                     ) + '\n# changed\n')
        project.send_many(project.q2, 1)
        poll(lambda: len(pids(project, 'second') - first) == 1, what='a reloaded worker')
    finally:
        err = stop(proc)
    assert 'Reloading' in err


def test_a_worker_waits_for_a_broker_down_at_start(tmp_path: Path) -> None:
    # Started while its broker is down (as during a RabbitMQ restart), a worker waits for it
    # instead of dying; then it consumes.
    if subprocess.run(['which', 'redis-server'], capture_output=True).returncode:
        pytest.skip('redis-server not installed')
    port = free_port()
    project = Project(tmp_path, f'redis://127.0.0.1:{port}/0')
    proc = project.start(env={'MQ_LOG_LEVEL': 'WARNING'})
    server = None
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if 'cannot start yet' in line:
                break
        assert proc.poll() is None  # still running, waiting for Redis
        server = own_redis(port, tmp_path)
        project.send_many(project.q2, 1)
        poll(lambda: len(project.lines('second')) == 1, what='handled once Redis is up')
    finally:
        stop(proc)
        if server is not None:
            server.kill()
            server.wait()
    assert proc.returncode == 0
