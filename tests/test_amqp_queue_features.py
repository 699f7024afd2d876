"""Issue 13 on RabbitMQ: what the queues are declared with, the journal, bounds and retries.

The contract suite (test_queue_features) checks the behaviour every broker shares; these
check how RabbitMQ does it: the arguments RabbitMQ holds, the journal's copies, a retry
into a full queue, the nack of a full queue, crashes with priorities and retention.
"""

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.exceptions import ChannelPreconditionFailed

from microagent_mq import (
    ConfigurationError,
    MessageInfo,
    MicroAgent,
    Queue,
    QueueFull,
    Reject,
    Retry,
    consumer,
)
from microagent_mq.tools.amqp import AMQPBroker
from microagent_mq.tools.amqp_consumer import AMQPSubscription
from microagent_mq.tools.amqp_durability import ARGUMENTS
from microagent_mq.tools.amqp_journal import journal_arguments, journal_name, segment_bytes
from microagent_mq.tools.amqp_options import due_name, queue_arguments
from microagent_mq.tools.amqp_publish import copies_of
from microagent_mq.transport import Outgoing

from .conftest import AMQP_DSN, Calls, cleanup, make_broker, unique, wait_until
from .test_crash import Workers

pytestmark = [pytest.mark.amqp, pytest.mark.timeout(120)]


@pytest.fixture
async def amqp() -> AsyncIterator[AMQPBroker]:
    namespace = unique('ns')
    broker = make_broker('amqp', namespace)
    assert isinstance(broker, AMQPBroker)
    yield broker
    await broker.close()
    await cleanup('amqp', namespace, [broker])


async def holds(name: str, arguments: dict[str, Any] | None) -> bool:
    """True when RabbitMQ takes a declaration of ``name`` with exactly ``arguments``."""
    connection = await aio_pika.connect(AMQP_DSN)
    async with connection:
        channel = await connection.channel()
        try:
            await channel.declare_queue(name, durable=True, arguments=arguments)
            return True
        except ChannelPreconditionFailed:
            return False


async def length(name: str) -> int:
    connection = await aio_pika.connect(AMQP_DSN)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


# declarations ---------------------------------------------------------------------------


def test_plain_queue_declares_as_before() -> None:
    # The very object of before: no argument added, none reordered.
    assert queue_arguments(Queue(unique()), 'classic') is ARGUMENTS['classic'] is None
    assert queue_arguments(Queue(unique()), 'quorum') is ARGUMENTS['quorum']
    assert queue_arguments(Queue(unique(), retention=60), 'classic') is None


def test_quorum_reject_queue_is_told_one_less() -> None:
    # 3.10 quorum queues refuse only once over the limit: x-max-length 3 would hold 4.
    assert queue_arguments(Queue(unique(), max_length=3), 'quorum') == {
        'x-queue-type': 'quorum', 'x-max-length': 2, 'x-overflow': 'reject-publish'}
    assert queue_arguments(Queue(unique(), max_length=3, overflow='drop_oldest'), 'quorum') == {
        'x-queue-type': 'quorum', 'x-max-length': 3, 'x-overflow': 'drop-head'}


def test_copies_of_each_kind_of_send() -> None:
    plain, kept = Queue(unique()), Queue(unique(), retention=60)
    bounded = Queue(unique(), retention=60, max_length=5)

    def copies(queue: Queue, delay: float = 0.0) -> list[tuple[str, str]]:
        message = Outgoing(b'{}', 'id', (queue.name,), delay=delay)
        return [(c.delayed_to, c.journal) for c in copies_of(message)]

    assert copies(plain) == [('', '')]  # one publish, as before
    assert copies(kept) == [('', '')]  # one publish, with BCC
    assert copies(bounded) == [('', ''), ('', journal_name(bounded.name))]
    assert copies(kept, 1) == [(kept.name, ''), ('', journal_name(kept.name))]
    assert copies(bounded, 1) == [(due_name(bounded.name), ''), ('', journal_name(bounded.name))]


