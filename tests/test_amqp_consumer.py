"""RabbitMQ consumer side: graceful stops, failed settles, stale buffers, foreign messages."""

import asyncio
import hashlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import aiormq
import orjson
import pytest

from microagent_mq import MicroAgent, Queue, Reject, consumer
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.consumer import Consumer
from microagent_mq.tools.amqp import AMQPBroker
from microagent_mq.tools.amqp_codec import outgoing_message
from microagent_mq.tools.amqp_consumer import AMQPSubscription
from microagent_mq.transport import Delivery

from .conftest import AMQP_DSN, Calls, unique, wait_until

pytestmark = pytest.mark.amqp


@pytest.fixture
def broker_kind() -> str:
    """conftest's ``broker`` fixtures, on RabbitMQ only: closed and cleaned up after."""
    return 'amqp'


@pytest.fixture
async def raw() -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A plain aio-pika channel of the test's own: a foreign producer, or a peek at queues."""
    connection = await aio_pika.connect(AMQP_DSN)
    async with connection:
        yield await connection.channel()


async def drain(channel: aio_pika.abc.AbstractChannel, name: str) -> list[Any]:
    """Every message of queue ``name``, in order, acked (taken out)."""
    queue = await channel.declare_queue(name, durable=True)
    taken = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(message)
    return taken


async def length_is(broker: AbstractQueueBroker, name: str, length: int) -> bool:
    return await broker.queue_length(name) == length


def agent_consuming(queue: Queue, handler: Callable[..., Any], **options: Any) -> type[MicroAgent]:
    class Agent(MicroAgent):
        @consumer(queue, **options)
        async def handle(self, **kwargs: Any) -> None:
            await handler(**kwargs)

    return Agent


async def subscribe(broker: AMQPBroker, queue: Queue, **options: Any) -> AMQPSubscription:
    async def handler(**kwargs: Any) -> None:
        return None

    agent = agent_consuming(queue, handler, **options)(broker=broker)
    subscription = await broker._subscribe(Consumer(agent, handler, queue, 60, options))
    assert isinstance(subscription, AMQPSubscription)
    return subscription


