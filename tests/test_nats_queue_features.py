"""Issue 13 on NATS JetStream: stream configuration per queue option, the journal, QueueFull."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from microagent_mq import ConfigurationError, Queue, QueueFull, Reject

from .conftest import NATS_DSN, Calls, delete_nats_streams, require_server, unique, wait_until
from .test_contract import start

pytestmark = pytest.mark.nats


@pytest.fixture
async def broker() -> AsyncIterator[Any]:
    require_server('nats')
    from microagent_mq.tools.nats import NATSBroker

    prefix = unique('nt')
    made = NATSBroker(NATS_DSN, prefix=prefix)
    yield made
    await made.close(grace=1)
    await delete_nats_streams(prefix)


async def _stream(broker: Any, suffix: str) -> Any:
    js = await broker.jetstream()
    return await js.stream_info(f'{broker.prefix}-{suffix}')


async def _held(broker: Any, suffix: str) -> int:
    return int((await _stream(broker, suffix)).state.messages)


async def _stream_names(broker: Any) -> set[str]:
    js = await broker.jetstream()
    return {info.config.name for info in await js.streams_info()
            if info.config.name.startswith(f'{broker.prefix}-')}


async def test_each_option_is_its_stream_configuration(broker: Any) -> None:
    from nats.js import api

    plain, kept = Queue(unique()), Queue(unique(), retention='90s')
    reject, drop = Queue(unique(), max_length=5), Queue(unique(), max_length=7, overflow='drop_oldest')
    for queue in (plain, kept, reject, drop):
        await broker.send(queue.name, {'n': 1})
    configs = {q.name: (await _stream(broker, q.name)).config for q in (plain, kept, reject, drop)}
    for config in configs.values():  # the same work queue: handled means gone, nothing trimmed
        assert (config.retention, config.max_age, config.max_msgs) == (api.RetentionPolicy.WORK_QUEUE, 0, -1)
    journal = (await _stream(broker, f'{kept.name}-journal')).config
    assert (journal.retention, journal.max_age, journal.subjects) == (
        api.RetentionPolicy.LIMITS, 90, [f'{broker.prefix}.{kept.name}.journal'])
    assert await _stream_names(broker) == {f'{broker.prefix}-{name}' for name in configs} | {
        f'{broker.prefix}-{kept.name}-journal'}  # no journal for a queue without retention


async def test_history_lists_handled_and_waiting_messages_in_order_with_paging(broker: Any) -> None:
    queue, calls = Queue(unique(), retention='1h'), Calls()
    await broker.send_many(queue.name, [{'n': n} for n in range(3)])
    middle = time.time()
    await broker.send(queue.name, {'n': 3}, headers={'trace': 't3'})

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    await calls.wait_for(4)
    await wait_until(lambda: _length_is(broker, queue.name, 0), what='all handled')
    await broker.send(queue.name, {'n': 4}, delay=60)  # retained when sent, not when due
    entries = await broker.history(queue.name)
    assert [e.data for e in entries] == [{'n': n} for n in range(5)]
    assert len({e.message_id for e in entries}) == 5 and entries[3].headers == {'trace': 't3'}
    assert [e.data for e in await broker.history(queue.name, since=middle)] == [{'n': 3}, {'n': 4}]
    assert [e.data for e in await broker.history(queue.name, limit=2)] == [{'n': 0}, {'n': 1}]
    page, after = await broker._retained(queue.name, None, None, None, 2)
    rest, end = await broker._retained(queue.name, None, None, after, 10)
    assert [e.data['n'] for e in page + rest] == [0, 1, 2, 3, 4] and end is None
    assert await broker.queue_length(queue.name) == 0  # handled retained ones do not wait


async def _length_is(broker: Any, name: str, expected: int) -> bool:
    return bool(await broker.queue_length(name) == expected)


async def test_replay_from_an_id_sends_new_copies_that_are_handled_again(broker: Any) -> None:
    queue, calls = Queue(unique(), retention='1h'), Calls()
    await broker.send_many(queue.name, [{'n': n} for n in range(4)])
    second = (await broker.history(queue.name))[1]
    assert await broker.replay(queue.name, from_id=second.message_id) == 3

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    assert [c['n'] for c in await calls.wait_for(7)] == [0, 1, 2, 3, 1, 2, 3]
    replayed = (await broker.history(queue.name))[4:]
    assert [e.headers for e in replayed] == [{'replayed_from': e.message_id}
                                             for e in (await broker.history(queue.name))[1:4]]


async def test_trimming_the_journal_never_removes_an_unhandled_message(broker: Any) -> None:
    queue, calls = Queue(unique(), retention=2), Calls()
    await broker.send(queue.name, {'n': 1})
    assert len(await broker.history(queue.name)) == 1
    await wait_until(lambda: _held_is(broker, f'{queue.name}-journal', 0), what='the journal trimmed')
    assert await broker.history(queue.name) == []
    assert await broker.queue_length(queue.name) == 1  # still waiting: the queue is not trimmed

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    assert await calls.wait_for(1) == [{'n': 1}]


async def _held_is(broker: Any, suffix: str, count: int) -> bool:
    return await _held(broker, suffix) == count


async def test_a_refused_send_stores_nothing_not_even_in_the_journal(broker: Any) -> None:
    queue = Queue(unique(), max_length=2, retention='1h')
    await broker.send(queue.name, {'n': 1})
    await broker.send(queue.name, {'n': 2})
    with pytest.raises(QueueFull, match=r"queue '.*' is full \(max_length 2\)"):
        await broker.send(queue.name, {'n': 3})
    assert await broker.queue_length(queue.name) == 2
    assert [e.data for e in await broker.history(queue.name)] == [{'n': 1}, {'n': 2}]


async def test_send_many_that_cannot_fit_is_refused_whole(broker: Any) -> None:
    queue = Queue(unique(), max_length=3, retention='1h')
    await broker.send(queue.name, {'n': 0})
    with pytest.raises(QueueFull, match='none was stored'):
        await broker.send_many(queue.name, [{'n': n} for n in range(1, 4)])
    assert await broker.queue_length(queue.name) == 1
    assert len(await broker.history(queue.name)) == 1
    await broker.send_many(queue.name, [{'n': n} for n in range(1, 3)])  # fits exactly
    assert await _held(broker, queue.name) == 3


async def test_drop_oldest_keeps_the_newest(broker: Any) -> None:
    queue, calls = Queue(unique(), max_length=2, overflow='drop_oldest'), Calls()
    for n in range(5):
        await broker.send(queue.name, {'n': n})
    await broker.send_many(queue.name, [{'n': n} for n in range(5, 8)])
    assert await broker.queue_length(queue.name) == 2

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    assert await calls.wait_for(2) == [{'n': 6}, {'n': 7}]


async def test_a_due_delayed_message_waits_for_room_in_a_full_queue(broker: Any) -> None:
    queue, calls, go = Queue(unique(), max_length=1), Calls(), asyncio.Event()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        if n == 1:
            await go.wait()  # held while 2 waits: the queue stays full past 3's due time

    await start(broker, queue, handler, concurrency=1, prefetch=0)
    await broker.send(queue.name, {'n': 1})
    await calls.wait_for(1)
    await broker.send(queue.name, {'n': 2})
    due = time.time() + 0.2
    await broker.send(queue.name, {'n': 3}, delay=0.2)  # delayed: not counted until due
    await wait_until(lambda: time.time() > due + 1.5, what='past due and a mover round')
    assert await _held(broker, f'{queue.name}-delayed') == 1  # refused, kept: not dropped
    assert await broker.queue_length(queue.name) == 1
    go.set()
    # Tried again each second: a mover that left it to its 30 s ack_wait fails this.
    assert await calls.wait_for(3, timeout_s=10) == [{'n': 1}, {'n': 2}, {'n': 3}]


async def test_requeue_into_a_full_queue_raises_and_keeps_the_letters(broker: Any) -> None:
    queue, calls = Queue(unique(), max_length=1), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        raise Reject('no')

    agent = await start(broker, queue, handler)
    await broker.send(queue.name, {'n': 1})
    await wait_until(lambda: _dead(broker, queue.name, 1), what='a dead letter')
    await agent.stop()
    await broker.send(queue.name, {'n': 2})  # fills it
    with pytest.raises(QueueFull, match='0 dead letter'):
        await broker.requeue_dead_letters(queue.name)
    assert len(await broker.dead_letters(queue.name)) == 1


async def _dead(broker: Any, name: str, count: int) -> bool:
    return len(await broker.dead_letters(name)) == count


async def test_priorities_are_refused_at_send_and_subscribe(broker: Any) -> None:
    queue = Queue(unique(), max_priority=3)
    for send in (broker.send(queue.name, {'n': 1}), broker.send(queue.name, {'n': 1}, priority=2),
                 broker.send(queue.name, {'n': 1}, delay=5)):
        with pytest.raises(ConfigurationError, match='NATS JetStream has no message priorities'):
            await send

    async def handler(n: int) -> None: ...

    with pytest.raises(ConfigurationError, match='no message priorities'):
        await start(broker, queue, handler)
    assert await _stream_names(broker) == set()  # nothing was declared, nothing stored


async def test_a_journal_follows_a_changed_retention_and_keeps_its_history(broker: Any) -> None:
    first = Queue(unique(), retention='1h')
    await broker.send(first.name, {'n': 1})
    Queue.reset()  # as a new deployment declaring it again
    queue = Queue(first.name, retention='2h')
    other = type(broker)(broker.dsn, prefix=broker.prefix)
    try:
        await other.send(queue.name, {'n': 2})
        assert (await _stream(broker, f'{queue.name}-journal')).config.max_age == 7200
        assert [e.data for e in await other.history(queue.name)] == [{'n': 1}, {'n': 2}]
    finally:
        await other.close()


async def test_a_queue_stream_made_differently_by_someone_else_is_refused(broker: Any) -> None:
    from nats.js import api

    queue = Queue(unique())
    js = await broker.jetstream()
    await js.add_stream(api.StreamConfig(name=f'{broker.prefix}-{queue.name}',
                                         subjects=[f'{broker.prefix}.{queue.name}'], max_msgs=3))
    with pytest.raises(ConfigurationError, match='exists with another configuration'):
        await broker.send(queue.name, {'n': 5})


async def test_messages_being_handled_do_not_count_and_are_never_dropped(broker: Any) -> None:
    kept, dropping = Queue(unique(), max_length=1), Queue(unique(), max_length=1, overflow='drop_oldest')
    gates = {kept.name: asyncio.Event(), dropping.name: asyncio.Event()}
    calls = {kept.name: Calls(), dropping.name: Calls()}
    for queue in (kept, dropping):
        async def handler(n: int, _q: str = queue.name) -> None:
            calls[_q].add({'n': n})
            if n == 1:
                await gates[_q].wait()

        await broker.send(queue.name, {'n': 1})
        await start(broker, queue, handler, concurrency=1, prefetch=0)
        await calls[queue.name].wait_for(1)  # 1 is being handled: the queue has room
        await broker.send(queue.name, {'n': 2})
    with pytest.raises(QueueFull):
        await broker.send(kept.name, {'n': 3})
    await broker.send(dropping.name, {'n': 3})  # drops 2, the oldest waiting, not 1
    for gate in gates.values():
        gate.set()
    assert await calls[kept.name].wait_for(2) == [{'n': 1}, {'n': 2}]
    assert await calls[dropping.name].wait_for(2) == [{'n': 1}, {'n': 3}]


async def test_two_brokers_sending_at_once_never_exceed_the_bound(broker: Any) -> None:
    queue = Queue(unique(), max_length=5)
    other = type(broker)(broker.dsn, prefix=broker.prefix)
    await broker.send(queue.name, {'n': 0})  # each broker has read the count once...
    await other.send(queue.name, {'n': 1})  # ...and then the other one sent: 2 waiting
    try:
        results = await asyncio.gather(*(b.send(queue.name, {'n': n}) for n in range(2, 12)
                                         for b in (broker, other)), return_exceptions=True)
    finally:
        await other.close()
    assert sum(isinstance(r, QueueFull) for r in results) == 17
    assert await broker.queue_length(queue.name) == 5 == await _held(broker, queue.name)
