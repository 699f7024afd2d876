"""Agents, ``@consumer`` and ``@on``, options, DSNs, the broker's public surface (memory)."""

import logging
from typing import Any

import pytest

from microagent_mq import (
    ConfigurationError,
    ConsumerOptions,
    InvalidDSN,
    MicroAgent,
    Queue,
    QueueException,
    QueueNotFound,
    consumer,
    on,
)
from microagent_mq.dsn import mask_dsn
from microagent_mq.factory import broker_from_dsn
from microagent_mq.tools.memory import MemoryBroker

from .conftest import Calls, unique, wait_until


def test_consumer_rejects_bad_arguments() -> None:
    queue = Queue('mailer')
    with pytest.raises(ConfigurationError, match='timeout must be > 0'):
        consumer(queue, timeout=0)
    with pytest.raises(ConfigurationError, match='dto_name needs a dto_class'):
        consumer(queue, dto_name='obj')
    with pytest.raises(ConfigurationError, match=r"unknown consumer options \['retries'\]"):
        consumer(queue, retries=3)
    with pytest.raises(ConfigurationError, match='max_attempts=0'):
        consumer(queue, max_attempts=0)
    with pytest.raises(ConfigurationError, match='must exceed the handler timeout'):
        consumer(queue, timeout=30, visibility_timeout=10)
    with pytest.raises(ConfigurationError, match='needs a declared queue'):
        consumer('mailer')  # type: ignore[arg-type]
    Queue('pusher', 'events')
    with pytest.raises(ConfigurationError, match='needs a declared queue'):
        consumer(Queue.get('events'))
    def generator(self: Any) -> Any:
        yield None

    with pytest.raises(ConfigurationError, match='must be a function'):
        consumer(queue)(generator)  # sync def handlers are fine; generators are not


def test_one_handler_per_queue() -> None:
    queue = Queue('mailer')
    with pytest.raises(ConfigurationError, match=r"one handler per queue; \['mailer'\]"):
        class Twice(MicroAgent):
            @consumer(queue)
            async def first(self, **kwargs: Any) -> None: ...

            @consumer(queue)
            async def second(self, **kwargs: Any) -> None: ...


def test_options_backoff_and_visibility() -> None:
    options = ConsumerOptions.parse({'retry_delay': 0.5, 'retry_delay_max': 3}, timeout=60)
    assert [options.backoff(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3, 3]
    assert options.visibility(60) == 70.0
    assert ConsumerOptions.parse({'visibility_timeout': 90}, 60).visibility(60) == 90.0
    assert ConsumerOptions().backoff(10_000) == 300.0


async def test_hooks_order_info_and_stop_closes() -> None:
    queue = Queue(unique())
    events: list[str] = []

    class Agent(MicroAgent):
        @on('pre_start')
        async def before(self) -> None:
            events.append('pre_start')

        @on('post_start')
        async def after(self) -> None:
            events.append('post_start')

        @on('pre_stop')
        async def leaving(self) -> None:
            events.append('pre_stop')

        @consumer(queue, timeout=5, concurrency=2)
        async def handle(self, **kwargs: Any) -> None:
            events.append('handled')

    broker = MemoryBroker(f'memory://{unique()}')
    agent = Agent(broker=broker, settings={'x': 1})
    await agent.start()
    assert events == ['pre_start', 'post_start']
    assert broker.info()['consuming'] == [queue.name]
    info = agent.info()
    assert info['name'] == 'Agent'
    assert info['consumers'] == [{'queue': queue.name, 'handler': 'handle', 'timeout': 5.0,
                                  'dto_class': None, 'options': {'concurrency': 2}}]
    assert agent.settings == {'x': 1}
    await agent.stop()
    assert events == ['pre_start', 'post_start', 'pre_stop']
    assert broker.info()['consuming'] == []


async def test_two_agents_cannot_consume_one_queue_on_one_broker() -> None:
    queue = Queue(unique())

    class First(MicroAgent):
        @consumer(queue)
        async def handle(self, **kwargs: Any) -> None: ...

    class Second(First):
        pass

    broker = MemoryBroker(f'memory://{unique()}')
    await First(broker=broker).start()
    with pytest.raises(QueueException, match=r'already consumed by First\.handle'):
        await Second(broker=broker).start()
    await broker.close()


async def test_agent_without_broker() -> None:
    queue = Queue(unique())

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, **kwargs: Any) -> None: ...

    with pytest.raises(ConfigurationError, match='no broker'):
        await Agent().start()


