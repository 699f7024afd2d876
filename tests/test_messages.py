"""Typed messages, the same on every broker (memory, Redis, RabbitMQ): publish by type, events,
dispatch, predicates, error policy, MessageInfo, sync handlers, the default broker."""

import asyncio
import enum
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from microagent_mq import (
    Message,
    MessageInfo,
    MicroAgent,
    Queue,
    Reject,
    Retry,
    consumer,
    override_broker,
)
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.transport import DeadLetter

from .conftest import AMQP_DSN, Calls, unique, wait_until

FAST = {'retry_delay': 0.01, 'retry_delay_max': 0.05}


class Priority(enum.Enum):
    LOW = 'low'
    HIGH = 'high'


@dataclass(frozen=True)
class Line:
    sku: str
    quantity: int


async def dead_letters(broker: AbstractQueueBroker, name: str, count: int) -> list[DeadLetter]:
    async def enough() -> bool:
        return len(await broker.dead_letters(name)) >= count

    await wait_until(enough, what=f'{count} dead letter(s) in {name}')
    return await broker.dead_letters(name)


async def started(agent: MicroAgent) -> MicroAgent:
    await agent.start()
    return agent


# publishing and consuming by type ---------------------------------------------------------

async def test_dataclass_task_published_and_consumed_by_type(broker: AbstractQueueBroker) -> None:
    name, calls = unique('invoices'), Calls()

    @dataclass(frozen=True)
    class GenerateInvoice(Message, queue=name):
        invoice_id: uuid.UUID
        due: datetime
        priority: Priority
        lines: list[Line]
        note: str | None = None

    class Billing(MicroAgent):
        @consumer(GenerateInvoice)
        async def generate(self, dto: GenerateInvoice) -> None:
            calls.add({'dto': dto})

    sent = [GenerateInvoice(uuid.uuid4(), datetime(2026, 1, n + 1, 9, 30, tzinfo=UTC), Priority.HIGH,
                            [Line('a', n), Line('b', 2)], note=None if n else 'first') for n in range(3)]
    await broker.publish(sent[0])  # before any consumer: the queue is registered on first use
    await started(Billing(broker=broker))
    await broker.publish_many(sent[1:])
    assert [c['dto'] for c in await calls.wait_for(3)] == sent


async def test_pydantic_task_published_and_consumed_by_type(broker: AbstractQueueBroker) -> None:
    name, calls = unique('reports'), Calls()

    class Period(BaseModel):
        start: datetime
        end: datetime

    class BuildReport(BaseModel, Message, queue=name, type='reports.build.v1'):
        report_id: uuid.UUID
        period: Period
        tags: list[str] = []

    class Reports(MicroAgent):
        @consumer(BuildReport, dto_name='job')
        async def build(self, job: BuildReport) -> None:
            calls.add({'job': job})

    await started(Reports(broker=broker))
    sent = BuildReport(report_id=uuid.uuid4(), tags=['x'], period=Period(
        start=datetime(2026, 1, 1, tzinfo=UTC), end=datetime(2026, 2, 1, tzinfo=UTC)))
    await broker.publish(sent)
    assert await calls.wait_for(1) == [{'job': sent}]


async def test_one_event_fans_out_to_two_service_queues(broker: AbstractQueueBroker) -> None:
    events, welcome, audit = unique('events'), Calls(), Calls()

    @dataclass(frozen=True)
    class UserRegistered(Message, exchange=events, topic='user.registered'):
        user_id: int
        email: str

    class UserRenamed(BaseModel, Message, exchange=events, topic='user.renamed'):
        user_id: int
        name: str

    class Welcome(MicroAgent):
        @consumer(UserRegistered, queue=unique('welcome'))
        async def welcome(self, dto: UserRegistered) -> None:
            welcome.add({'dto': dto})

    class Audit(MicroAgent):
        @consumer(UserRegistered, queue=unique('audit'))
        async def registered(self, dto: UserRegistered) -> None:
            audit.add({'dto': dto})

        @consumer(UserRenamed, queue=unique('renames'))
        async def renamed(self, dto: UserRenamed) -> None:
            audit.add({'renamed': dto})

    await started(Welcome(broker=broker))
    await started(Audit(broker=broker))
    await broker.publish(UserRenamed(user_id=1, name='x'))  # welcome's queue is not bound to it
    await broker.publish(UserRegistered(1, 'a@example.com'))
    await broker.publish(UserRegistered(2, 'b@example.com'))
    expected = [{'dto': UserRegistered(1, 'a@example.com')}, {'dto': UserRegistered(2, 'b@example.com')}]
    assert await welcome.wait_for(2) == expected
    await audit.wait_for(3)
    assert sorted(audit.items, key=str) == sorted([*expected, {'renamed': UserRenamed(user_id=1, name='x')}],
                                                  key=str)


