"""Middleware: hooks around sending and handling, their order, and each message's outcome."""

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from microagent_mq import Message, MessageInfo, MicroAgent, Queue, Reject, Retry, consumer
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.middleware import Middleware, Outcome
from microagent_mq.tools.memory import MemoryBroker
from microagent_mq.transport import Outgoing

from .conftest import unique, wait_until
from .test_contract import send_raw

FAST = {'retry_delay': 0.01, 'retry_delay_max': 0.05}


class Recorder(Middleware):
    """Records every hook call as (name, hook, detail)."""

    def __init__(self, name: str = 'm', events: list[tuple[str, str, Any]] | None = None) -> None:
        self.name = name
        self.events = [] if events is None else events

    async def before_send(self, outgoing: Outgoing) -> None:
        self.events.append((self.name, 'before_send', outgoing.message_id))

    async def before_handle(self, info: MessageInfo) -> None:
        self.events.append((self.name, 'before_handle', (info.message_id, info.attempt)))

    async def after_handle(self, info: MessageInfo, outcome: Outcome, seconds: float) -> None:
        assert seconds >= 0
        self.events.append((self.name, 'after_handle', (info.message_id, info.attempt, outcome)))

    def outcomes(self) -> Counter[str]:
        return Counter(detail[2] for _, hook, detail in self.events if hook == 'after_handle')


def mixed_agent(queue: Queue) -> type[MicroAgent]:
    class Mixed(MicroAgent):
        @consumer(queue, max_attempts=2, predicate=lambda body: body['kind'] != 'skip', **FAST)
        async def handle(self, kind: str, info: MessageInfo) -> None:
            if kind == 'fail' or (kind == 'once' and info.attempt == 1):
                raise RuntimeError(kind)
            if kind == 'retry':
                raise Retry('asked', delay=0.01) if info.attempt == 1 else Reject('enough')

    return Mixed


async def test_each_outcome_is_reported_once_per_handling(broker: AbstractQueueBroker) -> None:
    queue, recorder = Queue(unique()), Recorder()
    agent = mixed_agent(queue)(broker=broker, middlewares=[recorder])
    await agent.start()
    for kind in ('ok', 'once', 'fail', 'skip', 'retry'):
        await broker.send(queue.name, {'kind': kind})
    await send_raw(broker, queue.name, b'not json')
    # ok: handled; once: retried, handled; fail: retried, dead-lettered; skip: filtered;
    # retry: retried, dead-lettered (Reject); the raw body: dead-lettered at once.
    expected = Counter(handled=2, retried=3, dead_lettered=3, filtered=1)
    await wait_until(lambda: recorder.outcomes() == expected, what=f'outcomes {expected}')
    befores = [d for _, hook, d in recorder.events if hook == 'before_handle']
    afters = [d[:2] for _, hook, d in recorder.events if hook == 'after_handle']
    assert sorted(befores) == sorted(afters)  # each before has its after, per attempt
    await agent.stop()


async def test_order_broker_outside_agent_inside() -> None:
    events: list[tuple[str, str, Any]] = []
    broker = MemoryBroker(f'memory://{unique()}', middlewares=[Recorder('b1', events),
                                                               Recorder('b2', events)])
    queue = Queue(unique())

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            events.append(('handler', 'call', n))

    agent = Agent(broker=broker, middlewares=[Recorder('a1', events)])
    await agent.start()
    await broker.send(queue.name, {'n': 1})
    await wait_until(lambda: len(events) == 9, what='every hook')
    assert [(name, hook) for name, hook, _ in events] == [
        ('b1', 'before_send'), ('b2', 'before_send'),  # the agent's are not on the send path
        ('b1', 'before_handle'), ('b2', 'before_handle'), ('a1', 'before_handle'),
        ('handler', 'call'),
        ('a1', 'after_handle'), ('b2', 'after_handle'), ('b1', 'after_handle')]
    await agent.stop()
    await broker.close()