async def test_broker_attribute_access_and_send_errors() -> None:
    broker = MemoryBroker(f'memory://{unique()}')
    Queue('mailer')
    Queue('pusher', 'events', ('user.*',))
    assert broker.mailer.queue.name == 'mailer'
    assert not hasattr(broker, 'nope')
    with pytest.raises(QueueNotFound):
        _ = broker.nope
    with pytest.raises(QueueNotFound):
        await broker.send('nope', {'a': 1})
    with pytest.raises(ConfigurationError, match=r"unknown send options \['urgency'\]"):
        await broker.mailer.send({'a': 1}, urgency=3)
    with pytest.raises(ConfigurationError, match="queue 'mailer' has no priorities"):
        await broker.mailer.send({'a': 1}, priority=3)
    with pytest.raises(ConfigurationError, match='invalid topic'):
        await broker.events.send({'a': 1}, topic='a..b')
    with pytest.raises(ConfigurationError, match='invalid delay'):
        await broker.mailer.send({'a': 1}, delay=-1)
    with pytest.raises(QueueException, match='not valid JSON'):
        await broker.send('mailer', '{not json')
    with pytest.raises(QueueException, match='not an object'):
        await broker.send('mailer', '[1, 2]')
    with pytest.raises(QueueException, match='is an exchange'):
        await broker.queue_length('events')
    await broker.send('mailer', '{"raw": "text"}')
    await broker.send('mailer', b'{"raw": "bytes"}')
    assert await broker.mailer.length() == 2
    await broker.events.send({'no': 'match'}, topic='order.created')  # routed nowhere
    assert await broker.pusher.length() == 0


async def test_handler_exception_is_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue, max_attempts=1)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})
            raise KeyError('boom')

    broker = MemoryBroker(f'memory://{unique()}')
    await Agent(broker=broker).start()
    with caplog.at_level(logging.INFO, logger='microagent_mq'):
        await broker.send(queue.name, {'n': 1})
        await calls.wait_for(1)
        await wait_until(lambda: broker.dead_letters(queue.name), what='a dead letter')
    failing = [r for r in caplog.records if 'failed on message' in r.getMessage()]
    assert failing and failing[0].exc_info is not None
    assert any('dead-lettered after 1 attempt' in r.getMessage() for r in caplog.records)
    await broker.close()


def test_dsn_masking_and_errors() -> None:
    assert mask_dsn('redis://:s3cret@host:6379/0') == 'redis://:***@host:6379/0'
    assert mask_dsn('amqp://guest:s3cret@host/vh') == 'amqp://guest:***@host/vh'
    assert mask_dsn('redis://host/0') == 'redis://host/0'
    with pytest.raises(InvalidDSN, match="unsupported scheme 'kafka'"):
        broker_from_dsn('kafka://host')
    with pytest.raises(InvalidDSN, match='malformed DSN'):
        broker_from_dsn('redis://host:notaport/0')
    with pytest.raises(InvalidDSN, match="unsupported scheme 'redis'"):
        MemoryBroker('redis://host')
    assert isinstance(broker_from_dsn('memory://x'), MemoryBroker)


def test_password_never_shown() -> None:
    from microagent_mq.tools.amqp import AMQPBroker
    from microagent_mq.tools.redis import RedisBroker

    for broker in (RedisBroker('redis://:s3cret@127.0.0.1:6379/0'),
                   AMQPBroker('amqp://guest:s3cret@127.0.0.1/')):
        assert 's3cret' not in repr(broker)
        assert 's3cret' not in str(broker.info())
        assert '***' in repr(broker)
