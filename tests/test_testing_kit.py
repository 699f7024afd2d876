"""The testing kit: NullBroker records, TestBroker runs on demand on a virtual clock."""

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from microagent_mq import (
    ConfigurationError,
    MicroAgent,
    Queue,
    QueueException,
    QueueNotFound,
    Retry,
    SerializingError,
    consumer,
    get_default_broker,
    override_broker,
    set_default_broker,
)
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.testing import NullBroker, Published, TestBroker, VirtualClock
from microagent_mq.tools.memory import MemoryBroker

from .conftest import Calls, unique


async def start(broker: AbstractQueueBroker, queue: Queue, handler: Callable[..., Awaitable[None]],
                **options: Any) -> MicroAgent:
    class Agent(MicroAgent):
        @consumer(queue, **options)
        async def handle(self, **data: Any) -> None:
            await handler(**data)

    agent = Agent(broker=broker)
    await agent.start()
    return agent


async def let_the_loop_run(turns: int = 50) -> None:
    """Give every task many turns: a consumer that could fetch would have by then."""
    for _ in range(turns):
        await asyncio.sleep(0)


# NullBroker ---------------------------------------------------------------------------------


async def test_null_broker_records_sends_with_parsed_data_and_options() -> None:
    queue, broker = Queue(unique()), NullBroker()
    await broker.send(queue.name, {'user_id': 1, 'text': 'héllo'})
    await broker.send(queue.name, '{"raw": true}', delay=30)
    await getattr(broker, queue.name).send_many([{'n': 1}, {'n': 2}])
    assert [p.data for p in broker.published] == [
        {'user_id': 1, 'text': 'héllo'}, {'raw': True}, {'n': 1}, {'n': 2}]
    assert [p.delay for p in broker.published] == [0.0, 30.0, 0.0, 0.0]
    first = broker.published[0]
    assert (first.queue, first.queues, first.topic, first.message, first.headers) == (
        queue.name, (queue.name,), '', None, None)
    assert len({p.message_id for p in broker.published}) == 4
    assert await broker.queue_length(queue.name) == 0  # recorded, not stored


async def test_null_broker_records_exchange_sends_with_the_queues_that_take_a_copy() -> None:
    exchange = unique('ex')
    users, audit, other = (Queue(unique(), exchange, ('user.*',)), Queue(unique(), exchange),
                           Queue(unique()))
    broker = NullBroker()
    await broker.send(exchange, {'k': 1}, topic='user.created')
    await broker.send(exchange, {'k': 2}, topic='order.paid')
    await broker.send(other.name, {'k': 3})
    record = broker.published[0]
    assert (record.queue, record.topic, sorted(record.queues)) == (
        exchange, 'user.created', sorted([users.name, audit.name]))
    assert [p.data['k'] for p in broker.published_to(exchange)] == [1, 2]
    assert [p.data['k'] for p in broker.published_to(users.name)] == [1]
    assert [p.data['k'] for p in broker.published_to(audit.name)] == [1, 2]
    assert [p.data['k'] for p in broker.published_to(other.name)] == [3]
    broker.clear()
    assert broker.published == [] and broker.published_to(other.name) == []


@pytest.mark.parametrize(('send', 'error', 'match'), [
    (lambda b, q: b.send(q, {'when': object()}), SerializingError, 'not JSON-serialisable'),
    (lambda b, q: b.send(q, {1, 2}), SerializingError, 'must be str, bytes or dict'),
    (lambda b, q: b.send(q, b'not json{'), SerializingError, 'not valid JSON'),
    (lambda b, q: b.send_many(q, [{'n': 1}, {'n': float}]), SerializingError, 'not JSON'),
    (lambda b, q: b.send(q, {'n': 1}, urgency=3), ConfigurationError, 'unknown send options'),
    (lambda b, q: b.send(q, {'n': 1}, priority=3), ConfigurationError, 'has no priorities'),
    (lambda b, q: b.send(q, {'n': 1}, delay=-1), ConfigurationError, 'invalid delay'),
    (lambda b, q: b.send('never_declared', {'n': 1}), QueueNotFound, 'never_declared'),
])
async def test_null_broker_refuses_what_a_real_broker_refuses(
        send: Callable[[NullBroker, str], Awaitable[None]], error: type[Exception],
        match: str) -> None:
    queue, broker = Queue(unique()), NullBroker()
    with pytest.raises(error, match=match):
        await send(broker, queue.name)
    assert broker.published == []