async def test_several_types_on_one_queue_are_dispatched(broker: AbstractQueueBroker) -> None:
    events, name, calls = unique('events'), unique('users'), Calls()

    @dataclass(frozen=True)
    class UserRegistered(Message, exchange=events, topic='user.registered'):
        user_id: int

    class UserDeleted(BaseModel, Message, exchange=events, topic='user.deleted'):
        user_id: int

    class Users(MicroAgent):
        @consumer(UserRegistered, queue=name)
        async def registered(self, dto: UserRegistered) -> None:
            calls.add({'registered': dto.user_id})

        @consumer(UserDeleted, queue=name)
        async def deleted(self, dto: UserDeleted) -> None:
            calls.add({'deleted': dto.user_id})

    await started(Users(broker=broker))
    assert Queue.get(name).topics == ('user.deleted', 'user.registered')
    await broker.publish_many([UserRegistered(1), UserDeleted(user_id=1), UserRegistered(2)])
    assert await calls.wait_for(3) == [{'registered': 1}, {'deleted': 1}, {'registered': 2}]


async def test_retried_message_keeps_its_type(broker: AbstractQueueBroker) -> None:
    name, calls = unique('tasks'), Calls()

    @dataclass(frozen=True)
    class First(Message, queue=name):
        n: int

    @dataclass(frozen=True)
    class Second(Message, queue=name):
        n: int

    class Agent(MicroAgent):
        @consumer(First, **FAST)
        async def first(self, dto: First, info: MessageInfo) -> None:
            calls.add({'first': dto.n, 'attempt': info.attempt})
            if info.attempt == 1:
                raise RuntimeError('once')

        @consumer(Second, **FAST)
        async def second(self, dto: Second) -> None:
            calls.add({'second': dto.n})

    await started(Agent(broker=broker))
    await broker.publish_many([First(1), Second(2)])
    await calls.wait_for(3)
    assert sorted(calls.items, key=str) == [{'first': 1, 'attempt': 1}, {'first': 1, 'attempt': 2},
                                            {'second': 2}]
    assert await broker.dead_letters(name) == []


async def test_unknown_type_is_dead_lettered_with_the_reason(broker: AbstractQueueBroker) -> None:
    name, calls = unique('tasks'), Calls()

    @dataclass(frozen=True)
    class Known(Message, queue=name):
        n: int

    @dataclass(frozen=True)
    class Stranger(Message, queue=name, type='stranger.v1'):
        n: int

    class Agent(MicroAgent):
        @consumer(Known)
        async def handle(self, dto: Known) -> None:
            calls.add({'n': dto.n})

    await started(Agent(broker=broker))
    await broker.publish_many([Stranger(1), Known(2)])
    assert await calls.wait_for(1) == [{'n': 2}]
    [letter] = await dead_letters(broker, name, 1)
    assert "takes message type 'stranger.v1'" in letter.error
    assert (letter.attempts, orjson.loads(letter.body)) == (1, {'n': 1})


async def test_unknown_type_ignored_is_acknowledged_and_counted(broker: AbstractQueueBroker) -> None:
    name, calls = unique('tasks'), Calls()

    @dataclass(frozen=True)
    class Known(Message, queue=name):
        n: int

    @dataclass(frozen=True)
    class Stranger(Message, queue=name):
        n: int

    class Agent(MicroAgent):
        @consumer(Known, unknown='ignore')
        async def handle(self, dto: Known) -> None:
            calls.add({'n': dto.n})

    agent = await started(Agent(broker=broker))
    await broker.publish_many([Stranger(1), Stranger(2), Known(3)])
    assert await calls.wait_for(1) == [{'n': 3}]  # FIFO: both strangers were settled before
    assert agent.info()['counts'][name] == {'filtered': 0, 'ignored': 2}
    assert await broker.dead_letters(name) == []
    assert await broker.queue_length(name) == 0


# predicates and error policy ---------------------------------------------------------------

async def test_predicate_filters_and_counts(broker: AbstractQueueBroker) -> None:
    name, calls = unique('orders'), Calls()

    @dataclass(frozen=True)
    class OrderPlaced(Message, queue=name):
        order_id: int
        total: float

    class Premium(MicroAgent):
        @consumer(OrderPlaced, predicate=lambda order: order.total > 100)
        async def premium(self, dto: OrderPlaced) -> None:
            calls.add({'order': dto.order_id})

    agent = await started(Premium(broker=broker))
    await broker.publish_many([OrderPlaced(n, total) for n, total in enumerate([50, 150, 20, 300, 99])])
    await wait_until(lambda: agent.info()['counts'][name]['filtered'] == 3, what='3 filtered')
    assert await calls.wait_for(2) == [{'order': 1}, {'order': 3}]
    assert await broker.queue_length(name) == 0
    assert await broker.dead_letters(name) == []


