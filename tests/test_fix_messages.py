"""Regression tests of the message-path fixes: headers kept through a requeue on every broker,
headers copied on send, ids made up for foreign messages never used for idempotency."""

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from microagent_mq import Message, MessageInfo, MicroAgent, Queue, Reject, consumer
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.testing import NullBroker, TestBroker
from microagent_mq.tools import amqp_codec, nats_codec

from .conftest import Calls, unique, wait_until

FAST = {'retry_delay': 0.01, 'retry_delay_max': 0.05}


async def test_a_requeued_typed_dead_letter_is_handled_by_its_type(
        broker_factory: Callable[..., AbstractQueueBroker]) -> None:
    """Every transport hands a requeued dead letter back with its headers: its type, its own ones."""
    broker, name, calls = broker_factory(), unique('tasks'), Calls()
    rejected = [False]

    @dataclass(frozen=True)
    class First(Message, queue=name):
        n: int

    @dataclass(frozen=True)
    class Second(Message, queue=name):
        n: int

    class Agent(MicroAgent):
        @consumer(First, **FAST)
        async def first(self, dto: First, info: MessageInfo) -> None:
            if not rejected[0]:
                rejected[0] = True
                raise Reject('not now')
            calls.add({'first': dto.n, 'type': info.type_name, 'headers': info.headers,
                       'stamped': info.sent_at > 0})

        @consumer(Second, **FAST)
        async def second(self, dto: Second) -> None:
            calls.add({'second': dto.n})

    agent = Agent(broker=broker)
    await agent.start()
    try:
        await broker.publish(First(1), headers={'tenant': 'a'})
        await wait_until(lambda: broker.dead_letters(name), what='the rejected message dead-lettered')
        assert await broker.requeue_dead_letters(name) == 1

        async def handled_or_dead_again() -> bool:
            return bool(calls.items or await broker.dead_letters(name))

        await wait_until(handled_or_dead_again, what='the requeued message handled or dead again')
        assert await broker.dead_letters(name) == []
        assert calls.items == [{'first': 1, 'type': First.__mq_type__, 'headers': {'tenant': 'a'},
                                'stamped': True}]
    finally:
        await agent.stop(grace=1)


async def test_memory_requeue_by_id_keeps_the_headers() -> None:
    from microagent_mq.tools.memory import MemoryBroker

    broker, queue, seen = MemoryBroker(f'memory://{unique("fix")}'), Queue(unique()), Calls()
    rejected = [False]

    class Agent(MicroAgent):
        @consumer(queue, **FAST)
        async def handle(self, n: int, info: MessageInfo) -> None:
            if not rejected[0]:
                rejected[0] = True
                raise Reject('not now')
            seen.add(dict(info.headers))

    agent = Agent(broker=broker)
    await agent.start()
    try:
        await broker.send(queue.name, {'n': 1}, headers={'tenant': 'a'}, message_id='m-1')
        await wait_until(lambda: broker.dead_letters(queue.name), what='the message dead-lettered')
        [letter] = await broker.dead_letters(queue.name)
        assert letter.headers == {'tenant': 'a'} and letter.sent_at > 0
        assert await broker.requeue_dead_letters(queue.name, ids=['m-1']) == 1
        assert await seen.wait_for(1) == [{'tenant': 'a'}]
    finally:
        await agent.stop(grace=1)


async def test_test_broker_send_copies_the_headers() -> None:
    broker, queue, seen = TestBroker(), Queue(unique()), Calls()
    headers = {'tenant': 'a'}
    await broker.send(queue.name, {'n': 1}, headers=headers)
    headers['tenant'] = 'b'  # the caller reuses its dict

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int, info: MessageInfo) -> None:
            seen.add(dict(info.headers))

    agent = Agent(broker=broker)
    await agent.start()
    try:
        assert (await broker.process_messages()).handled == 1
        assert seen.items == [{'tenant': 'a'}]
    finally:
        await agent.stop(grace=1)


async def test_null_broker_records_a_copy_of_the_headers() -> None:
    broker, queue = NullBroker(), Queue(unique())
    headers = {'tenant': 'a'}
    await broker.send(queue.name, {'n': 1}, headers=headers)
    headers['tenant'] = 'b'
    assert broker.published_to(queue.name)[0].headers == {'tenant': 'a'}


def _amqp_message(body: bytes, message_id: str | None) -> Any:
    return SimpleNamespace(body=body, message_id=message_id, headers={})


def test_amqp_id_made_up_for_a_foreign_message_is_marked_on_every_copy() -> None:
    body = b'{"n": 1}'
    made_up, synthetic = amqp_codec.id_of(_amqp_message(body, None))
    assert made_up.startswith('body-') and synthetic
    # A retry, dead letter or release publishes a copy carrying that id: still made up.
    assert amqp_codec.id_of(_amqp_message(body, made_up)) == (made_up, True)
    # A sender's own id, even one that looks alike, is the sender's.
    assert amqp_codec.id_of(_amqp_message(body, 'order-7')) == ('order-7', False)
    assert amqp_codec.id_of(_amqp_message(b'{"n": 2}', made_up)) == (made_up, False)