async def test_null_broker_pairs_published_message_objects_in_order_per_task() -> None:
    queue, broker = Queue(unique()), NullBroker()
    both_inside, b_sent = asyncio.Barrier(2), asyncio.Event()

    async def publish(tag: str) -> None:
        # What the typed layer's publish_many does: objects in, one record each, in order.
        with broker._publishing([f'{tag}-1', f'{tag}-2']):
            await both_inside.wait()  # both tasks are inside their block at once
            if tag == 'a':
                await b_sent.wait()  # the one that entered first sends last
            await broker.send_many(queue.name, [{'tag': tag, 'n': 1}, {'tag': tag, 'n': 2}])
            b_sent.set()

    await asyncio.gather(publish('a'), publish('b'))
    await broker.send(queue.name, {'tag': 'plain', 'n': 0})
    assert sorted((p.data['tag'], p.data['n'], p.message) for p in broker.published) == [
        ('a', 1, 'a-1'), ('a', 2, 'a-2'), ('b', 1, 'b-1'), ('b', 2, 'b-2'), ('plain', 0, None)]


async def test_agent_on_null_broker_gets_nothing_and_stops() -> None:
    queue, broker, calls = Queue(unique()), NullBroker(), Calls()

    async def handler(**data: Any) -> None:
        calls.add(data)

    agent = await start(broker, queue, handler)
    await broker.send(queue.name, {'n': 1})
    await let_the_loop_run()
    await agent.stop(grace=1)
    assert calls.items == [] and len(broker.published) == 1


# TestBroker: on demand ------------------------------------------------------------------------


async def test_nothing_is_delivered_until_process_messages() -> None:
    queue, broker, calls = Queue(unique()), TestBroker(), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await broker.send(queue.name, {'n': 1})
    await start(broker, queue, handler)
    await broker.send(queue.name, {'n': 2})
    await let_the_loop_run()
    assert calls.items == [] and await broker.queue_length(queue.name) == 2
    report = await broker.process_messages()
    assert calls.items == [{'n': 1}, {'n': 2}]
    assert (report.handled, report.retried, report.dead_lettered, report.errors) == (2, 0, 0, ())
    await broker.send(queue.name, {'n': 3})
    await let_the_loop_run()
    assert len(calls) == 2  # processing is off again once process_messages returned
    assert (await broker.process_messages()).handled == 1
    await broker.close()


async def test_process_messages_runs_chains_across_agents_to_the_end() -> None:
    first, second, third = Queue(unique()), Queue(unique()), Queue(unique())
    broker, calls = TestBroker(), Calls()

    async def forward(n: int) -> None:
        await broker.send(second.name, {'n': n + 1})

    async def fan_out(n: int) -> None:
        await broker.send_many(third.name, [{'n': n * 10 + i} for i in range(3)])

    async def record(n: int) -> None:
        calls.add({'n': n})

    await start(broker, first, forward)
    await start(broker, second, fan_out, concurrency=4)
    await start(broker, third, record, concurrency=2)
    await broker.send_many(first.name, [{'n': 1}, {'n': 5}])
    report = await broker.process_messages()
    assert sorted(c['n'] for c in calls.items) == [20, 21, 22, 60, 61, 62]
    assert report.handled == 2 + 2 + 6
    assert [await broker.queue_length(q.name) for q in (first, second, third)] == [0, 0, 0]
    await broker.close()


async def test_process_messages_waits_for_slow_handlers_of_a_concurrent_consumer() -> None:
    queue, broker, calls = Queue(unique()), TestBroker(), Calls()
    gate = asyncio.Event()
    running = 0

    async def handler(n: int) -> None:
        nonlocal running
        running += 1
        if running == 3:
            gate.set()
        await gate.wait()
        await asyncio.sleep(0.01 * n)  # they finish at different times, in reverse order
        calls.add({'n': n})

    await start(broker, queue, handler, concurrency=3)
    await broker.send_many(queue.name, [{'n': n} for n in (3, 2, 1, 0, 0, 0)])
    report = await broker.process_messages()
    assert report.handled == 6 and len(calls) == 6
    await broker.close()


