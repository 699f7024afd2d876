"""``run --metrics-port`` and ``--tracing``: the middlewares a worker installs, and their server.

One process: the worker serves its own metrics. ``--workers N``: the supervisor gives every
worker one ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode; each worker
writes its values there, ``MQ_METRICS_WORKER=1`` tells it to) and serves the aggregate of all
workers on the port itself, so one scrape sees the whole worker.
"""

import asyncio
import logging
import os
import shutil
import tempfile
from typing import Any

from ..broker import AbstractQueueBroker
from .errors import EXIT_RUNTIME, CLIError

log = logging.getLogger('microagent_mq.cli')
WORKER_ENV = 'MQ_METRICS_WORKER'  # set by the supervisor: record metrics, serve none
MULTIPROC_ENV = 'PROMETHEUS_MULTIPROC_DIR'
# messaging.system of each DSN scheme (OpenTelemetry's names where it has one)
SYSTEMS = {'amqp': 'rabbitmq', 'amqps': 'rabbitmq', 'redis': 'redis', 'rediss': 'redis', 'unix': 'redis',
           'redis+cluster': 'redis', 'rediss+cluster': 'redis'}


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise CLIError("--metrics-port needs prometheus-client: pip install 'microagent-mq[metrics]'",
                       EXIT_RUNTIME) from exc
    return prometheus_client


def _serve(port: int, registry: Any) -> Any:
    try:
        server, _ = _prometheus().start_http_server(port, registry=registry)
    except OSError as exc:
        raise CLIError(f'--metrics-port {port}: {exc.strerror or exc}', EXIT_RUNTIME) from exc
    log.info('Serving metrics on port %d', port)
    return server


class Observers:
    """What ``run`` installs on the broker for ``--metrics-port`` / ``--tracing``, in one process."""

    def __init__(self, broker: AbstractQueueBroker, metrics_port: int | None, tracing: bool) -> None:
        self.broker = broker
        self.port = None if os.environ.get(WORKER_ENV) else metrics_port
        self.metrics: Any = None
        self._server: Any = None
        self._sampler: asyncio.Task[None] | None = None
        if metrics_port is not None or os.environ.get(WORKER_ENV):
            _prometheus()
            from ..middleware.metrics import MetricsMiddleware

            self.metrics = MetricsMiddleware()
            broker.middlewares.append(self.metrics)
        if tracing:
            try:
                from ..middleware.tracing import TracingMiddleware
            except ImportError as exc:
                raise CLIError("--tracing needs opentelemetry-api: pip install 'microagent-mq[otel]'",
                               EXIT_RUNTIME) from exc
            scheme = broker.dsn.partition(':')[0]
            broker.middlewares.append(TracingMiddleware(system=SYSTEMS.get(scheme, scheme)))

    async def start(self, queues: list[str]) -> None:
        """Serve the metrics (unless a supervisor does) and sample the queues' lengths."""
        if self.metrics is None:
            return
        if self.port is not None:
            self._server = _serve(self.port, self.metrics.registry)
        self._sampler = asyncio.create_task(self.metrics.sample(self.broker, queues), name='metrics')

    async def stop(self) -> None:
        """Stop sampling and serving."""
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        if self._server is not None:
            await asyncio.to_thread(self._server.shutdown)
            self._server.server_close()


class AggregateMetrics:
    """For a supervisor: the multiprocess directory of its workers, served as one endpoint."""

    def __init__(self, port: int) -> None:
        prometheus = _prometheus()
        from prometheus_client import multiprocess

        self.port = port
        self.directory = tempfile.mkdtemp(prefix='microagent-mq-metrics-')
        self._multiprocess: Any = multiprocess  # untyped functions
        self._registry = prometheus.CollectorRegistry()
        self._multiprocess.MultiProcessCollector(self._registry, path=self.directory)
        self._server: Any = None

    def worker_env(self) -> dict[str, str]:
        """What a worker's environment gets so that it records into the shared directory."""
        return {MULTIPROC_ENV: self.directory, WORKER_ENV: '1'}

    def start(self) -> None:
        """Serve the aggregate."""
        self._server = _serve(self.port, self._registry)

    def worker_exited(self, pid: int) -> None:
        """Drop a dead worker's live gauges (in flight, ready) from the aggregate."""
        self._multiprocess.mark_process_dead(pid, self.directory)

    def close(self) -> None:
        """Stop serving; delete the directory."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        shutil.rmtree(self.directory, ignore_errors=True)