def test_journal_arguments_have_units() -> None:
    assert journal_arguments(2) == {'x-queue-type': 'stream', 'x-max-age': '2s',
                                    'x-stream-max-segment-size-bytes': 100_000}
    assert journal_arguments(2.2)['x-max-age'] == '3s'  # rounded up: never kept too short
    assert segment_bytes(7 * 86400) == 500_000_000


async def test_declared_arguments(amqp: AMQPBroker) -> None:
    plain = Queue(unique())
    full = Queue(unique(), max_priority=5, max_length=3, retention=2)
    dropping = Queue(unique(), max_length=4, overflow='drop_oldest')
    for queue in (plain, full, dropping):
        await amqp.send(queue.name, {'n': 1})
    assert await holds(plain.name, None)
    assert await holds(full.name, {'x-max-priority': 5, 'x-max-length': 3,
                                   'x-overflow': 'reject-publish'})
    assert not await holds(full.name, None)  # the arguments are really there
    assert await holds(due_name(full.name), {'x-max-priority': 5})
    assert await holds(journal_name(full.name), {
        'x-queue-type': 'stream', 'x-max-age': '2s', 'x-stream-max-segment-size-bytes': 100_000})
    assert await holds(dropping.name, {'x-max-length': 4, 'x-overflow': 'drop-head'})
    for queue in (plain, dropping):  # nothing beside a queue that has no retention
        with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
            await length(journal_name(queue.name))
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await length(due_name(plain.name))


async def test_changed_options_are_a_clear_error(amqp: AMQPBroker) -> None:
    name = unique()
    await amqp.send(Queue(name, max_priority=3).name, {'n': 1})
    Queue.reset()
    Queue(name, max_priority=4)
    other = make_broker('amqp', unique('ns'))
    try:
        with pytest.raises(ConfigurationError, match=rf"queue '{name}' exists on RabbitMQ with "
                           r"other options \(inequivalent arg 'x-max-priority'"):
            await other.send(name, {'n': 1})
    finally:
        await other.close()


async def test_quorum_queue_refuses_priorities(amqp: AMQPBroker) -> None:
    queue = Queue(unique(), durability='quorum', max_priority=3)
    with pytest.raises(ConfigurationError, match='quorum queues have no priorities'):
        await amqp.send(queue.name, {'n': 1})

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            pass

    with pytest.raises(ConfigurationError, match='quorum queues have no priorities'):
        await Agent(broker=amqp).start()


# priorities -----------------------------------------------------------------------------


async def test_retry_keeps_its_priority(amqp: AMQPBroker) -> None:
    queue, calls = Queue(unique(), max_priority=3), Calls()
    retried = asyncio.Event()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=1, prefetch=0)
        async def handle(self, n: int, info: MessageInfo) -> None:
            calls.add({'n': n, 'attempt': info.attempt})
            if n == 0 and info.attempt == 1:
                raise Retry(delay=0.01)
            if n == 1:
                await retried.wait()  # until the retry waits beside 2 and 3

    await amqp.send(queue.name, {'n': 0}, priority=2)
    await amqp.send_many(queue.name, [{'n': n} for n in (1, 2, 3)])
    await Agent(broker=amqp).start()
    await calls.wait_for(2)
    await wait_until(lambda: _length_is(amqp, queue.name, 3), what='the retry back')
    retried.set()
    # Without its priority the retry would come after 2 and 3.
    assert [(c['n'], c['attempt']) for c in await calls.wait_for(5)] == [
        (0, 1), (1, 1), (0, 2), (2, 1), (3, 1)]


async def peek_priority(name: str) -> int | None:
    """The priority property of the first message of ``name``, left in place."""
    connection = await aio_pika.connect(AMQP_DSN)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True)
        message = await queue.get(no_ack=False, fail=False)
        return None if message is None else message.priority


