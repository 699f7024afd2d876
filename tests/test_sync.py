"""The synchronous facade: a loop in a thread, from many threads, from inside a running loop."""

import asyncio
import threading
from collections.abc import Iterator

import pytest

from microagent_mq import Queue, QueueException
from microagent_mq.sync import BrokerClosed, SyncBroker, connect

from .conftest import AMQP_DSN, REDIS_DSN, cleanup, require_server, unique


@pytest.fixture
def sync_broker(broker_kind: str) -> Iterator[SyncBroker]:
    namespace = unique('ns')
    if broker_kind == 'memory':
        broker = connect(f'memory://{namespace}')
    else:
        require_server(broker_kind)
        broker = (connect(REDIS_DSN, prefix=f'test:{namespace}:') if broker_kind == 'redis'
                  else connect(AMQP_DSN))
    yield broker
    broker.close()
    asyncio.run(cleanup(broker_kind, namespace, []))


def _sync_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == 'microagent_mq-sync']


def test_eight_threads_send_through_one_broker(sync_broker: SyncBroker) -> None:
    queue = Queue(unique())
    errors: list[BaseException] = []

    def sender(worker: int) -> None:
        try:
            for n in range(1000):
                sync_broker.send(queue.name, {'worker': worker, 'n': n})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    seen: list[tuple[int, int]] = []
    while len(seen) < 8000:
        batch = sync_broker.receive(queue.name, max_count=200, wait=5)
        assert batch, f'only {len(seen)} of 8000 received'
        for received in batch:
            seen.append((received.data['worker'], received.data['n']))
            received.ack()
    assert sorted(seen) == [(w, n) for w in range(8) for n in range(1000)]
    assert sync_broker.receive(queue.name, wait=0.2) == []


def test_calls_from_inside_a_running_loop(sync_broker: SyncBroker) -> None:
    queue = Queue(unique())

    async def in_a_cell() -> list[int]:  # a Jupyter cell, a sync view in an async server
        sync_broker.send(queue.name, {'n': 1})
        sync_broker.send_many(queue.name, [{'n': 2}])
        got = sync_broker.receive(queue.name, max_count=2, wait=5)
        if len(got) < 2:
            got += sync_broker.receive(queue.name, max_count=1, wait=5)
        for received in got:
            received.ack()
        return sorted(r.data['n'] for r in got)

    assert asyncio.run(in_a_cell()) == [1, 2]


def test_retry_reject_and_dead_letters(sync_broker: SyncBroker) -> None:
    queue = Queue(unique())
    sync_broker.send(queue.name, {'n': 1})
    [first] = sync_broker.receive(queue.name, wait=5)
    first.retry(delay=0)
    [again] = sync_broker.receive(queue.name, wait=5)
    assert (again.message_id, again.attempt) == (first.message_id, 2)
    again.reject('no')
    [letter] = sync_broker.dead_letters(queue.name)
    assert letter.message_id == first.message_id and 'rejected: no' in letter.error
    assert sync_broker.requeue_dead_letters(queue.name) == 1
    [back] = sync_broker.receive(queue.name, wait=5)
    back.ack()


def test_no_thread_left_after_close() -> None:
    before = len(_sync_threads())
    with connect(f'memory://{unique()}') as broker:
        broker.send(Queue(unique()).name, {'n': 1})
        assert len(_sync_threads()) == before + 1
    assert len(_sync_threads()) == before
    broker.close()  # idempotent


def test_calls_after_close_are_refused() -> None:
    queue = Queue(unique())
    broker = connect(f'memory://{unique()}')
    broker.send(queue.name, {'n': 1})
    [received] = broker.receive(queue.name, wait=1)
    broker.close()
    with pytest.raises(BrokerClosed, match='this SyncBroker is closed'):
        broker.send(queue.name, {'n': 2})
    with pytest.raises(BrokerClosed):
        received.ack()
    assert issubclass(BrokerClosed, QueueException)


def test_a_call_from_its_own_loop_thread_is_refused() -> None:
    with connect(f'memory://{unique()}') as broker:
        queue = Queue(unique())

        async def inside() -> None:
            broker.send(queue.name, {'n': 1})

        future = asyncio.run_coroutine_threadsafe(inside(), broker._loop)
        with pytest.raises(QueueException, match='its own loop thread'):
            future.result()