async def test_predicate_that_raises_is_a_handler_failure(broker: AbstractQueueBroker) -> None:
    queue, calls, seen = Queue(unique()), Calls(), Calls()

    def predicate(data: dict[str, Any]) -> bool:
        seen.add(data)
        if len(seen) == 1:
            raise RuntimeError('predicate broke')
        return True

    class Agent(MicroAgent):
        @consumer(queue, predicate=predicate, **FAST)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})

    await started(Agent(broker=broker))
    await broker.send(queue.name, {'n': 1})
    assert await calls.wait_for(1) == [{'n': 1}]
    assert len(seen) == 2  # retried, not dropped nor dead-lettered
    assert await broker.dead_letters(queue.name) == []


async def test_retry_on_retries_only_those(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue, retry_on=(ConnectionError,), **FAST)
        async def handle(self, kind: str, info: MessageInfo) -> None:
            calls.add({'kind': kind, 'attempt': info.attempt})
            if kind == 'transient' and info.attempt == 1:
                raise ConnectionError('flaky')
            if kind == 'bug':
                raise ValueError('not retried')

    await started(Agent(broker=broker))
    await broker.send_many(queue.name, [{'kind': 'bug'}, {'kind': 'transient'}])
    [letter] = await dead_letters(broker, queue.name, 1)
    assert letter.attempts == 1 and 'ValueError: not retried (not in retry_on)' in letter.error
    await calls.wait_for(3)
    assert sorted((c['kind'], c['attempt']) for c in calls.items) == [
        ('bug', 1), ('transient', 1), ('transient', 2)]


async def test_reject_on_dead_letters_at_once(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue, reject_on=[KeyError], max_attempts=3, **FAST)
        async def handle(self, kind: str) -> None:
            calls.add({'kind': kind})
            raise KeyError('missing') if kind == 'key' else RuntimeError('again')

    await started(Agent(broker=broker))
    await broker.send_many(queue.name, [{'kind': 'key'}, {'kind': 'other'}])
    letters = {orjson.loads(d.body)['kind']: d for d in await dead_letters(broker, queue.name, 2)}
    assert letters['key'].attempts == 1 and 'reject_on' in letters['key'].error
    assert letters['other'].attempts == 3
    assert sorted(c['kind'] for c in calls.items) == ['key', 'other', 'other', 'other']


async def test_on_error_decides_and_handler_control_still_wins(broker: AbstractQueueBroker) -> None:
    queue, calls, judged = Queue(unique()), Calls(), Calls()

    def on_error(exc: Exception, info: MessageInfo) -> Retry | Reject | None:
        judged.add({'exc': type(exc).__name__, 'attempt': info.attempt})
        if isinstance(exc, LookupError):
            return Reject(f'lookup failed: {exc}')
        if isinstance(exc, TimeoutError) and info.attempt < 3:
            return Retry(delay=0.01)
        return None  # the default policy: retried until max_attempts

    class Agent(MicroAgent):
        @consumer(queue, on_error=on_error, max_attempts=2, **FAST)
        async def handle(self, kind: str, info: MessageInfo) -> None:
            calls.add({'kind': kind, 'attempt': info.attempt})
            if kind == 'lookup':
                raise IndexError('no such row')
            if kind == 'timeout':
                raise TimeoutError('slow')
            if kind == 'retry' and info.attempt == 1:
                raise Retry(delay=0.01)  # the handler's own Retry: on_error is not asked

    await started(Agent(broker=broker))
    await broker.send_many(queue.name, [{'kind': 'lookup'}, {'kind': 'timeout'}, {'kind': 'retry'}])
    letters = {orjson.loads(d.body)['kind']: d for d in await dead_letters(broker, queue.name, 2)}
    assert letters['lookup'].attempts == 1 and 'lookup failed: no such row' in letters['lookup'].error
    assert letters['timeout'].attempts == 2  # on_error said Retry, max_attempts still holds
    await wait_until(lambda: len(calls) == 5, what='5 handler calls')
    assert sorted((c['kind'], c['attempt']) for c in calls.items) == [
        ('lookup', 1), ('retry', 1), ('retry', 2), ('timeout', 1), ('timeout', 2)]
    assert sorted((j['exc'], j['attempt']) for j in judged.items) == [
        ('IndexError', 1), ('TimeoutError', 1), ('TimeoutError', 2)]