async def test_dead_letter_and_its_requeue_keep_the_priority(amqp: AMQPBroker) -> None:
    queue, calls = Queue(unique(), max_priority=3), Calls()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=1)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})
            raise Reject('no')

    agent = Agent(broker=amqp)
    await agent.start()
    await amqp.send(queue.name, {'n': 1}, priority=2)
    await wait_until(lambda: _dead_count(amqp, queue.name, 1), what='the dead letter')
    await agent.stop()
    assert await peek_priority(f'{queue.name}.dlq') == 2
    assert await amqp.requeue_dead_letters(queue.name) == 1
    assert await peek_priority(queue.name) == 2


async def _dead_count(broker: AMQPBroker, name: str, expected: int) -> bool:
    return len(await broker.dead_letters(name)) == expected


# retention ------------------------------------------------------------------------------


async def test_journal_gets_direct_exchange_and_delayed_sends(amqp: AMQPBroker) -> None:
    exchange = unique('ex')
    direct = Queue(unique(), retention=60)
    routed = Queue(unique(), exchange=exchange, topics=('a.*',), retention=60)
    await amqp.send(direct.name, {'n': 1})
    await amqp.send(exchange, {'n': 2}, topic='a.x')
    await amqp.send(exchange, {'n': 3}, topic='b.x')  # not routed to it: not in its journal
    await amqp.send(direct.name, {'n': 4}, delay=0.05)
    await amqp.send_many(direct.name, [{'n': 5}, {'n': 6}])
    assert [m.data for m in await amqp.history(direct.name)] == [
        {'n': 1}, {'n': 4}, {'n': 5}, {'n': 6}]
    assert [m.data for m in await amqp.history(routed.name)] == [{'n': 2}]
    # The queues themselves hold each message once (the journal copy is no second delivery).
    await wait_until(lambda: _length_is(amqp, direct.name, 4), what='the delayed message')
    assert await amqp.queue_length(routed.name) == 1


async def _length_is(broker: AMQPBroker, name: str, expected: int) -> bool:
    return await broker.queue_length(name) == expected


async def test_retries_are_not_journaled(amqp: AMQPBroker) -> None:
    queue, calls = Queue(unique(), retention=60), Calls()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=1)
        async def handle(self, n: int, info: MessageInfo) -> None:
            calls.add({'attempt': info.attempt})
            if info.attempt < 3:
                raise Retry(delay=0.01)

    await Agent(broker=amqp).start()
    await amqp.send(queue.name, {'n': 1})
    await calls.wait_for(3)
    assert [m.data for m in await amqp.history(queue.name)] == [{'n': 1}]


async def test_history_pages_by_stream_offset(amqp: AMQPBroker) -> None:
    queue = Queue(unique(), retention=60)
    await amqp.send_many(queue.name, [{'n': i} for i in range(7)])
    first, position = await amqp._retained(queue.name, None, None, None, 3)
    second, position2 = await amqp._retained(queue.name, None, None, position, 3)
    third, end = await amqp._retained(queue.name, None, None, position2, 3)
    assert [m.data['n'] for m in first + second + third] == list(range(7))
    assert [m.position for m in first] == sorted(m.position for m in first)
    assert end is None
    assert await amqp._retained(queue.name, None, None, third[-1].position, 3) == ([], None)


async def test_journal_really_trims(amqp: AMQPBroker) -> None:
    """Not only hidden: RabbitMQ drops the old segment once newer ones follow."""
    queue = Queue(unique(), retention=1)
    await amqp.send(queue.name, {'n': 'old'})
    await asyncio.sleep(1.5)  # past the window: the point of the test, not a synchronisation
    filler = 'x' * 20_000

    async def old_gone() -> bool:
        await amqp.send_many(queue.name, [{'n': 'new', 'pad': filler}] * 3)  # new segments
        return await _stream_head(journal_name(queue.name)) != {'n': 'old'}

    await wait_until(old_gone, what='old segment deleted')


