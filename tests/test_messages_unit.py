"""Typed messages without a server: declarations, clear errors, the wire format, the default broker."""

import decimal
import enum
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from microagent_mq import (
    ConfigurationError,
    Message,
    MessageInfo,
    MicroAgent,
    Queue,
    SerializingError,
    consumer,
    publish,
    publish_many,
    set_default_broker,
)
from microagent_mq.consumer import Consumer
from microagent_mq.message_codec import codec_of
from microagent_mq.messages import routing_of
from microagent_mq.tools.memory import MemoryBroker

from .conftest import Calls, unique, wait_until


@pytest.fixture
def memory() -> MemoryBroker:
    return MemoryBroker(f'memory://{unique()}')


@pytest.fixture(autouse=True)
def _no_default() -> Any:
    set_default_broker(None)
    yield
    set_default_broker(None)


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclass(frozen=True)
class Point:
    x: int
    y: int


# declarations ------------------------------------------------------------------------------

def test_routing_is_declared_inherited_and_overridden() -> None:
    @dataclass(frozen=True)
    class Task(Message, queue='tasks'):
        n: int

    @dataclass(frozen=True)
    class Urgent(Task):
        pass

    @dataclass(frozen=True)
    class Event(Message, exchange='events', topic='thing.happened', type='thing.happened.v1'):
        n: int

    @dataclass(frozen=True)
    class Moved(Event, queue='moves'):
        pass

    @dataclass(frozen=True, slots=True)
    class Slotted(Message, queue='slots', type='slotted.v2'):
        n: int

    assert routing_of(Urgent) == routing_of(Task) and routing_of(Task).queue == 'tasks'
    assert Urgent.__mq_type__ == 'test_routing_is_declared_inherited_and_overridden.<locals>.Urgent'
    assert (routing_of(Event).exchange, routing_of(Event).topic, Event.__mq_type__) == (
        'events', 'thing.happened', 'thing.happened.v1')
    assert routing_of(Moved).queue == 'moves' and not routing_of(Moved).exchange
    assert Moved.__mq_headers__ == {'mq-type': Moved.__mq_type__}  # no topic on a task
    assert (routing_of(Slotted).queue, Slotted.__mq_type__) == ('slots', 'slotted.v2')


def test_bad_declarations_name_the_class() -> None:
    with pytest.raises(ConfigurationError, match=r'message class .*Both: give queue= .* not both'):
        class Both(Message, queue='a', exchange='b'):
            pass
    with pytest.raises(ConfigurationError, match=r'message class .*Loose: topic= needs exchange='):
        class Loose(Message, topic='a.b'):
            pass
    with pytest.raises(ConfigurationError, match=r'queue name of message class .*Upper'):
        class Upper(Message, queue='Bad Name'):
            pass
    with pytest.raises(ConfigurationError, match=r"message class .*Topic: invalid topic 'a..b'"):
        class Topic(Message, exchange='ex', topic='a..b'):
            pass
    with pytest.raises(ConfigurationError, match=r'message class .*Typed: type must be a non-empty'):
        class Typed(Message, queue='q', type=''):
            pass


async def test_publishing_unrouted_or_unserialisable_is_a_clear_error(memory: MemoryBroker) -> None:
    @dataclass(frozen=True)
    class Unrouted(Message):
        n: int

    @dataclass(frozen=True)
    class Money(Message, queue=unique()):
        amount: decimal.Decimal

    class NotADataclass(Message, queue=unique()):
        pass

    with pytest.raises(ConfigurationError, match=r'message class .*Unrouted has no route'):
        await memory.publish(Unrouted(1))
    with pytest.raises(SerializingError, match=r'.*Money is not JSON-serialisable: .*Decimal'):
        await memory.publish(Money(decimal.Decimal('1.5')))
    with pytest.raises(ConfigurationError, match=r'NotADataclass must be a dataclass or a pydantic'):
        await memory.publish(NotADataclass())