# message context ----------------------------------------------------------------------------

async def test_message_info_fields(broker: AbstractQueueBroker) -> None:
    events, name, infos = unique('events'), unique('audit'), Calls()

    @dataclass(frozen=True)
    class Ping(Message, exchange=events, topic='ping.sent', type='ping.v1'):
        n: int

    class Agent(MicroAgent):
        @consumer(Ping, queue=name, max_attempts=4, **FAST)
        async def handle(self, dto: Ping, context: MessageInfo) -> None:
            infos.add({'info': context})
            if context.attempt < 3:
                raise Retry(delay=0.01)

    await started(Agent(broker=broker))
    before = time.time()
    await broker.publish(Ping(1), headers={'trace': 'abc', 'tenant': {'id': 7}})
    after = time.time()
    got = [c['info'] for c in await infos.wait_for(3)]
    assert [i.attempt for i in got] == [1, 2, 3]
    assert [i.redelivered for i in got] == [False, True, True]
    assert len({i.message_id for i in got}) == 1 and got[0].message_id
    assert {(i.queue, i.max_attempts, i.type_name) for i in got} == {(name, 4, 'ping.v1')}
    first = got[0]
    assert first.topic == 'ping.sent'
    assert before - 1 <= first.sent_at <= after + 1
    assert first.headers == {'trace': 'abc', 'tenant': {'id': 7}}


async def test_message_info_is_the_same_on_every_attempt(broker: AbstractQueueBroker) -> None:
    events, name, infos = unique('events'), unique('audit'), Calls()

    @dataclass(frozen=True)
    class Ping(Message, exchange=events, topic='ping.sent'):
        n: int

    class Agent(MicroAgent):
        @consumer(Ping, queue=name, **FAST)
        async def handle(self, dto: Ping, context: MessageInfo) -> None:
            infos.add({'info': context})
            if context.attempt < 3:
                raise RuntimeError('again')

    await started(Agent(broker=broker))
    await broker.publish(Ping(1), headers={'trace': 'abc'})
    got = [c['info'] for c in await infos.wait_for(3)]
    assert got[0].sent_at > 0
    assert {(i.sent_at, i.topic, str(i.headers)) for i in got} == {
        (got[0].sent_at, 'ping.sent', str({'trace': 'abc'}))}


async def test_custom_headers_of_a_plain_send_arrive(broker: AbstractQueueBroker) -> None:
    queue, infos = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int, info: MessageInfo) -> None:
            infos.add({'n': n, 'headers': info.headers, 'type': info.type_name})

    await started(Agent(broker=broker))
    await broker.send(queue.name, {'n': 1}, headers={'source': 'cron'})
    await getattr(broker, queue.name).send({'n': 2})
    assert await infos.wait_for(2) == [{'n': 1, 'headers': {'source': 'cron'}, 'type': ''},
                                       {'n': 2, 'headers': {}, 'type': ''}]


async def test_self_in_a_body_is_dead_lettered_at_once(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue, **FAST)
        async def handle(self, **data: Any) -> None:
            calls.add(data)

    await started(Agent(broker=broker))
    await broker.send_many(queue.name, [{'self': 1, 'n': 1}, {'n': 2}])
    [letter] = await dead_letters(broker, queue.name, 1)
    assert letter.attempts == 1 and "['self']" in letter.error
    assert await calls.wait_for(1) == [{'n': 2}]


# sync handlers -------------------------------------------------------------------------------

async def test_sync_handler_runs_in_a_worker_thread(broker: AbstractQueueBroker) -> None:
    name, calls = unique('sync'), Calls()
    loop_thread = threading.get_ident()

    @dataclass(frozen=True)
    class Job(Message, queue=name):
        n: int

    class Agent(MicroAgent):
        @consumer(Job, concurrency=2)
        def handle(self, dto: Job, info: MessageInfo) -> None:
            calls.items.append({'n': dto.n, 'thread': threading.get_ident(), 'queue': info.queue})

    await started(Agent(broker=broker))
    await broker.publish_many([Job(n) for n in range(5)])
    await wait_until(lambda: len(calls) == 5, what='5 sync calls')
    assert sorted(c['n'] for c in calls.items) == list(range(5))
    assert all(c['thread'] != loop_thread and c['queue'] == name for c in calls.items)


