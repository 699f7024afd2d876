"""Regression tests for defects of the core (issue 8): each fails on the code before its fix."""

import asyncio
import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from microagent_mq import ConfigurationError, MicroAgent, Queue, Retry, consumer
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.dsn import mask_dsn
from microagent_mq.routing import topic_matches
from microagent_mq.tools import memory
from microagent_mq.tools.memory import MemoryBroker, MemorySubscription

from .conftest import Calls, unique, wait_until
from .test_contract import start


@dataclass
class Signup:
    user_id: int
    email: str


async def test_handler_taking_only_its_dto_gets_it(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue, dto_class=Signup, dto_name='signup')
        async def welcome(self, signup: Signup) -> None:
            calls.add({'signup': signup})

    await Agent(broker=broker).start()
    await broker.send(queue.name, {'user_id': 1, 'email': 'a@example.com'})
    assert await calls.wait_for(1) == [{'signup': Signup(1, 'a@example.com')}]
    assert await broker.dead_letters(queue.name) == []


def test_dto_handler_without_a_parameter_for_it_is_refused_at_decoration() -> None:
    queue = Queue('mailer')
    with pytest.raises(ConfigurationError, match="takes no parameter 'signup' for its DTO"):
        class Agent(MicroAgent):
            @consumer(queue, dto_class=Signup, dto_name='signup')
            async def welcome(self, dto: Signup) -> None: ...


async def test_a_body_key_named_self_is_poison_not_a_retry_loop(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(**data: Any) -> None:
        calls.add(data)

    class Agent(MicroAgent):
        @consumer(queue, max_attempts=5, retry_delay=0.01)
        async def handle(self, **data: Any) -> None:
            await handler(**data)

    await Agent(broker=broker).start()
    await broker.send(queue.name, {'self': 1, 'n': 1})
    await broker.send(queue.name, {'n': 2})
    assert await calls.wait_for(1) == [{'n': 2}]
    await wait_until(lambda: _dead(broker, queue.name), what='a dead letter')
    [letter] = await broker.dead_letters(queue.name)
    assert letter.attempts == 1 and "['self']" in letter.error


async def _dead(broker: AbstractQueueBroker, name: str) -> bool:
    return len(await broker.dead_letters(name)) == 1


async def test_infinite_or_huge_delays_are_refused_clearly() -> None:
    Queue('mailer')
    broker = MemoryBroker(f'memory://{unique()}')
    for delay in (float('inf'), float('nan'), 10**12):
        with pytest.raises(ConfigurationError, match='invalid delay'):
            await broker.send('mailer', {'n': 1}, delay=delay)
    with pytest.raises(ValueError, match='Retry'):
        Retry(delay=float('inf'))


def test_topic_matching_is_not_exponential_in_hashes() -> None:
    # The naive recursion explores ~C(55, 25) paths here: the test would time out.
    pattern = '.'.join(['#'] * 25 + ['x'])
    assert not topic_matches(pattern, '.'.join(['a'] * 30))
    assert topic_matches(pattern, '.'.join(['a'] * 30 + ['x']))
    assert topic_matches('a.#.b.*', 'a.b.c') and not topic_matches('a.#.b.*', 'a.c')


def test_secret_query_parameters_are_masked() -> None:
    assert mask_dsn('redis://localhost/0?password=hunter2&db=1') == \
        'redis://localhost/0?password=***&db=1'
    assert 'hunter2' not in mask_dsn('amqp://u:hunter2@h/?token=hunter2')
    assert 'hunter2' not in repr(MemoryBroker('memory://x?password=hunter2'))
    assert 'hunter2' not in str(MemoryBroker('memory://x?password=hunter2').info())


async def test_idle_memory_fetches_leave_no_waiters_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, 'IDLE_WAKE_S', 0.01)
    queue = memory.MemoryQueue()
    subscription = MemorySubscription(queue, 'q')
    for _ in range(20):
        assert await subscription.fetch(10) == []
    assert queue.waiters == []


class Base64Queue(Queue):
    """A queue with a data format of its own: base64 of the JSON."""

    def serialize(self, data: dict[str, Any]) -> str:
        return base64.b64encode(orjson.dumps(data)).decode()

    def deserialize(self, data: str | bytes) -> dict[str, Any]:
        value = orjson.loads(base64.b64decode(data))
        assert isinstance(value, dict)
        return value


async def test_a_queue_subclass_format_is_used_to_send_and_to_receive(
        broker: AbstractQueueBroker) -> None:
    queue, calls = Base64Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await broker.send(queue.name, {'n': 1})
    if isinstance(broker, MemoryBroker):  # the wire holds the queue's own format
        [delivery] = broker._get(queue.name).ready
        assert delivery.body == base64.b64encode(b'{"n":1}')
    await start(broker, queue, handler)
    assert await calls.wait_for(1) == [{'n': 1}]
    assert await broker.dead_letters(queue.name) == []


async def test_a_stop_does_not_strand_what_a_fetch_in_progress_read(
        broker_factory: Callable[[], AbstractQueueBroker], broker_kind: str,
        request: pytest.FixtureRequest) -> None:
    # Start and stop a consumer over and over while a producer sends: every message must
    # reach the final consumer at once (none left taken by a stopped one), on attempt 1.
    if broker_kind == 'amqp_quorum':  # a race inside RabbitMQ, not stranding: see the reason
        request.applymarker(pytest.mark.xfail(strict=False, reason=(
            'RabbitMQ 3.10 returns a message it was sending to a consumer being cancelled, '
            'counted in x-delivery-count (docs/brokers/rabbitmq.md, Quorum queues)')))
    queue, calls = Queue(unique()), Calls()
    sender, broker = broker_factory(), broker_factory()  # a stopping agent closes its broker
    sent = 0
    producing = True

    async def produce() -> None:
        nonlocal sent
        while producing:
            await sender.send(queue.name, {'n': sent})
            sent += 1
            await asyncio.sleep(0.001)

    async def handler(n: int) -> None:
        calls.add({'n': n})

    producer = asyncio.create_task(produce())
    try:
        for _ in range(8):
            agent = await start(broker, queue, handler, max_attempts=1, timeout=120,
                                visibility_timeout=121)
            await asyncio.sleep(0.05)
            await agent.stop(grace=5)
    finally:
        producing = False
        await producer
    await start(broker, queue, handler, max_attempts=1, timeout=120, visibility_timeout=121)
    await calls.wait_for(sent)
    assert sorted(item['n'] for item in calls.items) == list(range(sent))
    assert await broker.dead_letters(queue.name) == []
