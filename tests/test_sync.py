"""The synchronous facade: a loop in a thread, from many threads, from inside a running loop."""

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent_mq import Queue, QueueException
from microagent_mq.sync import BrokerClosed, SyncBroker, connect

from .conftest import AMQP_DSN, CLUSTER_DSN_VAR, NATS_DSN, REDIS_DSN, cleanup, require_server, unique


@pytest.fixture
def sync_broker(broker_kind: str) -> Iterator[SyncBroker]:
    namespace = unique('ns')
    if broker_kind == 'memory':
        broker = connect(f'memory://{namespace}')
    else:
        if broker_kind != 'redis_cluster':  # a cluster of the run's own: up already
            require_server(broker_kind)
        broker = {'redis': lambda: connect(REDIS_DSN, prefix=f'test:{namespace}:'),
                  'redis_cluster': lambda: connect(os.environ[CLUSTER_DSN_VAR],
                                                   prefix=f'test:{namespace}:'),
                  'amqp': lambda: connect(AMQP_DSN),
                  'amqp_quorum': lambda: connect(AMQP_DSN, durability='quorum'),
                  'nats': lambda: connect(NATS_DSN, prefix=f'test_{namespace}')}[broker_kind]()
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


@pytest.mark.redis
def test_a_broker_left_open_is_closed_at_exit(tmp_path: Path) -> None:
    require_server('redis')
    prefix = f'test:{unique("ns")}:'
    script = tmp_path / 'script.py'
    script.write_text(  # receives and exits without settling nor closing
        'from microagent_mq import Queue\n'
        'from microagent_mq.sync import connect\n'
        "Queue('jobs')\n"
        f'broker = connect({REDIS_DSN!r}, prefix={prefix!r})\n'
        "broker.send('jobs', {'n': 1})\n"
        "print(len(broker.receive('jobs', wait=5)))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, '1\n'), done.stderr
    Queue('jobs')
    with connect(REDIS_DSN, prefix=prefix) as broker:
        # closed at exit: given back at once as a failed attempt (else Redis would hold it
        # for visibility + 10 s, until another consumer took it over)
        [again] = broker.receive('jobs', wait=5)
        assert (again.data, again.attempt) == ({'n': 1}, 2)
        again.ack()
    asyncio.run(cleanup('redis', prefix.split(':')[1], []))


def test_receive_is_refused_on_a_test_broker() -> None:
    from microagent_mq.testing import TestBroker

    with SyncBroker(TestBroker()) as broker:
        with pytest.raises(QueueException, match='not supported on a TestBroker'):
            broker.receive(Queue(unique()).name)


def test_publish_a_typed_message(sync_broker: SyncBroker) -> None:
    from dataclasses import dataclass

    from microagent_mq import Message

    name = unique()

    @dataclass(frozen=True)
    class Task(Message, queue=name):
        n: int

    sync_broker.publish(Task(1))
    [received] = sync_broker.receive(name, wait=5)
    assert received.data == {'n': 1}
    received.ack()