async def test_sync_handler_timeout_retries_while_the_thread_runs_on(broker: AbstractQueueBroker) -> None:
    queue, calls = Queue(unique()), Calls()
    release = threading.Event()

    class Agent(MicroAgent):
        @consumer(queue, timeout=0.2, concurrency=2, **FAST)
        def handle(self, n: int, info: MessageInfo) -> None:
            calls.items.append({'attempt': info.attempt})
            if info.attempt == 1:
                release.wait(30)  # stuck past the timeout; the pool's other thread takes attempt 2
            calls.items.append({'done': info.attempt})

    agent = await started(Agent(broker=broker))
    await broker.send(queue.name, {'n': 1})
    await wait_until(lambda: {'done': 2} in calls.items, what='attempt 2 done')
    assert {'done': 1} not in calls.items
    release.set()
    await wait_until(lambda: {'done': 1} in calls.items, what='the stuck thread to end')
    await agent.stop(grace=1)
    assert await broker.dead_letters(queue.name) == []


# the default broker, foreign producers -------------------------------------------------------

async def test_publish_through_overrides_in_concurrent_tasks(broker_factory: Any) -> None:
    first, second = broker_factory(), broker_factory()
    name, calls = unique('tasks'), Calls()
    published: dict[int, list[Any]] = {id(first): [], id(second): []}
    for each in (first, second):
        original = each._publish

        async def recording(batch: Any, each: Any = each, original: Any = original) -> None:
            published[id(each)].extend(orjson.loads(m.body)['n'] for m in batch)
            await original(batch)

        each._publish = recording

    @dataclass(frozen=True)
    class Task(Message, queue=name):
        n: int

    class Agent(MicroAgent):
        @consumer(Task)
        async def handle(self, dto: Task) -> None:
            calls.add({'n': dto.n})

    await started(Agent(broker=first))
    both_inside = asyncio.Barrier(2)

    async def producer(broker: AbstractQueueBroker, numbers: range) -> None:
        async with override_broker(broker):
            await both_inside.wait()  # both overrides active at once
            for n in numbers:
                await Task(n).publish()

    await asyncio.gather(producer(first, range(0, 3)), producer(second, range(3, 6)))
    assert published == {id(first): [0, 1, 2], id(second): [3, 4, 5]}
    await calls.wait_for(6)  # the brokers share their queues (one namespace)
    assert sorted(c['n'] for c in calls.items) == list(range(6))


async def raw_send(kind: str, broker: Any, queue: str, body: bytes) -> None:
    """What a producer in another language writes: the JSON body, no metadata of ours."""
    if kind == 'memory':
        from microagent_mq.transport import Outgoing
        await broker._publish([Outgoing(body, f'raw-{unique()}', (queue,))])
    elif kind == 'redis':
        import redis.asyncio as aioredis
        client = aioredis.Redis.from_url(broker.dsn)
        await client.xadd(broker.stream_key(queue), {'body': body})  # the one field it must write
        await client.aclose()
    elif kind == 'redis_cluster':  # the broker's client, for the routing; a plain XADD still
        await broker.client.xadd(broker.stream_key(queue), {'body': body})
    elif kind == 'nats':
        import nats

        client = await nats.connect(broker.dsn)
        await broker.ensure_queue(queue)  # a producer elsewhere writes to an existing stream
        await client.jetstream().publish(broker.names.subject(queue), body)  # no headers at all
        await client.close()
    else:
        import aio_pika
        connection = await aio_pika.connect(AMQP_DSN)
        async with connection:
            channel = await connection.channel()
            await channel.default_exchange.publish(aio_pika.Message(body), queue)


async def test_plain_json_from_a_raw_client_reaches_dict_and_typed_consumers(
        broker: AbstractQueueBroker, broker_kind: str, request: pytest.FixtureRequest) -> None:
    plain, typed, calls = Queue(unique()), unique('typed'), Calls()

    @dataclass(frozen=True)
    class Task(Message, queue=typed):
        n: int
        extra: dict[str, Any] = field(default_factory=dict)

    class Agent(MicroAgent):
        @consumer(plain)
        async def dicts(self, **data: Any) -> None:
            calls.add({'plain': data})

        @consumer(Task)
        async def tasks(self, dto: Task) -> None:
            calls.add({'typed': dto})

    await started(Agent(broker=broker))
    await raw_send(broker_kind, broker, plain.name, b'{"n": 1, "text": "hi"}')
    await raw_send(broker_kind, broker, typed, b'{"n": 2, "extra": {"a": 1}}')
    await calls.wait_for(2)
    assert sorted(calls.items, key=str) == [{'plain': {'n': 1, 'text': 'hi'}},
                                            {'typed': Task(2, {'a': 1})}]