async def test_reserved_and_bad_headers_are_refused(memory: MemoryBroker) -> None:
    queue = Queue(unique())

    @dataclass(frozen=True)
    class Task(Message, queue=queue.name):
        n: int

    with pytest.raises(ConfigurationError, match=r"header 'mq-type' is reserved"):
        await memory.send(queue.name, {'n': 1}, headers={'mq-type': 'forged'})
    with pytest.raises(ConfigurationError, match=r"header 'mq-topic' is reserved"):
        await memory.publish(Task(1), headers={'mq-topic': 'x'})
    with pytest.raises(ConfigurationError, match=r'header names must be strings'):
        await memory.send_many(queue.name, [{'n': 1}], headers={1: 'x'})
    with pytest.raises(SerializingError, match=r'headers are not JSON-serialisable'):
        await memory.send(queue.name, {'n': 1}, headers={'at': object()})
    with pytest.raises(ConfigurationError, match=r'headers must be a dict'):
        await memory.publish(Task(1), headers=['x'])  # type: ignore[arg-type]
    assert await memory.queue_length(queue.name) == 0


def test_bad_consumer_options_name_the_option() -> None:
    queue = Queue(unique())
    with pytest.raises(ConfigurationError, match=r"unknown consumer options \['predicat'\]"):
        consumer(queue, predicat=bool)
    with pytest.raises(ConfigurationError, match=r'predicate=1: expected a callable'):
        consumer(queue, predicate=1)
    with pytest.raises(ConfigurationError, match=r"on_error='x': expected a callable"):
        consumer(queue, on_error='x')

    async def async_predicate(dto: Any) -> bool:
        return True

    with pytest.raises(ConfigurationError, match=r'predicate=.*async_predicate.*not async def'):
        consumer(queue, predicate=async_predicate)
    with pytest.raises(ConfigurationError, match=r'retry_on: 3 is not an exception class'):
        consumer(queue, retry_on=(ValueError, 3))
    with pytest.raises(ConfigurationError, match=r'reject_on: .*str.* is not an exception class'):
        consumer(queue, reject_on=str)
    with pytest.raises(ConfigurationError, match=r"unknown='drop': expected 'dead_letter' or 'ignore'"):
        consumer(queue, unknown='drop')


def test_bad_typed_consumers_name_the_class() -> None:
    @dataclass(frozen=True)
    class Task(Message, queue='tasks'):
        n: int

    @dataclass(frozen=True)
    class Event(Message, exchange='events', topic='e.x'):
        n: int

    with pytest.raises(ConfigurationError, match=r"@consumer\(.*Event\): an event needs queue="):
        consumer(Event)
    with pytest.raises(ConfigurationError, match=r"task goes to queue 'tasks', not 'other'"):
        consumer(Task, queue='other')
    with pytest.raises(ConfigurationError, match=r'the message class is the DTO'):
        consumer(Task, dto_class=Point)
    with pytest.raises(ConfigurationError, match=r'queue= goes with a message class'):
        consumer(Queue('plain'), queue='x')
    with pytest.raises(ConfigurationError, match=r'needs a declared queue or a Message class'):
        consumer(Point)


def test_sharing_a_queue_needs_typed_handlers_that_agree() -> None:
    @dataclass(frozen=True)
    class A(Message, exchange='one', topic='a'):
        n: int

    @dataclass(frozen=True)
    class B(Message, exchange='two', topic='b'):
        n: int

    @dataclass(frozen=True)
    class C(Message, exchange='one', topic='c'):
        n: int

    plain = Queue('shared')
    with pytest.raises(ConfigurationError, match=r"one handler per queue; \['shared'\]"):
        class Mixed(MicroAgent):
            @consumer(plain)
            async def dicts(self, **data: Any) -> None: ...

            @consumer(A, queue='shared')
            async def typed(self, dto: A) -> None: ...
    with pytest.raises(ConfigurationError, match=r"bound to one exchange, not \['one', 'two'\]"):
        class TwoExchanges(MicroAgent):
            @consumer(A, queue='svc')
            async def a(self, dto: A) -> None: ...

            @consumer(B, queue='svc')
            async def b(self, dto: B) -> None: ...
    with pytest.raises(ConfigurationError, match=r'a and again both take'):
        class Twice(MicroAgent):
            @consumer(A, queue='svc')
            async def a(self, dto: A) -> None: ...

            @consumer(A, queue='svc')
            async def again(self, dto: A) -> None: ...
    with pytest.raises(ConfigurationError, match=r'share option max_attempts; 2 != 3'):
        class Disagree(MicroAgent):
            @consumer(A, queue='svc', max_attempts=2)
            async def a(self, dto: A) -> None: ...

            @consumer(C, queue='svc', max_attempts=3, predicate=bool)
            async def c(self, dto: C) -> None: ...
    with pytest.raises(ConfigurationError, match=r'share one timeout, not \[5.0, 9.0\]'):
        class Timeouts(MicroAgent):
            @consumer(A, queue='svc', timeout=5)
            async def a(self, dto: A) -> None: ...

            @consumer(C, queue='svc', timeout=9)
            async def c(self, dto: C) -> None: ...