# TestBroker: virtual time ---------------------------------------------------------------------


async def test_retry_delay_30_max_attempts_4_reaches_dead_letters_through_advance(
        capsys: pytest.CaptureFixture[str]) -> None:
    queue, broker = Queue(unique()), TestBroker()
    attempts_at: list[float] = []

    async def handler(n: int) -> None:
        attempts_at.append(broker.clock.now())
        raise RuntimeError(f'cannot handle {n}')

    await start(broker, queue, handler, retry_delay=30, max_attempts=4)
    await broker.send(queue.name, {'n': 7})
    wall = time.perf_counter()
    first = await broker.process_messages()
    rest = await broker.advance(3600)
    wall = time.perf_counter() - wall
    with capsys.disabled():
        print(f'\n[testing kit] 4 attempts over {broker.clock.now():.0f} virtual s '
              f'took {wall * 1000:.1f} ms of wall time')
    assert attempts_at == [0, 30, 90, 210]  # backoff 30, 60, 120: exponential, on the clock
    assert (first.retried, first.dead_lettered) == (1, 0)
    assert (rest.handled, rest.retried, rest.dead_lettered) == (0, 2, 1)
    [letter] = await broker.dead_letters(queue.name)
    assert (letter.data, letter.attempts) == ({'n': 7}, 4)
    assert letter.error == 'RuntimeError: cannot handle 7 (attempt 4 of 4)'
    assert broker.clock.now() == 3600
    await broker.close()


async def test_backoff_is_not_due_before_its_time() -> None:
    queue, broker, calls = Queue(unique()), TestBroker(), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n, 'at': broker.clock.now()})
        if len(calls) == 1:
            raise RuntimeError('first attempt fails')

    await start(broker, queue, handler, retry_delay=30)
    await broker.send(queue.name, {'n': 1})
    assert (await broker.process_messages()).retried == 1
    assert await broker.queue_length(queue.name) == 0  # delayed, not waiting
    assert (await broker.process_messages()).handled == 0
    assert (await broker.advance(29.5)).handled == 0 and len(calls) == 1
    report = await broker.advance(0.5)
    assert report.handled == 1
    assert calls.items == [{'n': 1, 'at': 0.0}, {'n': 1, 'at': 30.0}]
    await broker.close()


async def test_retry_delay_from_handler_and_delayed_sends_follow_the_clock() -> None:
    queue, broker, calls = Queue(unique()), TestBroker(), Calls()

    async def handler(name: str) -> None:
        calls.add({'name': name, 'at': broker.clock.now()})
        if name == 'asks' and sum(1 for c in calls.items if c['name'] == 'asks') == 1:
            raise Retry(delay=60)

    await start(broker, queue, handler)
    await broker.send(queue.name, {'name': 'later'}, delay=45)
    await broker.send(queue.name, {'name': 'asks'})
    await broker.send(queue.name, {'name': 'soon'}, delay=10)
    report = await broker.advance(100)
    assert [(c['name'], c['at']) for c in calls.items] == [
        ('asks', 0), ('soon', 10), ('later', 45), ('asks', 60)]
    assert (report.handled, report.retried) == (3, 1)
    await broker.close()


async def test_advance_without_consumers_makes_delayed_messages_wait() -> None:
    queue, broker = Queue(unique()), TestBroker(clock=VirtualClock(start=100))
    await broker.send(queue.name, {'n': 1}, delay=5)
    assert await broker.queue_length(queue.name) == 0
    await broker.advance(4.9)
    assert await broker.queue_length(queue.name) == 0
    await broker.advance(0.1)
    assert await broker.queue_length(queue.name) == 1
    assert broker.clock.now() == 105


