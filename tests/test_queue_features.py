"""Issue 13's contract, the same on every broker: replay and history, retention trimming,
priorities (with retries and delayed sends), bounded queues.

Brokers without a feature refuse it with a clear error; their cases skip with the reason.
"""

import asyncio
import time
from typing import Any

import pytest

from microagent_mq import MessageInfo, MicroAgent, Queue, QueueException, QueueFull, Retry, consumer
from microagent_mq.broker import AbstractQueueBroker

from .conftest import Calls, unique, wait_until

FAST = {'retry_delay': 0.01, 'retry_delay_max': 0.05}
# Brokers whose queues cannot take priorities (refused at declaration or subscription).
NO_PRIORITIES = {'nats': 'JetStream has no message priorities',
                 'amqp_quorum': 'RabbitMQ 3.10 quorum queues have no priorities'}


def skip_without_priorities(broker_kind: str) -> None:
    if broker_kind in NO_PRIORITIES:
        pytest.skip(NO_PRIORITIES[broker_kind])


async def length_is(broker: AbstractQueueBroker, name: str, expected: int) -> bool:
    return await broker.queue_length(name) == expected


async def recorder(broker: AbstractQueueBroker, queue: Queue, calls: Calls, **options: Any) -> MicroAgent:
    """An agent recording each message with its id, attempt and replayed_from header."""

    class Agent(MicroAgent):
        @consumer(queue, **options)
        async def handle(self, n: int, info: MessageInfo) -> None:
            calls.add({'n': n, 'id': info.message_id, 'attempt': info.attempt,
                       'replayed_from': info.headers.get('replayed_from')})

    agent = Agent(broker=broker)
    await agent.start()
    return agent


# retention and replay -----------------------------------------------------------------

async def test_history_lists_what_was_sent_in_order_without_sending(broker: AbstractQueueBroker) -> None:
    queue = Queue(unique(), retention=600)
    before = time.time()
    for n in range(5):
        await broker.send(queue.name, {'n': n})
    entries = await broker.history(queue.name)
    assert [e.data for e in entries] == [{'n': n} for n in range(5)]
    assert len({e.message_id for e in entries}) == 5
    assert all(before - 1 <= e.sent_at <= time.time() + 1 for e in entries)
    assert [e.data['n'] for e in await broker.history(queue.name, limit=2)] == [0, 1]
    assert await broker.queue_length(queue.name) == 5  # nothing sent, nothing taken


async def test_replay_by_time_and_by_id_sends_copies_in_order(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique(), retention=600), Calls()
    await recorder(broker, queue, calls)
    for n in range(3):
        await broker.send(queue.name, {'n': n})
    await calls.wait_for(3)
    await asyncio.sleep(0.05)  # the second batch is sent strictly later
    middle = time.time()
    await asyncio.sleep(0.05)
    for n in range(3, 6):
        await broker.send(queue.name, {'n': n})
    originals = {item['n']: item['id'] for item in await calls.wait_for(6)}
    assert [item['replayed_from'] for item in calls.items] == [None] * 6

    assert await broker.replay(queue.name, since=middle) == 3
    replayed = (await calls.wait_for(9))[6:]
    assert [item['n'] for item in replayed] == [3, 4, 5]
    assert [item['replayed_from'] for item in replayed] == [originals[3], originals[4], originals[5]]
    assert all(item['attempt'] == 1 and item['id'] != originals[item['n']] for item in replayed)

    # from an id (inclusive) up to a time: the replayed copies sent just now are not replayed
    assert await broker.replay(queue.name, from_id=originals[1], until=middle) == 2
    assert [(item['n'], item['replayed_from']) for item in (await calls.wait_for(11))[9:]] == [
        (1, originals[1]), (2, originals[2])]
    # 4, 5, then the copies of 3, 4, 5 and of 1, 2 (retained too, in the order they were sent)
    assert await broker.replay(queue.name, from_id=originals[4]) == 7
    items = (await calls.wait_for(18))[11:]
    assert [item['n'] for item in items] == [4, 5, 3, 4, 5, 1, 2]
    with pytest.raises(QueueException, match='retains no message'):
        await broker.replay(queue.name, from_id='no-such-id')
    await wait_until(lambda: length_is(broker, queue.name, 0), what='an empty queue')
    assert len(calls) == 18


async def test_retention_trims_old_messages_but_never_an_unhandled_one(
        broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique(), retention=2), Calls()
    await broker.send(queue.name, {'n': 1})  # nobody consumes it yet
    assert [e.data for e in await broker.history(queue.name)] == [{'n': 1}]

    async def forgotten() -> bool:
        await broker.send(queue.name, {'n': 0})  # a send may be what trims
        return all(e.data['n'] == 0 for e in await broker.history(queue.name, limit=1000))

    await wait_until(forgotten, timeout_s=60, what='the first message to leave the history')
    # gone from the history, but never handled: still delivered
    await recorder(broker, queue, calls)
    items = await calls.wait_for(1)
    assert items[0]['n'] == 1
    await wait_until(lambda: length_is(broker, queue.name, 0), what='an empty queue')
    assert sorted(item['n'] for item in calls.items)[-1] == 1
    assert await broker.replay(queue.name, since=time.time() + 3600) == 0


# priorities ---------------------------------------------------------------------------

