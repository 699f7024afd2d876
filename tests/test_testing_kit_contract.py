"""The delivery contract (tests/test_contract.py) on TestBroker: processing and virtual time in
place of waiting. Left out: two brokers sharing a queue (a TestBroker's queues are its own).
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from microagent_mq import MicroAgent, Queue, Reject, Retry, consumer
from microagent_mq.testing import TestBroker

from .conftest import Calls, unique
from .test_contract import FAST, Order, send_raw, start


@pytest.fixture
async def broker() -> AsyncIterator[TestBroker]:
    broker = TestBroker()
    yield broker
    await broker.close(grace=1)


async def test_send_then_consume(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(**data: Any) -> None:
        calls.add(data)

    await start(broker, queue, handler)
    await broker.send(queue.name, {'user_id': 1, 'text': 'héllo'})
    assert (await broker.process_messages()).handled == 1
    assert calls.items == [{'user_id': 1, 'text': 'héllo'}]
    assert await broker.queue_length(queue.name) == 0


async def test_sent_before_consumer_started_is_delivered(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    await getattr(broker, queue.name).send({'n': 1})
    await getattr(broker, queue.name).send({'n': 2})
    assert await getattr(broker, queue.name).length() == 2

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    await broker.process_messages()
    assert calls.items == [{'n': 1}, {'n': 2}]
    assert await broker.queue_length(queue.name) == 0


async def test_fifo_with_concurrency_one(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    await getattr(broker, queue.name).send_many([{'n': i} for i in range(50)])
    for i in range(50, 100):
        await broker.send(queue.name, {'n': i})
    await broker.process_messages()
    assert [item['n'] for item in calls.items] == list(range(100))


async def test_failing_twice_then_succeeding_is_called_three_times(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        if len(calls) < 3:
            raise RuntimeError('not yet')

    await start(broker, queue, handler, max_attempts=5, **FAST)
    await broker.send(queue.name, {'n': 7})
    report = await broker.advance(1)
    assert calls.items == [{'n': 7}] * 3
    assert (report.handled, report.retried, report.dead_lettered) == (1, 2, 0)
    assert await broker.queue_length(queue.name) == 0
    assert await broker.dead_letters(queue.name) == []


async def test_always_failing_ends_in_dead_letters(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        raise ValueError(f'cannot handle {n}')

    await start(broker, queue, handler, max_attempts=3, **FAST)
    await broker.send(queue.name, {'n': 5})
    await broker.advance(1)
    [letter] = await broker.dead_letters(queue.name)
    assert len(calls) == 3
    assert letter.data == {'n': 5}
    assert 'ValueError: cannot handle 5' in letter.error
    assert (letter.attempts, letter.queue) == (3, queue.name)
    assert await broker.queue_length(queue.name) == 0


@pytest.mark.parametrize('body', [b'not json{', b'[1, 2]', b'"text"'])
async def test_poison_body_is_dead_lettered_at_once(broker: TestBroker, body: bytes) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(**data: Any) -> None:
        calls.add(data)

    await start(broker, queue, handler, max_attempts=5, **FAST)
    await send_raw(broker, queue.name, body)
    await broker.send(queue.name, {'after': 'poison'})
    report = await broker.process_messages()
    assert calls.items == [{'after': 'poison'}]  # the queue is not blocked
    assert (report.handled, report.retried, report.dead_lettered) == (1, 0, 1)
    [letter] = await broker.dead_letters(queue.name)
    assert (letter.body, letter.attempts) == (body, 1)
    assert 'poison message' in letter.error


async def test_dto_is_built_and_rejecting_dto_dead_letters(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(order: Order, **data: Any) -> None:
        calls.add({'order': order, **data})

    await start(broker, queue, handler, dto_class=Order, dto_name='order', **FAST)
    await broker.send(queue.name, {'order_id': 1, 'amount': -3})
    await broker.send(queue.name, {'order_id': 2})
    await broker.send(queue.name, {'order_id': 3, 'amount': 9.5})
    await broker.process_messages()
    assert calls.items == [{'order': Order(3, 9.5), 'order_id': 3, 'amount': 9.5}]
    letters = await broker.dead_letters(queue.name)
    assert [letter.data['order_id'] for letter in letters] == [1, 2]
    assert 'amount must be positive' in letters[0].error
    assert all(letter.attempts == 1 for letter in letters)


async def test_missing_handler_argument_is_poison(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, user_id: int) -> None:
            calls.add({'user_id': user_id})

    await Agent(broker=broker).start()
    await broker.send(queue.name, {'other': 1})
    await broker.send(queue.name, {'user_id': 2})
    await broker.process_messages()
    assert calls.items == [{'user_id': 2}]
    [letter] = await broker.dead_letters(queue.name)
    assert "lacks arguments ['user_id']" in letter.error


async def test_handler_over_timeout_is_retried(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        if len(calls) == 1:
            await asyncio.sleep(30)  # far over the (real) timeout: cancelled by it

    await start(broker, queue, handler, timeout=0.2, **FAST)
    await broker.send(queue.name, {'n': 1})
    report = await broker.advance(1)
    assert calls.items == [{'n': 1}, {'n': 1}]
    assert (report.handled, report.retried) == (1, 1)
    assert await broker.dead_letters(queue.name) == []


async def test_timeouts_until_max_attempts_dead_letter(broker: TestBroker) -> None:
    queue = Queue(unique())

    async def handler(n: int) -> None:
        await asyncio.sleep(30)

    await start(broker, queue, handler, timeout=0.1, max_attempts=2, **FAST)
    await broker.send(queue.name, {'n': 1})
    await broker.advance(1)
    [letter] = await broker.dead_letters(queue.name)
    assert 'timed out after 0.1s' in letter.error
    assert letter.attempts == 2


async def test_retry_and_reject_from_handler(broker: TestBroker) -> None:
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
    first = await broker.process_messages()
    assert (first.handled, first.retried, first.dead_lettered) == (0, 1, 1)
    assert (await broker.advance(0.05)).handled == 1
    assert [c['n'] for c in calls.items] == [1, 2, 1]
    [letter] = await broker.dead_letters(queue.name)
    assert (letter.data, letter.error, letter.attempts) == ({'n': 2}, 'rejected: bad customer', 1)


async def test_requeue_dead_letters(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    healthy = False

    async def handler(n: int) -> None:
        if not healthy:
            raise Reject('downstream is down')
        calls.add({'n': n})

    await start(broker, queue, handler, **FAST)
    await broker.send_many(queue.name, [{'n': 1}, {'n': 2}])
    assert (await broker.process_messages()).dead_lettered == 2
    healthy = True
    assert await broker.requeue_dead_letters(queue.name) == 2
    await broker.process_messages()
    assert sorted(c['n'] for c in calls.items) == [1, 2]
    assert await broker.dead_letters(queue.name) == []


async def test_stop_waits_for_in_flight_handler(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(n: int) -> None:
        started.set()
        await release.wait()
        calls.add({'n': n})

    agent = await start(broker, queue, handler)
    await broker.send(queue.name, {'n': 1})
    processing = asyncio.create_task(broker.process_messages())
    await asyncio.wait_for(started.wait(), 20)
    stopping = asyncio.create_task(agent.stop(grace=20))
    await asyncio.sleep(0)
    assert not stopping.done() and not processing.done()
    release.set()
    await asyncio.wait_for(stopping, 20)
    assert (await asyncio.wait_for(processing, 20)).handled == 1
    assert calls.items == [{'n': 1}]
    assert await broker.queue_length(queue.name) == 0
    assert await broker.dead_letters(queue.name) == []


async def test_handler_cancelled_after_grace_gives_message_back(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    started = asyncio.Event()

    async def stuck(n: int) -> None:
        started.set()
        await asyncio.sleep(60)

    agent = await start(broker, queue, stuck, timeout=120, visibility_timeout=121)
    await broker.send(queue.name, {'n': 1})
    processing = asyncio.create_task(broker.process_messages())
    await asyncio.wait_for(started.wait(), 20)
    await agent.stop(grace=0.1)
    assert (await asyncio.wait_for(processing, 20)).handled == 0
    assert await broker.queue_length(queue.name) == 1  # given back, no attempt used

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler, timeout=120, visibility_timeout=121)
    assert (await broker.process_messages()).handled == 1
    assert calls.items == [{'n': 1}]


async def test_concurrency_bounds_running_handlers(broker: TestBroker) -> None:
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
    assert (await broker.process_messages()).handled == 10
    assert sorted(item['n'] for item in calls.items) == list(range(10))
    assert peak == 3


async def test_delayed_send_waits_then_arrives(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    await broker.send(queue.name, {'n': 'later'}, delay=0.5)
    await broker.send(queue.name, {'n': 'now'})
    assert await broker.queue_length(queue.name) == 1  # the delayed one is not waiting yet

    async def handler(n: str) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    await broker.process_messages()
    assert calls.items == [{'n': 'now'}]
    await broker.advance(0.5)
    assert calls.items == [{'n': 'now'}, {'n': 'later'}]


async def test_exchange_fanout_and_topics(broker: TestBroker) -> None:
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
    await broker.process_messages()
    assert received[everything.name].items == [{'k': 1}, {'k': 2}, {'k': 3}]
    assert received[users.name].items == [{'k': 1}]
    assert received[deep.name].items == [{'k': 2}]
    await broker.send(users.name, {'k': 4})  # a queue is also addressed directly
    await broker.process_messages()
    assert received[users.name].items == [{'k': 1}, {'k': 4}]
    assert len(received[deep.name]) == 1


async def test_timeouts_with_concurrency_hit_only_the_slow_handler(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    attempts: dict[int, int] = {}

    async def handler(n: int) -> None:
        attempts[n] = attempts.get(n, 0) + 1
        if n == 0 and attempts[n] == 1:
            await asyncio.sleep(30)  # cancelled by the timeout
        calls.add({'n': n, 'attempt': attempts[n]})

    await start(broker, queue, handler, timeout=0.3, concurrency=3, **FAST)
    await broker.send_many(queue.name, [{'n': i} for i in range(6)])
    await broker.advance(1)
    assert sorted((c['n'], c['attempt']) for c in calls.items) == [(0, 2)] + [(i, 1) for i in range(1, 6)]
    assert await broker.dead_letters(queue.name) == []


async def test_long_retry_delay_does_not_block_a_short_one(broker: TestBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(name: str, delay: float) -> None:
        calls.add({'name': name})
        if sum(1 for c in calls.items if c['name'] == name) == 1:
            raise Retry(delay=delay)

    await start(broker, queue, handler)
    await broker.send(queue.name, {'name': 'slow', 'delay': 60})
    await broker.send(queue.name, {'name': 'fast', 'delay': 0.2})
    await broker.advance(0.2)
    assert [c['name'] for c in calls.items] == ['slow', 'fast', 'fast']
    await broker.advance(60)
    assert [c['name'] for c in calls.items] == ['slow', 'fast', 'fast', 'slow']