async def test_handler_timeouts_keep_real_time() -> None:
    queue, broker, calls = Queue(unique()), TestBroker(), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        if len(calls) == 1:
            await asyncio.Event().wait()  # never returns: only the real timeout ends it

    await start(broker, queue, handler, timeout=0.2, retry_delay=5)
    await broker.send(queue.name, {'n': 1})
    first = await broker.process_messages()
    assert (first.handled, first.retried, first.errors) == (0, 1, ())
    assert (await broker.advance(5)).handled == 1
    assert len(calls) == 2
    await broker.close()


@pytest.mark.parametrize('seconds', [-1, -0.001, math.nan, math.inf, '1', True, None])
async def test_advance_refuses_what_is_not_seconds(seconds: Any) -> None:
    broker = TestBroker()
    with pytest.raises(ConfigurationError, match=r'advance\(.*\): seconds must be a finite number >= 0'):
        await broker.advance(seconds)
    assert broker.clock.now() == 0


def test_clock_never_goes_back() -> None:
    clock = VirtualClock()
    assert clock.advance(2) == 2
    with pytest.raises(ConfigurationError, match='cannot go back'):
        clock.move_to(1)
    with pytest.raises(ConfigurationError, match='VirtualClock'):
        VirtualClock(start=-1)


# TestBroker: errors ---------------------------------------------------------------------------


async def test_raise_errors_reraises_the_first_handler_exception_after_settling() -> None:
    queue, broker = Queue(unique()), TestBroker()
    raised: list[Exception] = []

    async def handler(n: int) -> None:
        raised.append(KeyError(n) if n == 1 else ValueError(n))
        raise raised[-1]

    await start(broker, queue, handler, max_attempts=1)
    await broker.send_many(queue.name, [{'n': 1}, {'n': 2}])
    with pytest.raises(KeyError) as info:
        await broker.process_messages(raise_errors=True)
    assert info.value is raised[0]
    assert len(await broker.dead_letters(queue.name)) == 2  # everything settled first
    await broker.send(queue.name, {'n': 3})
    report = await broker.process_messages()  # default: reported, not raised
    assert report.errors == (raised[2],) and report.dead_lettered == 1
    await broker.close()


async def test_handler_errors_are_kept_when_logging_hides_them(
        caplog: pytest.LogCaptureFixture) -> None:
    queue, broker = Queue(unique()), TestBroker()

    async def handler(n: int) -> None:
        raise RuntimeError('hidden')

    await start(broker, queue, handler, max_attempts=1)
    await broker.send(queue.name, {'n': 1})
    with caplog.at_level(logging.CRITICAL, logger='microagent_mq'):
        report = await broker.process_messages()
    assert [str(e) for e in report.errors] == ['hidden']
    assert caplog.records == []  # the user's logging configuration still decides what shows
    await broker.send(queue.name, {'n': 2})
    with caplog.at_level(logging.WARNING, logger='microagent_mq'):
        await broker.process_messages()
    assert any('failed on message' in r.getMessage() for r in caplog.records)
    await broker.close()


async def test_process_messages_with_the_agent_on_another_broker_is_a_clear_error() -> None:
    queue, broker, elsewhere = Queue(unique()), TestBroker(), MemoryBroker(f'memory://{unique()}')

    async def handler(n: int) -> None:
        raise AssertionError('never called')

    await start(elsewhere, queue, handler)
    await broker.send(queue.name, {'n': 1})
    with pytest.raises(QueueException, match=rf"'{queue.name}' has messages waiting on this "
                       r'TestBroker, but its agent consumes on MemoryBroker'):
        await broker.process_messages()
    await elsewhere.close()


def test_test_broker_left_consuming_by_an_earlier_loop_is_no_error() -> None:
    queue, earlier, broker = Queue(unique()), TestBroker(), TestBroker()

    async def handler(n: int) -> None:
        raise AssertionError('never called')

    async def leave_running() -> None:  # a test that forgot to stop its agent
        await start(earlier, queue, handler)

    async def process() -> int:
        await broker.send(queue.name, {'n': 1})
        return (await broker.process_messages()).handled

    asyncio.run(leave_running())
    assert earlier.info()['consuming'] == [queue.name]
    assert asyncio.run(process()) == 0