def test_nats_id_made_up_for_a_foreign_message_is_marked_on_its_copies() -> None:
    assert nats_codec.id_of(None, 'mq-q-7') == ('mq-q-7', True)
    assert nats_codec.id_of({'Other': 'x'}, 'mq-q-7') == ('mq-q-7', True)
    assert nats_codec.id_of(nats_codec.message_headers('order-7'), 'mq-q-7') == ('order-7', False)
    # A dead letter's copy (then requeued: copied again) says the id was made up.
    letter = nats_codec.copy_headers({nats_codec.SYNTHETIC: '1'}, 'mq-q-7@mq-q-7', 'mq-q-7')
    requeued = nats_codec.copy_headers(letter, 'mq-q-7~requeued-1', 'mq-q-7')
    assert nats_codec.id_of(requeued, 'mq-q-9') == ('mq-q-7', True)


async def test_idempotency_ignores_an_id_the_transport_made_up() -> None:
    """A made-up id (NATS: the stream sequence, which restarts with a new stream) says nothing."""
    import logging

    from microagent_mq.consumer import Consumer
    from microagent_mq.idempotency import Idempotency
    from microagent_mq.transport import Delivery

    queue = Queue(unique())

    class Agent(MicroAgent):
        async def handle(self, n: int) -> None:
            return None

    agent = Agent(broker=NullBroker())
    bound = Consumer(agent, agent.handle, queue, 5.0,
                     {'idempotent': True, 'idempotency_store': f'memory://{unique("fix")}'})
    guard = Idempotency(bound, None, logging.getLogger('test'))
    own, made_up = Delivery(b'{}', 'mq-q-1'), Delivery(b'{}', 'mq-q-1', synthetic_id=True)
    await guard.record(made_up)
    assert not await guard.seen(own)  # a made-up id is never recorded
    await guard.record(own)
    assert await guard.seen(own)
    assert not await guard.seen(made_up)  # nor looked up
    await guard.close()


class _AsyncCall:
    """A handler object whose ``__call__`` is ``async def`` (a plain ``def`` it is not)."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def __call__(self, n: int) -> None:
        self.calls.add({'n': n})


async def test_a_handler_object_with_an_async_call_is_awaited_on_the_loop() -> None:
    from microagent_mq.tools.memory import MemoryBroker

    broker, queue, calls = MemoryBroker(f'memory://{unique("fix")}'), Queue(unique()), Calls()

    class Agent(MicroAgent):
        handle = consumer(queue, max_attempts=1)(_AsyncCall(calls))

    agent = Agent(broker=broker)
    await agent.start()
    try:
        await broker.send(queue.name, {'n': 1})

        async def settled() -> bool:
            return bool(calls.items or await broker.dead_letters(queue.name))

        await wait_until(settled, timeout_s=5, what='the handler run or the message kept')
        assert calls.items == [{'n': 1}]
    finally:
        await agent.stop(grace=1)


async def test_a_sync_callable_returning_a_coroutine_is_awaited_not_dropped() -> None:
    """No ``__wrapped__`` to tell: run in a thread, its coroutine is then awaited on the loop."""
    from microagent_mq.tools.memory import MemoryBroker

    broker, queue, calls = MemoryBroker(f'memory://{unique("fix")}'), Queue(unique()), Calls()

    async def work(n: int) -> None:
        calls.add({'n': n})

    class Agent(MicroAgent):
        @consumer(queue, max_attempts=1)
        def handle(self, n: int) -> Any:
            return work(n)  # a hand-made wrapper: returns the coroutine, keeps no __wrapped__

    agent = Agent(broker=broker)
    await agent.start()
    try:
        await broker.send(queue.name, {'n': 1})

        async def settled() -> bool:
            return bool(calls.items or await broker.dead_letters(queue.name))

        await wait_until(settled, timeout_s=5, what='the coroutine awaited or the message kept')
        assert calls.items == [{'n': 1}]
        assert await broker.dead_letters(queue.name) == []
    finally:
        await agent.stop(grace=1)


async def test_sync_handlers_behind_stuck_threads_run_with_concurrency_two() -> None:
    """Two calls stuck past their timeout: the next ones still get threads, none charged unrun."""
    import threading

    from microagent_mq.tools.memory import MemoryBroker

    broker, queue = MemoryBroker(f'memory://{unique("fix")}'), Queue(unique())
    ran: list[int] = []
    release = threading.Event()

    class Agent(MicroAgent):
        @consumer(queue, timeout=0.2, max_attempts=1, concurrency=2, **FAST)
        def handle(self, n: int) -> None:
            ran.append(n)
            if n < 2:
                release.wait(30)  # past its timeout: the thread runs on

    agent = Agent(broker=broker)
    await agent.start()
    try:
        await broker.send_many(queue.name, [{'n': i} for i in range(2)])
        await wait_until(lambda: len(ran) == 2, what='both stuck calls running')
        await wait_until(lambda: broker.dead_letters(queue.name), what='the stuck calls timed out')
        await broker.send_many(queue.name, [{'n': i} for i in range(2, 6)])
        await wait_until(lambda: set(range(2, 6)) <= set(ran), what='the later calls run')

        async def two_dead() -> bool:
            return len(await broker.dead_letters(queue.name)) >= 2

        await wait_until(two_dead, what='both stuck calls dead-lettered')
        assert await broker.queue_length(queue.name) == 0
        dead = sorted(d.data['n'] for d in await broker.dead_letters(queue.name))
        assert dead == [0, 1]  # only the calls that ran past their timeout
    finally:
        release.set()
        await agent.stop(grace=1)