async def _stream_head(name: str) -> Any:
    connection = await aio_pika.connect(AMQP_DSN)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        stream = await channel.get_queue(name, ensure=False)
        first: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def on(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not first.done():
                first.set_result(message.body)

        await stream.consume(on, arguments={'x-stream-offset': 'first'})
        import orjson

        return orjson.loads(await asyncio.wait_for(first, 10))


# bounded queues -------------------------------------------------------------------------


async def test_full_queue_nack_is_queue_full_and_stores_nothing(amqp: AMQPBroker) -> None:
    queue = Queue(unique(), max_length=2, retention=60)
    await amqp.send(queue.name, {'n': 1})
    await amqp.send(queue.name, {'n': 2})
    with pytest.raises(QueueFull, match=rf"queue '{queue.name}' is full"):
        await amqp.send(queue.name, {'n': 3})
    with pytest.raises(QueueFull, match='none was sent'):
        await amqp.send_many(queue.name, [{'n': 4}, {'n': 5}])
    assert await amqp.queue_length(queue.name) == 2
    assert [m.data for m in await amqp.history(queue.name)] == [{'n': 1}, {'n': 2}]


async def test_send_many_that_does_not_fit_stores_none(amqp: AMQPBroker) -> None:
    queue = Queue(unique(), max_length=3)
    await amqp.send(queue.name, {'n': 0})
    with pytest.raises(QueueFull, match=r'3 message\(s\) do not fit beside the 1 waiting'):
        await amqp.send_many(queue.name, [{'n': i} for i in range(1, 4)])
    assert await amqp.queue_length(queue.name) == 1
    await amqp.send_many(queue.name, [{'n': 1}, {'n': 2}])
    assert await amqp.queue_length(queue.name) == 3


async def test_drop_oldest_keeps_the_newest(amqp: AMQPBroker) -> None:
    queue, calls = Queue(unique(), max_length=2, overflow='drop_oldest'), Calls()
    for n in range(5):
        await amqp.send(queue.name, {'n': n})
    assert await amqp.queue_length(queue.name) == 2

    class Agent(MicroAgent):
        @consumer(queue, concurrency=1)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})

    await Agent(broker=amqp).start()
    assert await calls.wait_for(2) == [{'n': 3}, {'n': 4}]


async def test_retry_into_a_full_queue_is_not_lost(amqp: AMQPBroker) -> None:
    """RabbitMQ drops what the delay ladder dead-letters into a full queue: ours go to .due."""
    queue, calls = Queue(unique(), max_length=2), Calls()
    gate = asyncio.Event()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=2, prefetch=0, retry_delay=0.01)
        async def handle(self, n: int, info: MessageInfo) -> None:
            calls.add({'n': n, 'attempt': info.attempt})
            if n == 0 and info.attempt == 1:
                raise Retry(delay=1.0)
            if n != 0:
                await gate.wait()  # holds every slot, so the queue stays full

    await Agent(broker=amqp).start()
    await amqp.send(queue.name, {'n': 0})
    await calls.wait_for(1)
    for n in (1, 2):  # both slots held
        await amqp.send(queue.name, {'n': n})
    await calls.wait_for(3)
    await amqp.send_many(queue.name, [{'n': 3}, {'n': 4}])  # the queue is full
    with pytest.raises(QueueFull):
        await amqp.send(queue.name, {'n': 5})
    assert await amqp.queue_length(queue.name) == 2
    # The retry arrives while the queue is full, through q.due, and waits in the consumer's
    # buffer for a free slot (a dead-lettering into the full queue would have dropped it).
    subscription = next(iter(amqp._runners.values()))._sub
    assert isinstance(subscription, AMQPSubscription)
    await wait_until(lambda: any(m.body == b'{"n":0}' for m in subscription._incoming),
                     what='the retry back')
    assert await amqp.queue_length(queue.name) == 2  # nothing left room for it
    gate.set()
    await calls.wait_for(6)
    assert {'n': 0, 'attempt': 2} in calls.items
    assert sorted(c['n'] for c in calls.items) == [0, 0, 1, 2, 3, 4]