def test_test_broker_reused_after_its_agents_loop_ended_processes_without_them() -> None:
    queue, broker = Queue(unique()), TestBroker()

    async def handler(n: int) -> None:
        raise AssertionError('never called')

    async def leave_running() -> None:
        await start(broker, queue, handler)

    async def process() -> tuple[int, int]:
        await broker.send(queue.name, {'n': 1})
        return (await broker.process_messages()).handled, await broker.queue_length(queue.name)

    asyncio.run(leave_running())
    assert asyncio.run(asyncio.wait_for(process(), 10)) == (0, 1)


async def test_messages_nobody_consumes_wait_without_error() -> None:
    queue, broker = Queue(unique()), TestBroker()
    await broker.send(queue.name, {'n': 1})
    assert (await broker.process_messages()).handled == 0
    assert await broker.queue_length(queue.name) == 1


async def test_process_messages_from_a_handler_is_a_clear_error() -> None:
    queue, broker, calls = Queue(unique()), TestBroker(), Calls()

    async def handler(n: int) -> None:
        try:
            await broker.process_messages()
        except QueueException as exc:
            calls.add({'error': str(exc)})

    await start(broker, queue, handler)
    await broker.send(queue.name, {'n': 1})
    assert (await broker.process_messages()).handled == 1
    assert calls.items == [{'error': 'process_messages() or advance() is already running on '
                                     'this broker (awaited from a handler?)'}]
    await broker.close()


async def test_handlers_sending_to_each_other_forever_end_in_a_clear_error() -> None:
    ping, pong, broker = Queue(unique()), Queue(unique()), TestBroker(max_deliveries=50)
    volleys = Calls()

    async def hit(to: str) -> None:
        volleys.add({'to': to})
        await broker.send(to, {'to': pong.name if to == ping.name else ping.name})

    await start(broker, ping, hit)
    await start(broker, pong, hit)
    await broker.send(ping.name, {'to': pong.name})
    with pytest.raises(QueueException, match=r'still busy after 5\d deliveries \(max_deliveries=50\)'):
        await broker.process_messages()
    stopped_at = len(volleys)
    await let_the_loop_run()
    assert len(volleys) <= stopped_at + 1  # processing is off again (one may have been in flight)
    await broker.close()


async def test_requeued_dead_letters_are_processed_again() -> None:
    queue, broker, calls = Queue(unique()), TestBroker(), Calls()
    healthy = False

    async def handler(n: int) -> None:
        if not healthy:
            raise RuntimeError('down')
        calls.add({'n': n})

    await start(broker, queue, handler, max_attempts=2, retry_delay=1)
    await broker.send_many(queue.name, [{'n': 1}, {'n': 2}])
    assert (await broker.advance(1)).dead_lettered == 2
    healthy = True
    assert await broker.requeue_dead_letters(queue.name) == 2
    assert (await broker.process_messages()).handled == 2
    assert calls.items == [{'n': 1}, {'n': 2}] and await broker.dead_letters(queue.name) == []
    await broker.close()


# The default broker -----------------------------------------------------------------------------


async def test_override_broker_routes_sends_of_the_code_under_test() -> None:
    queue, broker = Queue(unique()), NullBroker()

    async def register_user(email: str) -> None:  # the code under test
        await get_default_broker().send(queue.name, {'email': email})

    with override_broker(broker):
        await register_user('john@example.com')
    assert [p.data for p in broker.published_to(queue.name)] == [{'email': 'john@example.com'}]


async def test_agent_without_broker_runs_on_the_overriding_test_broker() -> None:
    queue, calls = Queue(unique()), Calls()
    set_default_broker(None)

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})

    broker = TestBroker()
    with override_broker(broker):
        agent = Agent()
        await agent.start()
    await broker.send(queue.name, {'n': 1})
    assert (await broker.process_messages()).handled == 1
    assert calls.items == [{'n': 1}]
    await agent.stop()


def test_published_is_a_plain_record() -> None:
    record = Published('q', '', {'n': 1})
    assert (record.message, record.headers, record.delay, record.queues) == (None, None, 0.0, ())