async def test_higher_priorities_first_with_retries_and_delayed_sends(
        broker: AbstractQueueBroker, broker_kind: str) -> None:
    skip_without_priorities(broker_kind)
    queue, order = Queue(unique(), max_priority=2), []
    first_gate, second_gate = asyncio.Event(), asyncio.Event()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=1, prefetch=0, max_attempts=3, **FAST)
        async def handle(self, name: str, info: MessageInfo) -> None:
            order.append(f'{name}#{info.attempt}')
            if name == 'r' and info.attempt == 1:
                await first_gate.wait()
                raise Retry(delay=0.01)  # back as p1, behind the p1 messages already waiting
            if name == 'c':
                await second_gate.wait()

    await broker.send(queue.name, {'name': 'r'}, priority=1)
    await Agent(broker=broker).start()
    await wait_until(lambda: order == ['r#1'], what='the first message in its handler')
    for name, priority in (('a', 0), ('b', 1), ('c', 2), ('d', 0), ('e', 2), ('f', 1)):
        await broker.send(queue.name, {'name': name}, priority=priority)
    await broker.send(queue.name, {'name': 'g'}, priority=2, delay=0.2)
    await wait_until(lambda: length_is(broker, queue.name, 7), what='7 messages ready')
    first_gate.set()  # r fails and waits its retry; c, the first p2, is taken next
    await wait_until(lambda: 'c#1' in order, what='the first p2 message')
    await wait_until(lambda: length_is(broker, queue.name, 7), what='the retry due again')
    second_gate.set()
    await wait_until(lambda: len(order) == 9, what='9 handlings')
    assert order == ['r#1', 'c#1', 'e#1', 'g#1', 'b#1', 'f#1', 'r#2', 'a#1', 'd#1']


async def test_equal_priorities_stay_fifo(broker: AbstractQueueBroker, broker_kind: str) -> None:
    skip_without_priorities(broker_kind)
    queue, calls = Queue(unique(), max_priority=3), Calls()
    await broker.send_many(queue.name, [{'n': n} for n in range(20)], priority=3)
    await broker.send_many(queue.name, [{'n': n} for n in range(20, 40)])
    await recorder(broker, queue, calls, concurrency=1, prefetch=0)
    assert [item['n'] for item in await calls.wait_for(40)] == list(range(40))


# bounded queues -----------------------------------------------------------------------

async def test_a_full_queue_refuses_and_stores_nothing(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique(), max_length=3), Calls()
    for n in range(3):
        await broker.send(queue.name, {'n': n})
    with pytest.raises(QueueFull, match=f"queue '{queue.name}' is full"):
        await broker.send(queue.name, {'n': 3})
    assert await broker.queue_length(queue.name) == 3
    await recorder(broker, queue, calls)
    assert [item['n'] for item in await calls.wait_for(3)] == [0, 1, 2]
    await wait_until(lambda: length_is(broker, queue.name, 0), what='an empty queue')
    await broker.send(queue.name, {'n': 4})  # room again
    assert [item['n'] for item in await calls.wait_for(4)] == [0, 1, 2, 4]


async def test_send_many_over_the_limit_stores_none_of_the_batch(broker: AbstractQueueBroker) -> None:
    # NATS: all or none too, with no other sender racing the batch (docs/brokers/nats.md)
    queue = Queue(unique(), max_length=5)
    await broker.send_many(queue.name, [{'n': n} for n in range(3)])
    with pytest.raises(QueueFull):
        await broker.send_many(queue.name, [{'n': n} for n in range(3, 6)])
    assert await broker.queue_length(queue.name) == 3
    await broker.send_many(queue.name, [{'n': n} for n in range(6, 8)])
    assert await broker.queue_length(queue.name) == 5


async def test_drop_oldest_keeps_the_newest(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique(), max_length=3, overflow='drop_oldest'), Calls()
    for n in range(6):
        await broker.send(queue.name, {'n': n})
    assert await broker.queue_length(queue.name) == 3
    await broker.send_many(queue.name, [{'n': n} for n in range(6, 8)])
    assert await broker.queue_length(queue.name) == 3
    await recorder(broker, queue, calls)
    assert [item['n'] for item in await calls.wait_for(3)] == [5, 6, 7]
    await wait_until(lambda: length_is(broker, queue.name, 0), what='an empty queue')
    assert len(calls) == 3


async def test_a_retry_into_a_full_queue_is_not_lost(broker: AbstractQueueBroker) -> None:
    queue, order = Queue(unique(), max_length=1), []
    failed = asyncio.Event()

    class Agent(MicroAgent):
        # timeout=5: a short visibility, which bounds the wait below on NATS 2.9 (see there)
        @consumer(queue, concurrency=1, prefetch=0, max_attempts=3, timeout=5, **FAST)
        async def handle(self, n: int, info: MessageInfo) -> None:
            order.append((n, info.attempt))
            if n == 1 and info.attempt == 1:
                failed.set()
                raise Retry(delay=0.5)

    await Agent(broker=broker).start()
    await broker.send(queue.name, {'n': 1})
    await failed.wait()
    await broker.send(queue.name, {'n': 2})  # the queue is not full while 1 waits its retry
    # nats-server 2.9.10 now and then leaves a message nak'ed with a delay undelivered until
    # its ack wait (the visibility) ends: late, not lost. Hence the longer wait.
    await wait_until(lambda: len(order) == 3, timeout_s=60, what='3 handlings')
    # Each handled, 1 twice: the retry was not lost to the full queue. (When nats-server is
    # late as above, its redelivery after the ack wait counts as one more attempt.)
    assert sorted(n for n, _ in order) == [1, 1, 2]
    assert (1, 1) in order and (2, 1) in order
    assert await broker.dead_letters(queue.name) == []
