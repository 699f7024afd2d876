"""The delivery contract, the same on every broker (memory, Redis, RabbitMQ)."""

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from microagent_mq import MicroAgent, Queue, Reject, Retry, consumer
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.transport import Outgoing

from .conftest import Calls, unique, wait_until

FAST = {'retry_delay': 0.01, 'retry_delay_max': 0.05}


def agent_for(queue: Queue, handler: Callable[..., Awaitable[None]], **kwargs: Any) -> type:
    """An agent class whose single consumer reads ``queue`` and calls ``handler``."""

    class Agent(MicroAgent):
        @consumer(queue, **kwargs)
        async def handle(self, **data: Any) -> None:
            await handler(**data)

    return Agent


async def start(broker: AbstractQueueBroker, queue: Queue, handler: Callable[..., Awaitable[None]],
                **kwargs: Any) -> MicroAgent:
    agent = agent_for(queue, handler, **kwargs)(broker=broker)
    await agent.start()
    return agent


async def send_raw(broker: AbstractQueueBroker, queue: str, body: bytes) -> None:
    """What a foreign producer could put on the wire, past our own checks."""
    await broker._publish([Outgoing(body, f'raw-{unique()}', (queue,))])


async def test_send_then_consume(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(**data: Any) -> None:
        calls.add(data)

    await start(broker, queue, handler)
    await broker.send(queue.name, {'user_id': 1, 'text': 'héllo'})
    assert await calls.wait_for(1) == [{'user_id': 1, 'text': 'héllo'}]
    assert await broker.queue_length(queue.name) == 0


async def test_sent_before_consumer_started_is_delivered(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    await getattr(broker, queue.name).send({'n': 1})
    await getattr(broker, queue.name).send({'n': 2})
    assert await getattr(broker, queue.name).length() == 2

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    assert await calls.wait_for(2) == [{'n': 1}, {'n': 2}]
    await wait_until(lambda: _length_is(broker, queue.name, 0), what='empty queue')


async def _length_is(broker: AbstractQueueBroker, name: str, expected: int) -> bool:
    return await broker.queue_length(name) == expected


async def test_fifo_with_concurrency_one(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    await getattr(broker, queue.name).send_many([{'n': i} for i in range(50)])
    for i in range(50, 100):
        await broker.send(queue.name, {'n': i})
    items = await calls.wait_for(100)
    assert [item['n'] for item in items] == list(range(100))


async def test_failing_twice_then_succeeding_is_called_three_times(
        broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        if len(calls) < 3:
            raise RuntimeError('not yet')

    await start(broker, queue, handler, max_attempts=5, **FAST)
    await broker.send(queue.name, {'n': 7})
    assert await calls.wait_for(3) == [{'n': 7}] * 3
    await wait_until(lambda: _length_is(broker, queue.name, 0), what='empty queue')
    assert await broker.dead_letters(queue.name) == []


async def test_always_failing_ends_in_dead_letters(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        raise ValueError(f'cannot handle {n}')

    await start(broker, queue, handler, max_attempts=3, **FAST)
    await broker.send(queue.name, {'n': 5})
    letters = await _dead_letters(broker, queue.name, 1)
    assert len(calls) == 3
    assert letters[0].data == {'n': 5}
    assert 'ValueError: cannot handle 5' in letters[0].error
    assert letters[0].attempts == 3
    assert letters[0].queue == queue.name
    assert await broker.queue_length(queue.name) == 0


async def _dead_letters(broker: AbstractQueueBroker, name: str, count: int) -> list[Any]:
    async def enough() -> bool:
        return len(await broker.dead_letters(name)) >= count

    await wait_until(enough, what=f'{count} dead letters')
    return await broker.dead_letters(name)


@pytest.mark.parametrize('body', [b'not json{', b'[1, 2]', b'"text"'])
async def test_poison_body_is_dead_lettered_at_once(broker: AbstractQueueBroker,
                                                    body: bytes) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(**data: Any) -> None:
        calls.add(data)

    await start(broker, queue, handler, max_attempts=5, **FAST)
    await send_raw(broker, queue.name, body)
    await broker.send(queue.name, {'after': 'poison'})
    assert await calls.wait_for(1) == [{'after': 'poison'}]  # the queue is not blocked
    letters = await _dead_letters(broker, queue.name, 1)
    assert letters[0].body == body
    assert letters[0].attempts == 1
    assert 'poison message' in letters[0].error


@dataclass
class Order:
    order_id: int
    amount: float

    def __post_init__(self) -> None:
        if self.amount <= 0:
            raise ValueError('amount must be positive')


async def test_dto_is_built_and_rejecting_dto_dead_letters(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(order: Order, **data: Any) -> None:
        calls.add({'order': order, **data})

    await start(broker, queue, handler, dto_class=Order, dto_name='order', **FAST)
    await broker.send(queue.name, {'order_id': 1, 'amount': -3})
    await broker.send(queue.name, {'order_id': 2})
    await broker.send(queue.name, {'order_id': 3, 'amount': 9.5})
    items = await calls.wait_for(1)
    assert items == [{'order': Order(3, 9.5), 'order_id': 3, 'amount': 9.5}]
    letters = await _dead_letters(broker, queue.name, 2)
    assert [letter.data['order_id'] for letter in letters] == [1, 2]
    assert 'amount must be positive' in letters[0].error
    assert all(letter.attempts == 1 for letter in letters)


async def test_missing_handler_argument_is_poison(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, user_id: int) -> None:
            calls.add({'user_id': user_id})

    await Agent(broker=broker).start()
    await broker.send(queue.name, {'other': 1})
    await broker.send(queue.name, {'user_id': 2})
    assert await calls.wait_for(1) == [{'user_id': 2}]
    letters = await _dead_letters(broker, queue.name, 1)
    assert "lacks arguments ['user_id']" in letters[0].error


async def test_handler_over_timeout_is_retried(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        if len(calls) == 1:
            await asyncio.sleep(30)  # far over the timeout: cancelled by it

    await start(broker, queue, handler, timeout=0.2, **FAST)
    await broker.send(queue.name, {'n': 1})
    assert await calls.wait_for(2) == [{'n': 1}, {'n': 1}]
    await wait_until(lambda: _length_is(broker, queue.name, 0), what='empty queue')
    assert await broker.dead_letters(queue.name) == []


async def test_timeouts_until_max_attempts_dead_letter(broker: AbstractQueueBroker) -> None:
    queue = Queue(unique())

    async def handler(n: int) -> None:
        await asyncio.sleep(30)

    await start(broker, queue, handler, timeout=0.1, max_attempts=2, **FAST)
    await broker.send(queue.name, {'n': 1})
    letters = await _dead_letters(broker, queue.name, 1)
    assert 'timed out after 0.1s' in letters[0].error
    assert letters[0].attempts == 2


async def test_retry_and_reject_from_handler(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        if n == 1 and sum(1 for c in calls.items if c['n'] == 1) == 1:
            raise Retry(delay=0.05)
        if n == 2:
            raise Reject('bad customer')

    await start(broker, queue, handler, max_attempts=5, **FAST)
    await broker.send(queue.name, {'n': 1})
    await broker.send(queue.name, {'n': 2})
    await calls.wait_for(3)
    letters = await _dead_letters(broker, queue.name, 1)
    assert sorted(c['n'] for c in calls.items) == [1, 1, 2]
    assert letters[0].data == {'n': 2}
    assert letters[0].error == 'rejected: bad customer'
    assert letters[0].attempts == 1


async def test_requeue_dead_letters(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    healthy = asyncio.Event()

    async def handler(n: int) -> None:
        if not healthy.is_set():
            raise Reject('downstream is down')
        calls.add({'n': n})

    await start(broker, queue, handler, **FAST)
    await broker.send_many(queue.name, [{'n': 1}, {'n': 2}])
    await _dead_letters(broker, queue.name, 2)
    healthy.set()
    assert await broker.requeue_dead_letters(queue.name) == 2
    assert sorted(c['n'] for c in await calls.wait_for(2)) == [1, 2]
    assert await broker.dead_letters(queue.name) == []


async def test_concurrency_bounds_running_handlers(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    running, peak = 0, 0
    gate = asyncio.Event()

    async def handler(n: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if running == 3:
            gate.set()
        await asyncio.wait_for(gate.wait(), 20)
        running -= 1
        calls.add({'n': n})

    await start(broker, queue, handler, concurrency=3)
    await broker.send_many(queue.name, [{'n': i} for i in range(10)])
    items = await calls.wait_for(10)
    assert sorted(item['n'] for item in items) == list(range(10))
    assert peak == 3


async def test_delayed_send_waits_then_arrives(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    await broker.send(queue.name, {'n': 'later'}, delay=0.5)
    await broker.send(queue.name, {'n': 'now'})
    assert await broker.queue_length(queue.name) == 1  # the delayed one is not waiting yet

    async def handler(n: str) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    assert await calls.wait_for(2) == [{'n': 'now'}, {'n': 'later'}]


async def test_exchange_fanout_and_topics(broker: AbstractQueueBroker) -> None:
    exchange = unique('ex')
    everything = Queue(unique(), exchange)
    users = Queue(unique(), exchange, ('user.*',))
    deep = Queue(unique(), exchange, ('#.deleted',))
    received: dict[str, Calls] = {q.name: Calls() for q in (everything, users, deep)}
    for queue in (everything, users, deep):
        async def handler(_q: str = queue.name, **data: Any) -> None:
            received[_q].add(data)
        await start(broker, queue, handler)

    await getattr(broker, exchange).send({'k': 1}, topic='user.created')
    await broker.send(exchange, {'k': 2}, topic='order.item.deleted')
    await broker.send(exchange, {'k': 3})
    assert await received[everything.name].wait_for(3) == [{'k': 1}, {'k': 2}, {'k': 3}]
    assert await received[users.name].wait_for(1) == [{'k': 1}]
    assert await received[deep.name].wait_for(1) == [{'k': 2}]
    await broker.send(users.name, {'k': 4})  # a queue is also addressed directly
    assert (await received[users.name].wait_for(2))[1] == {'k': 4}
    assert len(received[deep.name]) == 1


async def test_two_consumers_share_a_queue(
        broker_factory: Callable[[], AbstractQueueBroker]) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})

    first, second = broker_factory(), broker_factory()
    await start(first, queue, handler)
    await start(second, queue, handler)
    await first.send_many(queue.name, [{'n': i} for i in range(200)])
    items = await calls.wait_for(200)
    assert sorted(item['n'] for item in items) == list(range(200))


async def test_timeouts_with_concurrency_hit_only_the_slow_handler(
        broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    attempts: dict[int, int] = {}

    async def handler(n: int) -> None:
        attempts[n] = attempts.get(n, 0) + 1
        if n == 0 and attempts[n] == 1:
            await asyncio.sleep(30)  # cancelled by the timeout
        calls.add({'n': n, 'attempt': attempts[n]})

    await start(broker, queue, handler, timeout=0.3, concurrency=3, **FAST)
    await broker.send_many(queue.name, [{'n': i} for i in range(6)])
    items = await calls.wait_for(6)
    assert sorted((c['n'], c['attempt']) for c in items) == [(0, 2)] + [(i, 1) for i in range(1, 6)]
    assert await broker.dead_letters(queue.name) == []


async def test_long_retry_delay_does_not_block_a_short_one(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(name: str, delay: float) -> None:
        calls.add({'name': name})
        if sum(1 for c in calls.items if c['name'] == name) == 1:
            raise Retry(delay=delay)

    await start(broker, queue, handler)
    await broker.send(queue.name, {'name': 'slow', 'delay': 60})
    await broker.send(queue.name, {'name': 'fast', 'delay': 0.2})
    items = await calls.wait_for(3)
    assert [c['name'] for c in items] == ['slow', 'fast', 'fast']