async def test_typed_handler_signature_is_checked_at_start(memory: MemoryBroker) -> None:
    @dataclass(frozen=True)
    class Task(Message, queue=unique()):
        n: int

    class NoDto(MicroAgent):
        @consumer(Task)
        async def handle(self, task: Task) -> None: ...

    class Extra(MicroAgent):
        @consumer(Task)
        async def handle(self, dto: Task, user: str) -> None: ...

    with pytest.raises(ConfigurationError, match=r"takes no parameter 'dto' .* \(set dto_name=\)"):
        await NoDto(broker=memory).start()
    with pytest.raises(ConfigurationError, match=r"cannot fill parameters \['user'\]"):
        await Extra(broker=memory).start()


async def test_a_declared_queue_must_receive_the_event(memory: MemoryBroker) -> None:
    Queue('orders_only', 'events', ('order.*',))

    @dataclass(frozen=True)
    class UserRegistered(Message, exchange='events', topic='user.registered'):
        n: int

    class Agent(MicroAgent):
        @consumer(UserRegistered, queue='orders_only')
        async def handle(self, dto: UserRegistered) -> None: ...

    with pytest.raises(ConfigurationError, match=r"would not receive .*UserRegistered .*'user.registered'"):
        await Agent(broker=memory).start()


# the wire format --------------------------------------------------------------------------

async def test_body_is_the_plain_json_of_the_fields_and_the_type_a_header(memory: MemoryBroker) -> None:
    queue = Queue(unique(), 'events', ('user.*',))

    @dataclass(frozen=True)
    class UserRegistered(Message, exchange='events', topic='user.registered', type='user.registered.v1'):
        user_id: uuid.UUID
        at: datetime
        color: Color
        where: Point

    sent = UserRegistered(uuid.uuid4(), datetime(2026, 3, 1, 12, tzinfo=UTC), Color.BLUE, Point(1, 2))
    await memory.publish(sent, headers={'trace': 't-1'})
    [delivery] = list(memory._get(queue.name).ready)
    assert orjson.loads(delivery.body) == {'user_id': str(sent.user_id), 'at': '2026-03-01T12:00:00+00:00',
                                           'color': 2, 'where': {'x': 1, 'y': 2}}
    assert delivery.headers == {'trace': 't-1', 'mq-type': 'user.registered.v1',
                                'mq-topic': 'user.registered'}


def test_dataclass_codec_rebuilds_what_orjson_wrote() -> None:
    @dataclass(frozen=True)
    class Rich(Message, queue='rich'):
        when: datetime
        day: date
        ids: list[uuid.UUID]
        colors: tuple[Color, ...]
        points: dict[str, Point]
        maybe: Point | None = None
        tags: frozenset[str] = field(default_factory=frozenset)

    codec = codec_of(Rich)
    rich = Rich(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), date(2026, 1, 2), [uuid.uuid4()],
                (Color.RED, Color.BLUE), {'a': Point(1, 2)}, Point(3, 4), frozenset({'x'}))
    assert codec.decode(codec.encode(rich)) == rich
    assert codec.decode(codec.encode(Rich(rich.when, rich.day, [], (), {}))).maybe is None


def test_pydantic_codec_uses_pydantic() -> None:
    class Model(BaseModel, Message, queue='models'):
        at: datetime
        where: dict[str, int]

    codec = codec_of(Model)
    model = Model(at=datetime(2026, 1, 1, tzinfo=UTC), where={'x': 1})
    assert codec.encode(model) == model.model_dump_json().encode()
    assert codec.decode(codec.encode(model)) == model


