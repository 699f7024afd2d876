"""A graceful stop, on every broker: handlers finish within their grace, nothing fetched is
lost, reordered or charged an attempt, and a stop completes even when cancelled."""

import asyncio
from collections.abc import Callable
from typing import Any

from microagent_mq import MicroAgent, Queue, consumer
from microagent_mq.broker import AbstractQueueBroker

from .conftest import Calls, unique, wait_until
from .test_contract import start


async def test_stop_lets_a_running_handler_finish_within_its_grace(
        broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    started, go_on = asyncio.Event(), asyncio.Event()
    outcomes: list[str] = []

    async def handler(n: int) -> None:
        started.set()
        try:
            await go_on.wait()
        except asyncio.CancelledError:
            outcomes.append('cancelled')
            raise
        outcomes.append('finished')
        calls.add({'n': n})

    agent = await start(broker, queue, handler)
    await broker.send(queue.name, {'n': 1})
    await asyncio.wait_for(started.wait(), 20)
    stopping = asyncio.create_task(agent.stop(grace=20))
    await wait_until(lambda: broker.info()['consuming'] == [], what='stop to begin')
    go_on.set()  # the handler ends well inside its grace: stop() must have waited for it
    await asyncio.wait_for(stopping, 20)
    assert outcomes == ['finished']
    assert calls.items == [{'n': 1}]
    assert await broker.queue_length(queue.name) == 0
    assert await broker.dead_letters(queue.name) == []


async def test_stop_cancels_a_handler_past_its_grace_and_gives_the_message_back(
        broker_factory: Callable[[], AbstractQueueBroker]) -> None:
    queue, calls = Queue(unique()), Calls()
    started = asyncio.Event()
    first = broker_factory()

    async def stuck(n: int) -> None:
        started.set()
        await asyncio.Event().wait()  # never ends by itself

    agent = await start(first, queue, stuck, timeout=120, visibility_timeout=121, max_attempts=1)
    await first.send(queue.name, {'n': 1})
    await asyncio.wait_for(started.wait(), 20)
    await asyncio.wait_for(agent.stop(grace=0.2), 20)  # a stop that ignored its grace hangs here

    async def handler(n: int) -> None:
        calls.add({'n': n})

    # max_attempts=1: had the cancelled handling cost an attempt, this would be a dead letter.
    await start(broker_factory(), queue, handler, timeout=120, visibility_timeout=121, max_attempts=1)
    assert await calls.wait_for(1) == [{'n': 1}]
    assert await first.dead_letters(queue.name) == []


async def test_graceful_stop_gives_back_the_buffer_in_order_without_an_attempt(
        broker_factory: Callable[[], AbstractQueueBroker]) -> None:
    queue, calls, later = Queue(unique()), Calls(), Calls()
    first = broker_factory()
    started, go_on = asyncio.Event(), asyncio.Event()

    async def slow(n: int) -> None:
        started.set()
        await go_on.wait()
        calls.add({'n': n})

    await first.send_many(queue.name, [{'n': i} for i in range(20)])
    agent = await start(first, queue, slow, max_attempts=1, prefetch=32)
    await asyncio.wait_for(started.wait(), 20)
    # The consumer now holds message 0 in its handler and (prefetch) more in its buffer.
    stopping = asyncio.create_task(agent.stop(grace=20))
    await wait_until(lambda: first.info()['consuming'] == [], what='stop to begin')
    go_on.set()
    await asyncio.wait_for(stopping, 20)
    assert calls.items == [{'n': 0}]

    async def rest(n: int) -> None:
        later.add({'n': n})

    second = broker_factory()
    await start(second, queue, rest, max_attempts=1)
    items = await later.wait_for(19)
    assert [item['n'] for item in items] == list(range(1, 20))  # all back, in their order
    assert await second.dead_letters(queue.name) == []  # and none charged an attempt


async def test_a_cancelled_stop_still_completes(
        broker_factory: Callable[[], AbstractQueueBroker]) -> None:
    queue, calls = Queue(unique()), Calls()
    first = broker_factory()
    started = asyncio.Event()

    async def stuck(n: int) -> None:
        started.set()
        await asyncio.Event().wait()

    agent = await start(first, queue, stuck, timeout=120, visibility_timeout=121, max_attempts=1)
    await first.send(queue.name, {'n': 1})
    await asyncio.wait_for(started.wait(), 20)
    stopping = asyncio.create_task(agent.stop(grace=0.3))
    await wait_until(lambda: first.info()['consuming'] == [], what='stop to begin')
    stopping.cancel()
    try:
        await asyncio.wait_for(stopping, 20)
    except asyncio.CancelledError:
        pass

    async def handler(n: int) -> None:
        calls.add({'n': n})

    # The cancelled stop went on: the stuck handler was cancelled and its message given back.
    await start(broker_factory(), queue, handler, timeout=120, visibility_timeout=121, max_attempts=1)
    assert await calls.wait_for(1) == [{'n': 1}]


async def test_handler_raising_cancelled_error_is_a_failure_not_a_dead_consumer(
        broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    seen: list[int] = []

    async def handler(n: int) -> None:
        seen.append(n)
        if n == 1 and seen.count(1) == 1:
            raise asyncio.CancelledError  # e.g. an inner task's cancellation leaking out
        calls.add({'n': n})

    await start(broker, queue, handler, retry_delay=0.01)
    await broker.send(queue.name, {'n': 1})
    await broker.send(queue.name, {'n': 2})
    items = await calls.wait_for(2)
    assert sorted(item['n'] for item in items) == [1, 2]
    assert seen.count(1) == 2  # retried once: a failed attempt, not a lost message
    assert broker.info()['consuming'] == [queue.name]
    assert await broker.dead_letters(queue.name) == []


async def test_close_stops_every_consumer_at_once(broker: AbstractQueueBroker) -> None:
    queues = [Queue(unique()), Queue(unique())]
    started = [asyncio.Event(), asyncio.Event()]
    stopping_seen: list[bool] = []
    runners: list[Any] = []

    def agent_class(index: int) -> type[MicroAgent]:
        class Agent(MicroAgent):
            @consumer(queues[index], timeout=120, visibility_timeout=121)
            async def handle(self, n: int) -> None:
                started[index].set()
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    # Stopped together: when one handler's grace ends, the other's stop began too.
                    stopping_seen.append(all(r._stopping for r in runners))
                    raise
        return Agent

    for index in range(2):
        await agent_class(index)(broker=broker).start()
        await broker.send(queues[index].name, {'n': index})
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 20)
    runners.extend(broker._runners.values())
    await asyncio.wait_for(broker.close(grace=0.3), 20)
    assert stopping_seen == [True, True]


async def test_concurrent_binds_of_one_consumer_start_one_runner(broker: AbstractQueueBroker) -> None:
    queue = Queue(unique())

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, **data: Any) -> None: ...

    agent = Agent(broker=broker)
    await agent.start()
    await broker.unbind(queue.name, grace=1)
    bound = agent._consumers[0]
    broker._bindings[queue.name] = bound
    await asyncio.gather(*(broker.bind(queue.name) for _ in range(5)))
    loops = [t for t in asyncio.all_tasks() if t.get_name() == f'consume:{queue.name}' and not t.done()]
    assert len(loops) == 1
