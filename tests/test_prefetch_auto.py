"""prefetch='auto': big reads under a backlog of fast handlers, small shares for slow ones."""

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from microagent_mq import ConfigurationError, MicroAgent, Queue, consumer
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.options import PREFETCH_AUTO, ConsumerOptions
from microagent_mq.tools.memory import MemoryBroker
from microagent_mq.transport import Subscription

from .conftest import Calls, unique

LOW, HIGH = PREFETCH_AUTO


def _subscription_classes(base: type = Subscription) -> Iterator[type]:
    for cls in base.__subclasses__():
        yield cls
        yield from _subscription_classes(cls)


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ``max_count`` of every fetch any subscription is asked for."""
    counts: list[int] = []
    for cls in _subscription_classes():
        original = cls.__dict__.get('fetch')
        if original is None:
            continue

        async def fetch(self: Any, max_count: int, wait_s: float | None = None,
                        _original: Any = original) -> Any:
            counts.append(max_count)
            return await _original(self, max_count, wait_s)

        monkeypatch.setattr(cls, 'fetch', fetch)
    return counts


async def _drain(broker: AbstractQueueBroker, n: int, handler_s: float = 0.0,
                 **options: Any) -> list[dict[str, Any]]:
    queue, calls = Queue(unique('prefetch')), Calls()
    for first in range(0, n, 500):
        await broker.send_many(queue.name, [{'n': i} for i in range(first, min(first + 500, n))])

    class Agent(MicroAgent):
        @consumer(queue, timeout=30, **options)
        async def handle(self, n: int) -> None:
            if handler_s:
                await asyncio.sleep(handler_s)
            calls.add({'n': n})

    agent = Agent(broker=broker)
    await agent.start()
    try:
        return await calls.wait_for(n, timeout_s=60)
    finally:
        await agent.stop(grace=5)


@pytest.mark.parametrize('concurrency', [1, 4])
async def test_fast_handlers_read_bigger_batches_on_every_broker(
        broker: AbstractQueueBroker, asked: list[int], concurrency: int) -> None:
    items = await _drain(broker, 3000, concurrency=concurrency)
    assert sorted(item['n'] for item in items) == list(range(3000))  # each once
    assert max(asked) > LOW + concurrency, asked  # grew past the floor...
    assert max(asked) <= HIGH + concurrency  # ...within the range (+ the handlers' own)
    assert asked[0] == LOW + concurrency  # the first read knows no pace yet


async def test_slow_handlers_keep_the_small_share(asked: list[int]) -> None:
    # 5 ms a message: 10 ms of work is two messages, under the floor.
    items = await _drain(MemoryBroker(f'memory://{unique("slow")}'), 120, handler_s=0.005)
    assert len(items) == 120
    assert asked and max(asked) == LOW + 1, asked


async def test_a_number_is_exactly_what_is_fetched_ahead(asked: list[int]) -> None:
    items = await _drain(MemoryBroker(f'memory://{unique("fixed")}'), 3000, prefetch=8)
    assert len(items) == 3000
    assert max(asked) == 9  # 8 ahead + the handler's own, however fast the handler


def test_prefetch_options() -> None:
    assert ConsumerOptions().prefetch == 'auto'
    assert ConsumerOptions().prefetch_range == PREFETCH_AUTO
    assert ConsumerOptions(prefetch=0).prefetch_range == (0, 0)
    with pytest.raises(ConfigurationError, match=r"prefetch='lots': expected a number >= 0 or 'auto'"):
        ConsumerOptions.parse({'prefetch': 'lots'}, 60)
    with pytest.raises(ConfigurationError, match=r'prefetch=-1'):
        ConsumerOptions.parse({'prefetch': -1}, 60)


async def test_a_stop_gives_back_what_was_read_ahead(broker: AbstractQueueBroker,
                                                     asked: list[int]) -> None:
    # The handler stops at message 24: by then, on a transport whose fetch is a round trip,
    # the next fetch was started (half the first 33 were taken); the stop must give back its
    # messages with the buffer's, or they stay with a consumer that is gone.
    queue, calls, n = Queue(unique('ahead')), Calls(), 600
    await broker.send_many(queue.name, [{'n': i} for i in range(n)])
    reached, go_on = asyncio.Event(), asyncio.Event()

    class Agent(MicroAgent):
        @consumer(queue, timeout=30)
        async def handle(self, n: int) -> None:
            if len(calls) == 24 and not go_on.is_set():
                reached.set()
                await go_on.wait()
            calls.add({'n': n})

    agent = Agent(broker=broker)
    await agent.start()
    await asyncio.wait_for(reached.wait(), 20)
    if type(broker).__name__ in ('RedisBroker', 'NATSBroker'):
        assert len(asked) >= 2, asked  # the read ahead is out
    stopping = asyncio.create_task(agent.stop(grace=10))
    await asyncio.sleep(0.05)
    go_on.set()
    await stopping
    first = len(calls)
    assert first == 25  # the 24 before, and the one in hand, finished within the grace

    again = Agent(broker=broker)
    await again.start()
    try:
        items = await calls.wait_for(n, timeout_s=20)  # long before a visibility timeout
    finally:
        await again.stop(grace=5)
    assert sorted(item['n'] for item in items) == list(range(n))  # each once
