"""MetricsMiddleware: counts per queue and outcome, handling times, in-flight and ready gauges."""

import asyncio

from prometheus_client import CollectorRegistry

from microagent_mq import MicroAgent, Queue, consumer
from microagent_mq.middleware import MetricsMiddleware
from microagent_mq.tools.memory import MemoryBroker

from .conftest import unique, wait_until
from .test_middleware import mixed_agent


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def test_counts_after_a_known_mix_of_outcomes() -> None:
    registry = CollectorRegistry()
    metrics = MetricsMiddleware(registry)
    broker = MemoryBroker(f'memory://{unique()}', middlewares=[metrics])
    queue = Queue(unique())
    agent: MicroAgent = mixed_agent(queue)(broker=broker)
    await agent.start()
    for kind in ('ok', 'ok', 'once', 'fail', 'skip', 'skip', 'skip'):
        await broker.send(queue.name, {'kind': kind})
    total = 'microagent_mq_messages_total'
    expected = {'handled': 3, 'retried': 2, 'dead_lettered': 1, 'filtered': 3}
    await wait_until(lambda: {o: value(registry, total, queue=queue.name, outcome=o)
                              for o in expected} == expected, what=f'counts {expected}')
    assert value(registry, 'microagent_mq_handling_seconds_count', queue=queue.name) == 9
    assert value(registry, 'microagent_mq_in_flight', queue=queue.name) == 0
    assert value(registry, 'microagent_mq_sent_total', destination=queue.name) == 7
    await agent.stop()
    await broker.close()


async def test_in_flight_while_handling_and_ready_sampled() -> None:
    registry = CollectorRegistry()
    metrics = MetricsMiddleware(registry)
    assert MetricsMiddleware(registry).metrics is metrics.metrics  # one set per registry
    broker = MemoryBroker(f'memory://{unique()}', middlewares=[metrics])
    queue, release = Queue(unique()), asyncio.Event()

    class Slow(MicroAgent):
        @consumer(queue, concurrency=2)
        async def handle(self, n: int) -> None:
            await release.wait()

    agent = Slow(broker=broker)
    await agent.start()
    await broker.send_many(queue.name, [{'n': n} for n in range(5)])
    await wait_until(lambda: value(registry, 'microagent_mq_in_flight', queue=queue.name) == 2,
                     what='two in flight')
    sampler = asyncio.create_task(metrics.sample(broker, [queue.name], every_s=0.01))
    # 5 sent, 2 being handled, up to 'prefetch' buffered by the engine: the rest wait.
    waiting = await broker.queue_length(queue.name)
    await wait_until(lambda: value(registry, 'microagent_mq_ready', queue=queue.name) == waiting,
                     what='the ready gauge sampled')
    sampler.cancel()
    release.set()
    await wait_until(lambda: value(registry, 'microagent_mq_messages_total', queue=queue.name,
                                   outcome='handled') == 5, what='all handled')
    assert value(registry, 'microagent_mq_in_flight', queue=queue.name) == 0
    await agent.stop()
    await broker.close()
