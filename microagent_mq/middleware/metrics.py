"""``MetricsMiddleware``: Prometheus metrics of every message sent and handled.

Per queue: ``microagent_mq_messages_total{queue, outcome}`` (handled, retried, dead_lettered,
filtered, released), ``microagent_mq_handling_seconds`` (a histogram),
``microagent_mq_in_flight`` (being handled now), ``microagent_mq_ready`` (waiting, sampled by
``sample``) and ``microagent_mq_sent_total{destination}``. Works in prometheus-client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): ``run --workers N --metrics-port P`` uses it.
"""

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("MetricsMiddleware needs prometheus-client: pip install 'microagent-mq[metrics]'"
                      ) from exc

from ..messages import MessageInfo
from .base import Middleware, Outcome

if TYPE_CHECKING:
    from ..broker import AbstractQueueBroker
    from ..transport import Outgoing

log = logging.getLogger('microagent_mq.metrics')
SAMPLE_EVERY_S = 5.0
# Handling times: from a millisecond to the default handler timeout (60 s) and past it.
BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
             60.0, 120.0)


class _Metrics:
    """The metric objects of one registry (a registry refuses the same name twice)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.messages = Counter('microagent_mq_messages', 'Messages settled, by queue and outcome',
                                ['queue', 'outcome'], registry=registry)
        self.handling = Histogram('microagent_mq_handling_seconds',
                                  'Seconds from taking a message on to settling it', ['queue'],
                                  buckets=BUCKETS_S, registry=registry)
        self.in_flight = Gauge('microagent_mq_in_flight', 'Messages being handled now', ['queue'],
                               multiprocess_mode='livesum', registry=registry)
        self.ready = Gauge('microagent_mq_ready', 'Messages waiting in the queue (sampled)', ['queue'],
                           multiprocess_mode='livemax', registry=registry)
        self.sent = Counter('microagent_mq_sent', 'Messages sent, by queue or exchange', ['destination'],
                            registry=registry)


_by_registry: dict[int, tuple[CollectorRegistry, _Metrics]] = {}


class MetricsMiddleware(Middleware):
    """Counts, times and gauges messages in ``registry`` (default: prometheus-client's own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        registry = REGISTRY if registry is None else registry
        known = _by_registry.get(id(registry))
        if known is None or known[0] is not registry:
            known = _by_registry[id(registry)] = (registry, _Metrics(registry))
        self.registry = registry
        self.metrics = known[1]

    async def before_send(self, outgoing: 'Outgoing') -> None:
        destination = outgoing.exchange or (outgoing.queues[0] if outgoing.queues else '')
        self.metrics.sent.labels(destination).inc()

    async def before_handle(self, info: MessageInfo) -> None:
        self.metrics.in_flight.labels(info.queue).inc()

    async def after_handle(self, info: MessageInfo, outcome: Outcome, seconds: float) -> None:
        metrics = self.metrics
        metrics.in_flight.labels(info.queue).dec()
        metrics.messages.labels(info.queue, outcome).inc()
        metrics.handling.labels(info.queue).observe(seconds)

    async def sample(self, broker: 'AbstractQueueBroker', queues: Iterable[str],
                     every_s: float = SAMPLE_EVERY_S) -> None:
        """Set the ready gauge of ``queues`` from ``broker`` every ``every_s`` s, until cancelled."""
        names = list(queues)
        failing = False
        while True:
            try:
                for name in names:
                    self.metrics.ready.labels(name).set(await broker.queue_length(name))
                failing = False
            except Exception as exc:  # the broker away for a while: the gauge keeps its value
                if not failing:
                    log.warning('Sampling queue lengths failed: %r; will retry', exc)
                failing = True
            await asyncio.sleep(every_s)