async def test_a_body_the_class_refuses_is_dead_lettered_at_once(memory: MemoryBroker) -> None:
    name, calls = unique(), Calls()

    class Strict(BaseModel, Message, queue=name):
        n: int

    class Agent(MicroAgent):
        @consumer(Strict)
        async def handle(self, dto: Strict) -> None:
            calls.add({'n': dto.n})

    await Agent(broker=memory).start()
    await memory.send(name, {'n': 'not a number'})
    await memory.publish(Strict(n=2))
    assert await calls.wait_for(1) == [{'n': 2}]
    [letter] = await memory.dead_letters(name)
    assert letter.attempts == 1 and 'rejected the message' in letter.error


# consumers -----------------------------------------------------------------------------------

async def test_plain_consumer_keeps_the_engine_calling_the_method_directly(memory: MemoryBroker) -> None:
    queue = Queue(unique())

    class Agent(MicroAgent):
        @consumer(queue, dto_class=Point)
        async def handle(self, dto: Point, **data: Any) -> None: ...

        async def other(self, info: MessageInfo) -> None: ...

    agent = Agent(broker=memory)
    await agent.start()
    [plain] = agent._consumers
    # No wrapper between the engine and a plain handler: no cost added per message.
    assert plain.handler == agent.handle
    assert plain.arguments == plain.routes[0].body_arguments
    rich = Consumer(agent, agent.other, Queue(unique()), 60, {})
    assert rich.handler == rich._dispatch


async def test_message_publish_uses_the_default_broker_and_agents_borrow_it(memory: MemoryBroker) -> None:
    name, calls = unique(), Calls()

    @dataclass(frozen=True)
    class Task(Message, queue=name):
        n: int

    class Agent(MicroAgent):
        @consumer(Task)
        async def handle(self, dto: Task) -> None:
            calls.add({'n': dto.n})

    with pytest.raises(ConfigurationError, match=r'has consumers but no broker'):
        await Agent().start()
    set_default_broker(memory)
    agent = Agent()
    await agent.start()
    assert agent.broker is memory
    await Task(1).publish()
    await publish(Task(2))
    await publish_many([Task(3), Task(4)], delay=0.01)
    assert sorted(c['n'] for c in await calls.wait_for(4)) == [1, 2, 3, 4]
    info = agent.info()
    assert info['consumers'][0]['message_class'].endswith('Task')
    assert info['counts'] == {name: {'filtered': 0, 'ignored': 0}}
    closed = Calls()
    memory._disconnect = lambda: closed.add({})  # type: ignore[method-assign,assignment,return-value]
    await agent.stop()
    assert len(closed) == 0  # the default broker is shared: the agent does not close it


async def test_event_without_a_bound_queue_is_not_stored(memory: MemoryBroker) -> None:
    @dataclass(frozen=True)
    class Lonely(Message, exchange=unique('ex'), topic='a.b'):
        n: int

    await memory.publish(Lonely(1))  # no error, nothing stored: as RabbitMQ does
    assert memory._queues == {}


async def test_sync_handler_sees_the_override_of_its_caller(memory: MemoryBroker) -> None:
    queue, seen = Queue(unique()), Calls()
    other = MemoryBroker(f'memory://{unique()}')

    class Agent(MicroAgent):
        @consumer(queue)
        def handle(self, n: int) -> None:
            from microagent_mq import get_default_broker
            seen.items.append({'broker': get_default_broker()})

    set_default_broker(other)
    await Agent(broker=memory).start()
    await memory.send(queue.name, {'n': 1})
    await wait_until(lambda: len(seen) == 1, what='the sync call')
    assert seen.items[0]['broker'] is other


async def test_a_dto_key_without_dto_class_is_poison_not_a_retry_loop(memory: MemoryBroker) -> None:
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})

    await Agent(broker=memory).start()
    await memory.send_many(queue.name, [{'n': 1, 'dto': 'x'}, {'n': 2}])
    assert await calls.wait_for(1) == [{'n': 2}]
    [letter] = await memory.dead_letters(queue.name)
    assert letter.attempts == 1 and "takes no arguments ['dto']" in letter.error