async def test_delayed_republish_into_a_full_queue_waits_beside_it(amqp: AMQPBroker) -> None:
    """The path of every retry, with no consumer to take it: counted in the queue's length."""
    queue = Queue(unique(), max_length=2)
    await amqp.send_many(queue.name, [{'n': 1}, {'n': 2}])
    await amqp.republish(queue.name, b'{"n":0}', 'retried', 2, delay=0.05, priority=0)
    await amqp.republish(queue.name, b'{"n":9}', 'released', 1)
    await wait_until(lambda: _length_is(amqp, queue.name, 4), what='both kept')
    assert await length(queue.name) == 2
    assert await length(due_name(queue.name)) == 2


async def test_release_into_a_full_queue_keeps_its_attempt(amqp: AMQPBroker) -> None:
    """A full queue fails a transaction that publishes into it: releases go to q.due.

    Into the full queue, the release's commit would fail, the message would be requeued by a
    nack and come back counted as a crash (attempt 2).
    """
    queue, calls = Queue(unique(), max_length=1), Calls()
    started, gate = asyncio.Event(), asyncio.Event()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=1, prefetch=1)
        async def handle(self, n: int, info: MessageInfo) -> None:
            calls.add({'n': n, 'attempt': info.attempt})
            started.set()
            await gate.wait()

    agent = Agent(broker=amqp)
    await agent.start()
    await amqp.send(queue.name, {'n': 1})
    await started.wait()
    await amqp.send(queue.name, {'n': 2})  # prefetched: buffered, not handled
    await wait_until(lambda: _length_is(amqp, queue.name, 0), what='n=2 prefetched')
    await amqp.send(queue.name, {'n': 3})  # the queue is full again
    stopping = asyncio.create_task(agent.stop(grace=5))

    def stop_began() -> bool:
        runner = amqp._stopping.get(queue.name)
        return runner is not None and runner._stopping

    await wait_until(stop_began, what='the stop to begin')  # else n=2 may start after n=1
    gate.set()  # n=1 is handled; n=2, buffered, is released after it
    await stopping
    assert (await length(queue.name), await length(due_name(queue.name))) == (1, 1)
    await Agent(broker=amqp).start()
    assert sorted((c['n'], c['attempt']) for c in await calls.wait_for(3)) == [
        (1, 1), (2, 1), (3, 1)]


# crashes --------------------------------------------------------------------------------


@pytest.fixture
async def crash(tmp_path: Path) -> AsyncIterator[tuple[AMQPBroker, Workers]]:
    namespace = unique('ns')
    broker = make_broker('amqp', namespace)
    assert isinstance(broker, AMQPBroker)
    workers = Workers('amqp', namespace, unique(), tmp_path)
    yield broker, workers
    workers.kill_all()
    await broker.close()
    await cleanup('amqp', namespace, [broker])


async def test_sigkill_with_priorities_and_retention(crash: tuple[AMQPBroker, Workers]) -> None:
    broker, workers = crash
    declared = {'max_priority': 3, 'retention': 60}
    queue = Queue(workers.queue, **declared)
    options = {'timeout': 1, 'visibility_timeout': 2, 'max_attempts': 3, 'queue': declared}
    doomed = await workers.start('hang', **options)
    await broker.send(queue.name, {'n': 1}, priority=1)
    await wait_until(lambda: bool(workers.started(1)), what='handler started')
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    for n in range(2, 6):
        await broker.send(queue.name, {'n': n}, priority=3 if n == 5 else 0)
    await workers.start('record', concurrency=1, prefetch=0, **options)
    await wait_until(lambda: len(workers.handled()) == 5, timeout_s=30, what='all handled')
    handled = workers.handled()
    assert sorted(handled) == [1, 2, 3, 4, 5]
    assert handled[0] == 5  # the highest priority first, the crashed one with its own
    # The crash count republishes n=1 with its priority; the ack that frees the consumer's
    # slot can reach RabbitMQ's queue before the copy does, so one 0 may overtake it: no more.
    assert handled.index(1) < handled.index(3)
    assert [m.data['n'] for m in await broker.history(queue.name)] == [1, 2, 3, 4, 5]
