"""TracingMiddleware: consumer spans continue the producer's trace, on every attempt."""

from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from microagent_mq import MessageInfo, MicroAgent, Queue, consumer
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.middleware import TracingMiddleware

from .conftest import unique, wait_until

FAST = {'retry_delay': 0.01, 'retry_delay_max': 0.05}
KINDS = ['memory', pytest.param('redis', marks=pytest.mark.redis),
         pytest.param('amqp', marks=pytest.mark.amqp), pytest.param('nats', marks=pytest.mark.nats)]


@pytest.fixture(params=KINDS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_consumer_spans_are_children_of_the_producer_span_across_retries(
        broker_factory: Callable[[], AbstractQueueBroker]) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker = broker_factory()
    broker.middlewares.append(TracingMiddleware(provider))
    orders, receipts = Queue(unique('orders')), Queue(unique('receipts'))
    seen: list[Any] = []

    class Shop(MicroAgent):
        @consumer(orders, **FAST)
        async def order(self, n: int, info: MessageInfo) -> None:
            if info.attempt == 1:
                raise RuntimeError('first attempt fails')
            await broker.send(receipts.name, {'n': n})  # inside the consumer span

        @consumer(receipts)
        async def receipt(self, n: int) -> None:
            seen.append(n)

    agent = Shop(broker=broker)
    await agent.start()
    await broker.send(orders.name, {'n': 7})
    await wait_until(lambda: len(spans_named(exporter, f'process {receipts.name}')) == 1,
                     what='the receipt handled')
    await agent.stop()

    [send] = spans_named(exporter, f'send {orders.name}')
    first, second = sorted(spans_named(exporter, f'process {orders.name}'),
                           key=lambda s: s.attributes['microagent_mq.attempt'])  # type: ignore[index]
    assert send.kind is SpanKind.PRODUCER
    assert send.attributes['messaging.destination.name'] == orders.name  # type: ignore[index]
    for span in (first, second):
        assert span.kind is SpanKind.CONSUMER
        assert span.parent is not None and span.parent.span_id == send.context.span_id
        assert span.context.trace_id == send.context.trace_id
        assert span.attributes['messaging.operation.type'] == 'process'  # type: ignore[index]
    assert first.attributes['microagent_mq.outcome'] == 'retried'  # type: ignore[index]
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes['microagent_mq.outcome'] == 'handled'  # type: ignore[index]
    # The handler's own send is a child of its consumer span, and the trace goes on.
    [send_receipt] = spans_named(exporter, f'send {receipts.name}')
    [process_receipt] = spans_named(exporter, f'process {receipts.name}')
    assert send_receipt.parent is not None and send_receipt.parent.span_id == second.context.span_id
    assert process_receipt.parent is not None
    assert process_receipt.parent.span_id == send_receipt.context.span_id
    assert process_receipt.context.trace_id == send.context.trace_id
    assert seen == [7]
