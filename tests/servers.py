"""Servers of the tests' own, on free loopback ports: restart them, kill them, nobody else notices.

``RedisServer``: a ``redis-server`` process (optionally with AOF, so data survives a restart).
``RabbitNode``: a RabbitMQ node with its own node name, AMQP and distribution ports, data and
log directories, empty config and plugin files (no management plugin) and its own Erlang
cookie in its own HOME. ``rabbitmqctl`` is always run with ``-n <that node>`` and that HOME:
with a cookie of its own it could not reach the shared node even by mistake.
``NatsServer``: a ``nats-server`` with JetStream, its store in its own folder.
"""

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

RABBIT_BIN = Path('/usr/lib/rabbitmq/bin')  # the Debian wrapper in /usr/sbin su's to rabbitmq


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Return once something accepts on ``port``; raise if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f'server exited with {proc.returncode} before listening on {port}')
        try:
            socket.create_connection(('127.0.0.1', port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f'nothing listens on 127.0.0.1:{port} after {timeout_s} s')


class RedisServer:
    """``redis-server`` on a free port, data in ``folder``; ``restart()`` keeps the port."""

    def __init__(self, folder: Path, extra: list[str] | None = None, aof: bool = False) -> None:
        binary = shutil.which('redis-server')
        if binary is None:
            raise FileNotFoundError('redis-server is not installed')
        self.binary, self.folder, self.port = binary, folder, free_port()
        persistence = ['--appendonly', 'yes', '--appendfsync', 'always'] if aof else [
            '--appendonly', 'no']
        self.args = ['--port', str(self.port), '--bind', '127.0.0.1', '--save', '',
                     '--dir', str(folder), *persistence, *(extra or [])]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f'redis://127.0.0.1:{self.port}/0'

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([self.binary, *self.args], stdout=subprocess.DEVNULL)
        wait_listening(self.port, 10, self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def restart(self) -> None:
        """SIGKILL and start again: with ``aof`` every write acknowledged before survives."""
        self.kill()
        self.start()


class NatsServer:
    """``nats-server -js`` on a free port, JetStream store in ``folder``; ``restart()`` keeps both."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which('nats-server')
        if binary is None:
            raise FileNotFoundError('nats-server is not installed')
        self.binary, self.folder, self.port = binary, folder, free_port()
        self.args = ['-a', '127.0.0.1', '-p', str(self.port), '-js', '-sd', str(folder / 'store')]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f'nats://127.0.0.1:{self.port}'

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / 'server.log').open('ab')
        self.proc = subprocess.Popen([self.binary, *self.args], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_listening(self.port, 10, self.proc)  # JetStream is up before clients are accepted

    def stop(self) -> None:
        """SIGTERM: a graceful shutdown (clients see their connections close), then wait."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def restart(self) -> None:
        """Stop gracefully and start again on the same port and store."""
        self.stop()
        self.start()


class RabbitNode:
    """A RabbitMQ node of the tests' own under ``folder``; ``start()`` blocks until it serves."""

    def __init__(self, folder: Path) -> None:
        if not (RABBIT_BIN / 'rabbitmq-server').exists():
            raise FileNotFoundError(f'RabbitMQ is not installed in {RABBIT_BIN}')
        self.folder = folder
        self.node = f'mqtest{secrets.token_hex(4)}@localhost'
        self.port, self.dist_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_s = 0.0  # how long the last start() took (reported by the chaos run)

    @property
    def dsn(self) -> str:
        return f'amqp://guest:guest@127.0.0.1:{self.port}/'

    def env(self) -> dict[str, str]:
        home = self.folder / 'home'
        files = {'rabbitmq.conf': '', 'enabled_plugins': '[].\n', 'rabbitmq-env.conf': ''}
        if not home.exists():
            home.mkdir(parents=True)
            cookie = home / '.erlang.cookie'
            cookie.write_text(secrets.token_hex(16).upper())
            cookie.chmod(0o400)
            for name, text in files.items():
                (self.folder / name).write_text(text)
        return {
            **os.environ, 'HOME': str(home),
            'RABBITMQ_NODENAME': self.node, 'RABBITMQ_NODE_IP_ADDRESS': '127.0.0.1',
            'RABBITMQ_NODE_PORT': str(self.port), 'RABBITMQ_DIST_PORT': str(self.dist_port),
            'RABBITMQ_MNESIA_BASE': str(self.folder / 'mnesia'),
            'RABBITMQ_LOG_BASE': str(self.folder / 'log'),
            'RABBITMQ_CONFIG_FILE': str(self.folder / 'rabbitmq.conf'),
            'RABBITMQ_ADVANCED_CONFIG_FILE': str(self.folder / 'advanced.config'),
            'RABBITMQ_ENABLED_PLUGINS_FILE': str(self.folder / 'enabled_plugins'),
            'RABBITMQ_CONF_ENV_FILE': str(self.folder / 'rabbitmq-env.conf'),
            'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS': '-kernel inet_dist_use_interface {127,0,0,1}',
        }

    def ctl(self, *args: str, timeout_s: float = 120) -> None:
        """``rabbitmqctl -n <this node> ARGS``; never any other node."""
        subprocess.run([str(RABBIT_BIN / 'rabbitmqctl'), '-n', self.node, *args], env=self.env(),
                       check=True, capture_output=True, timeout=timeout_s)

    def start(self, timeout_s: float = 120) -> None:
        started = time.monotonic()
        env = self.env()  # creates the folder, its files and the cookie on first use
        log = (self.folder / 'server.log').open('ab')
        self.proc = subprocess.Popen([str(RABBIT_BIN / 'rabbitmq-server')], env=env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()
        wait_listening(self.port, timeout_s, self.proc)  # the node registers with epmd first
        self.ctl('await_startup', timeout_s=timeout_s)
        self.start_s = time.monotonic() - started

    def stop_app(self) -> None:
        self.ctl('stop_app')

    def start_app(self) -> None:
        self.ctl('start_app')

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.ctl('stop', timeout_s=60)
            self.proc.wait(timeout=60)
        except (subprocess.SubprocessError, OSError):
            self.proc.kill()
            self.proc.wait()


class RedisClusterNodes:
    """A Redis Cluster of ``masters`` ``redis-server`` processes on free ports, no replicas.

    ``start()`` returns once every slot is served (``cluster_state:ok`` on every node).
    """

    def __init__(self, folder: Path, masters: int = 3) -> None:
        if shutil.which('redis-cli') is None:
            raise FileNotFoundError('redis-cli is not installed')
        self.nodes = [RedisServer(folder / f'node{i}', [
            '--cluster-enabled', 'yes', '--cluster-config-file', 'nodes.conf',
            # the bus port is the client port + 10000 unless given: that one may be taken
            '--cluster-port', str(free_port()), '--cluster-node-timeout', '5000'])
            for i in range(masters)]

    @property
    def dsn(self) -> str:
        return 'redis+cluster://' + ','.join(f'127.0.0.1:{node.port}' for node in self.nodes)

    def start(self, timeout_s: float = 30) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(['redis-cli', '--cluster', 'create',
                        *(f'127.0.0.1:{node.port}' for node in self.nodes),
                        '--cluster-replicas', '0', '--cluster-yes'],
                       check=True, capture_output=True, timeout=timeout_s)
        deadline = time.monotonic() + timeout_s
        while not all(self._state_ok(node.port) for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f'Redis Cluster not ok after {timeout_s} s')
            time.sleep(0.1)

    @staticmethod
    def _state_ok(port: int) -> bool:
        info = subprocess.run(['redis-cli', '-p', str(port), 'cluster', 'info'],
                              capture_output=True, text=True, timeout=10).stdout
        return 'cluster_state:ok' in info

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()