@pytest.mark.parametrize('publish', ['send', 'send_many', 'publish', 'publish_many'])
async def test_before_send_headers_reach_the_handler(publish: str) -> None:
    class Stamp(Middleware):
        async def before_send(self, outgoing: Outgoing) -> None:
            outgoing.headers = {**(outgoing.headers or {}), 'stamp': outgoing.message_id}

    broker = MemoryBroker(f'memory://{unique()}', middlewares=[Stamp()])
    queue, seen = Queue(unique()), []

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int, info: MessageInfo) -> None:
            seen.append((n, info.headers))

    await Agent(broker=broker).start()
    shared = {'from': 'test'}

    @dataclass(frozen=True)
    class Ping(Message, queue=queue.name):
        n: int

    if publish == 'publish':
        await broker.publish(Ping(1), headers=shared)
        await broker.publish(Ping(2), headers=shared)
    elif publish == 'publish_many':
        await broker.publish_many([Ping(1), Ping(2)], headers=shared)
    elif publish == 'send':
        await broker.send(queue.name, {'n': 1}, headers=shared)
        await broker.send(queue.name, {'n': 2}, headers=shared)
    else:
        await broker.send_many(queue.name, [{'n': 1}, {'n': 2}], headers=shared)
    await wait_until(lambda: len(seen) == 2, what='two messages')
    stamps = {info['stamp'] for _, info in seen}
    assert len(stamps) == 2 and all(info['from'] == 'test' for _, info in seen)
    assert shared == {'from': 'test'}  # the caller's dict was not changed
    await broker.close()


async def test_a_failing_hook_is_logged_and_the_message_still_handled(
        caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Middleware):
        async def before_send(self, outgoing: Outgoing) -> None:
            raise RuntimeError('send hook')

        async def before_handle(self, info: MessageInfo) -> None:
            raise RuntimeError('handle hook')

    recorder = Recorder()
    broker = MemoryBroker(f'memory://{unique()}', middlewares=[Broken(), recorder])
    queue, seen = Queue(unique()), []

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            seen.append(n)

    await Agent(broker=broker).start()
    await broker.send(queue.name, {'n': 1})
    await wait_until(lambda: recorder.outcomes() == Counter(handled=1), what='handled')
    assert seen == [1]
    assert 'Broken.before_send failed' in caplog.text and 'Broken.before_handle failed' in caplog.text
    await broker.close()


async def test_no_middleware_no_message_info(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without middlewares the engine builds nothing per message (the benchmark's premise)."""
    import microagent_mq.engine

    def forbidden(*args: Any) -> Any:
        raise AssertionError('MessageInfo built without middlewares')

    monkeypatch.setattr(microagent_mq.engine, 'message_info', forbidden)
    monkeypatch.setattr(microagent_mq.engine, 'Observation', forbidden)
    broker = MemoryBroker(f'memory://{unique()}')
    queue, seen = Queue(unique()), []

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            seen.append(n)

    await Agent(broker=broker).start()
    await broker.send(queue.name, {'n': 1})
    await wait_until(lambda: seen == [1], what='handled')
    await broker.close()


def test_every_broker_class_takes_middlewares() -> None:
    from microagent_mq.factory import broker_from_dsn
    from microagent_mq.testing import NullBroker, TestBroker

    from .conftest import AMQP_DSN, REDIS_DSN

    hook = Recorder()
    made = [broker_from_dsn(dsn, middlewares=[hook]) for dsn in (f'memory://{unique()}', REDIS_DSN, AMQP_DSN)]
    made += [TestBroker(middlewares=[hook]), NullBroker(middlewares=[hook])]
    assert [type(b).__name__ for b in made if b.middlewares == [hook]] == [
        'MemoryBroker', 'RedisBroker', 'AMQPBroker', 'TestBroker', 'NullBroker']
    assert MemoryBroker(f'memory://{unique()}').middlewares == []  # a list of its own each