class Proxy:
    """A TCP proxy of the test's own in front of RabbitMQ: ``cut()`` aborts what goes through it."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self.accepted = 0  # connections taken so far

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, '127.0.0.1', 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers += [writer, up_writer]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer),
                             return_exceptions=True)

    def cut(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.transport.abort()

    async def close(self) -> None:
        self._server.close()
        self.cut()
        await self._server.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


def through(proxy: Proxy, **options: Any) -> AMQPBroker:
    """A broker connecting through ``proxy``."""
    url = urlsplit(AMQP_DSN)
    return AMQPBroker(url._replace(netloc=f'{url.username}:{url.password}@127.0.0.1:{proxy.port}')
                      .geturl(), **options)


@pytest.fixture
async def proxy() -> AsyncIterator[Proxy]:
    url = urlsplit(AMQP_DSN)
    proxy = Proxy(url.hostname or '127.0.0.1', url.port or 5672)
    await proxy.start()
    yield proxy
    await proxy.close()


# item 2: a graceful stop costs nothing ----------------------------------------------------


@pytest.mark.parametrize('concurrency', [1, 4])
async def test_graceful_stop_mid_way_dead_letters_nothing(
        broker_factory: Callable[[], AbstractQueueBroker], concurrency: int) -> None:
    queue, calls = Queue(unique()), Calls()
    half = asyncio.Event()

    async def handle(n: int) -> None:
        calls.add({'n': n})
        if len(calls) == 20:
            half.set()
        await asyncio.sleep(0.005)  # slow-ish, so the stop finds a full buffer

    Agent = agent_consuming(queue, handle, max_attempts=1, concurrency=concurrency, prefetch=16)
    sending, first_broker, second_broker = broker_factory(), broker_factory(), broker_factory()
    await sending.send_many(queue.name, [{'n': n} for n in range(60)])
    first = Agent(broker=first_broker)
    await first.start()
    await half.wait()
    await first.stop(grace=10)
    assert len(calls) < 60, 'the stop came too late to test anything'
    second = Agent(broker=second_broker)
    await second.start()
    await calls.wait_for(60)
    await wait_until(lambda: length_is(sending, queue.name, 0), what='an empty queue')
    await second.stop(grace=10)
    assert await sending.dead_letters(queue.name) == []
    assert Counter(c['n'] for c in calls.items) == Counter(range(60))


async def test_stop_fetching_then_release_then_close_gives_everything_back_in_order(
        broker: AMQPBroker, raw: aio_pika.abc.AbstractChannel) -> None:
    queue = Queue(unique())
    await raw.declare_queue(queue.name, durable=True)
    for n in range(20):  # with the sender's metadata, which a release keeps
        await raw.default_exchange.publish(outgoing_message(
            orjson.dumps({'n': n}), f'm-{n}', 1, headers={'n': n}, sent_at=1700000000 + n),
            queue.name)
    subscription = await subscribe(broker, queue, concurrency=4, prefetch=16)
    await wait_until(lambda: length_is(broker, queue.name, 0), what='every message pushed')
    fetched = await subscription.fetch(20)
    assert [orjson.loads(d.body)['n'] for d in fetched] == [0, 1, 2, 3]
    await subscription.stop_fetching()
    assert await subscription.fetch(20) == []  # nothing new enters the engine's buffer
    await subscription.release(fetched)
    await subscription.close()
    await wait_until(lambda: length_is(broker, queue.name, 20), what='all 20 back in the queue')
    back = await drain(raw, queue.name)
    assert [orjson.loads(m.body)['n'] for m in back] == list(range(20))
    assert [m.headers['x-attempt'] for m in back] == [1] * 20
    assert [(m.message_id, orjson.loads(m.headers['x-headers']), m.headers['x-sent-at'])
            for m in back] == [(f'm-{n}', {'n': n}, (1700000000 + n) * 1000) for n in range(20)]
    assert not any(m.redelivered for m in back)


# item 5: a failed settle requeues ---------------------------------------------------------


async def test_dlq_deleted_behind_the_consumer_stalls_nothing_and_loses_nothing(
        broker_factory: Callable[[], AbstractQueueBroker], raw: aio_pika.abc.AbstractChannel) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handle(n: int) -> None:
        if n < 0:
            raise Reject('negative')
        calls.add({'n': n})

    consuming, sending = broker_factory(), broker_factory()
    agent = agent_consuming(queue, handle, max_attempts=100, prefetch=1)(broker=consuming)
    await agent.start()
    await raw.queue_delete(f'{queue.name}.dlq')  # behind the consumer's back
    await sending.send_many(queue.name, [{'n': -1}, {'n': -2}, {'n': -3}])
    await sending.send_many(queue.name, [{'n': n} for n in range(10)])
    await calls.wait_for(10)  # prefetch + 1 failed settles no longer stall the consumer
    await raw.declare_queue(f'{queue.name}.dlq', durable=True)  # in case nobody did

    async def dead_lettered() -> bool:
        return len(await sending.dead_letters(queue.name)) >= 3

    await wait_until(dead_lettered, what='the rejected messages dead-lettered')
    await agent.stop(grace=10)
    letters = await sending.dead_letters(queue.name)
    assert sorted(letter.data['n'] for letter in letters) == [-3, -2, -1]
    assert sorted(c['n'] for c in calls.items) == list(range(10))
    assert await sending.queue_length(queue.name) == 0


async def test_failed_retry_publish_requeues_instead_of_stalling(
        broker: AMQPBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handle(n: int) -> None:
        calls.add({'n': n})
        if n == 0 and len(calls) == 1:
            raise ValueError('first attempt fails')

    republish, failures = broker.republish, [ConnectionError('publish failed')] * 2

    async def flaky(*args: Any, **kwargs: Any) -> None:
        if failures:
            raise failures.pop()
        await republish(*args, **kwargs)

    monkeypatch.setattr(broker, 'republish', flaky)
    agent = agent_consuming(queue, handle, prefetch=0, retry_delay=0.01)(broker=broker)
    await agent.start()
    await broker.send_many(queue.name, [{'n': n} for n in range(5)])
    await calls.wait_for(6)  # one prefetch slot: a stranded message would stall the rest
    await wait_until(lambda: length_is(broker, queue.name, 0), what='an empty queue')
    await agent.stop(grace=10)
    assert failures == []
    assert sorted(c['n'] for c in calls.items) == [0, 0, 1, 2, 3, 4]
    assert await broker.dead_letters(queue.name) == []


# item 6: a failed crash count keeps the batch ---------------------------------------------


async def test_failed_redelivery_count_keeps_the_collected_batch(
        broker: AMQPBroker, raw: aio_pika.abc.AbstractChannel, monkeypatch: pytest.MonkeyPatch) -> None:
    queue = Queue(unique())
    # Message 2 redelivered behind message 1: its first consumer closes its channel holding it.
    await broker.send(queue.name, {'n': 2})
    holder = await aio_pika.connect(AMQP_DSN)
    amqp_queue = await (await holder.channel()).declare_queue(queue.name, durable=True)
    held = await amqp_queue.get(no_ack=False)
    assert held.body == b'{"n":2}'
    await broker.send(queue.name, {'n': 1})
    subscription = await subscribe(broker, queue, concurrency=4, prefetch=4)
    await wait_until(lambda: subscription._incoming, what='the first message pushed')
    await holder.close()
    await wait_until(lambda: len(subscription._incoming) == 2, what='the redelivery pushed')

    async def failing(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError('publish failed')

    monkeypatch.setattr(broker, 'republish', failing)
    batch = await subscription.fetch(4)
    assert [orjson.loads(d.body) for d in batch] == [{'n': 1}]
    await subscription.ack(batch[0])
    monkeypatch.undo()
    again: list[Delivery] = []

    async def fetched() -> bool:  # counted (republished as attempt 2), then the copy arrives
        again.extend(await subscription.fetch(4))
        return bool(again)

    await wait_until(fetched, what='the counted copy')
    assert [(orjson.loads(d.body), d.attempt) for d in again] == [({'n': 2}, 2)]
    assert again[0].message_id == held.message_id and again[0].sent_at > 0  # metadata kept
    await subscription.ack(again[0])
    await subscription.close()
    assert await broker.queue_length(queue.name) == 0


# foreign producers, headers ---------------------------------------------------------------


async def test_message_without_id_or_headers_works_and_keeps_a_stable_id(
        broker: AMQPBroker, raw: aio_pika.abc.AbstractChannel, monkeypatch: pytest.MonkeyPatch) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handle(n: int) -> None:
        calls.add({'n': n})
        if n == 2:
            raise ValueError('always fails')

    agent = agent_consuming(queue, handle, max_attempts=2, retry_delay=0.01)(broker=broker)
    await agent.start()
    # aiormq stamps a random id on every message it publishes; other clients (pika, Go, Java)
    # send none unless told: mute aiormq's stamp for these two.
    with monkeypatch.context() as patch:
        patch.setattr(aiormq.channel, 'UUID', lambda **_: SimpleNamespace(hex=None))
        for n in (1, 2):
            await raw.default_exchange.publish(aio_pika.Message(f'{{"n": {n}}}'.encode()), queue.name)

    async def dead() -> bool:
        return len(await broker.dead_letters(queue.name)) == 1

    await wait_until(dead, what='the failing foreign message dead-lettered')
    await agent.stop(grace=10)
    assert sorted(c['n'] for c in calls.items) == [1, 2, 2]
    letter = (await broker.dead_letters(queue.name))[0]
    assert letter.data == {'n': 2} and letter.attempts == 2
    assert letter.message_id == 'body-' + hashlib.blake2b(b'{"n": 2}', digest_size=12).hexdigest()


async def test_retries_and_dead_letters_keep_the_senders_headers(
        broker: AMQPBroker, raw: aio_pika.abc.AbstractChannel) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handle(n: int) -> None:
        calls.add({'n': n})
        raise ValueError('always fails')

    agent = agent_consuming(queue, handle, max_attempts=2, retry_delay=0.01)(broker=broker)
    await agent.start()
    sent = outgoing_message(b'{"n": 1}', 'm-1', 1, headers={'trace': 'abc', 'k': [1]},
                            sent_at=1700000000.5)
    await raw.default_exchange.publish(sent, queue.name)

    async def dead() -> bool:
        return len(await broker.dead_letters(queue.name)) == 1

    await wait_until(dead, what='dead-lettered after two attempts')
    await agent.stop(grace=10)
    assert len(calls) == 2
    letter = (await drain(raw, f'{queue.name}.dlq'))[0]
    assert orjson.loads(letter.headers['x-headers']) == {'trace': 'abc', 'k': [1]}
    assert letter.headers['x-sent-at'] == 1700000000500
    assert letter.message_id == 'm-1' and letter.headers['x-attempt'] == 2


# issue 9 item 3: the stale buffer --------------------------------------------------------


async def test_messages_buffered_from_a_lost_connection_are_handled_once(
        broker: AMQPBroker, proxy: Proxy) -> None:
    queue, calls = Queue(unique()), Calls()
    gate = asyncio.Event()

    async def handle(n: int) -> None:
        calls.add({'n': n})
        if n == 0:
            await gate.wait()

    cut_broker = through(proxy, reconnect_interval=0.1)
    agent = agent_consuming(queue, handle, max_attempts=1, prefetch=16)(broker=cut_broker)
    await broker.send_many(queue.name, [{'n': n} for n in range(10)])
    await agent.start()
    try:
        await calls.wait_for(1)
        await wait_until(lambda: length_is(broker, queue.name, 0), what='all pushed to the consumer')
        proxy.cut()  # while 0 is in its handler and 1-9 are buffered
        runner = cut_broker._runners[queue.name]
        assert isinstance(runner._sub, AMQPSubscription)
        buffered = [*runner._sub._incoming, *(d.handle for d in runner._buffer)]
        assert len(buffered) == 9
        await wait_until(lambda: all(m.channel.is_closed for m in buffered if not _raises(m)),
                         what='the client seeing the loss')
        gate.set()
        await calls.wait_for(10, timeout_s=30)

        async def dead_lettered() -> bool:
            return len(await broker.dead_letters(queue.name)) == 1

        # 0 was in its handler: its ack was lost, so its redelivery counts (max_attempts=1).
        await wait_until(dead_lettered, what='0 dead-lettered')
        await wait_until(lambda: length_is(broker, queue.name, 0), what='an empty queue')
    finally:
        await agent.stop(grace=5)
    assert sorted(c['n'] for c in calls.items) == list(range(10))
    assert [letter.data['n'] for letter in await broker.dead_letters(queue.name)] == [0]


def _raises(message: aio_pika.abc.AbstractIncomingMessage) -> bool:
    try:
        message.channel  # noqa: B018 - aio-pika raises for a closed channel
    except aio_pika.exceptions.ChannelInvalidStateError:
        return True
    return False


# item 7: a copy and its ack are one -------------------------------------------------------


async def test_connection_drop_between_copy_and_ack_does_not_split_the_message(
        broker: AMQPBroker, proxy: Proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handle(n: int) -> None:
        calls.add({'n': n})
        raise ValueError('always fails')

    cut_broker = through(proxy, reconnect_interval=0.1)
    republish = cut_broker.republish

    async def republish_then_cut(*args: Any, **kwargs: Any) -> None:
        await republish(*args, **kwargs)
        if proxy.accepted == 1:  # the first retry: the copy is out, its ack not yet
            proxy.cut()
            await wait_until(lambda: proxy.accepted > 1, what='the client reconnecting')

    monkeypatch.setattr(cut_broker, 'republish', republish_then_cut)
    agent = agent_consuming(queue, handle, max_attempts=2, retry_delay=0.01)(broker=cut_broker)
    await agent.start()
    try:
        await broker.send(queue.name, {'n': 1})

        async def dead_lettered() -> bool:
            return len(await broker.dead_letters(queue.name)) >= 1

        await wait_until(dead_lettered, timeout_s=30, what='the message dead-lettered')
        assert proxy.accepted > 1, 'the connection was never cut'
        await wait_until(lambda: length_is(broker, queue.name, 0), what='an empty queue')
    finally:
        await agent.stop(grace=5)
    assert len(await broker.dead_letters(queue.name)) == 1
    assert len(calls) == 2  # max_attempts, not one more
