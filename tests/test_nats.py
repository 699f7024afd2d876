"""NATS JetStream specifics: layout, wire format, attempts, foreign producers, the missing extra."""

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest

from microagent_mq import BrokerUnavailable, ConfigurationError, Queue, Reject
from microagent_mq.agent_queues import DEFAULT_TIMEOUT_S
from microagent_mq.cli import main
from microagent_mq.consumer import Consumer
from microagent_mq.factory import broker_from_dsn
from microagent_mq.transport import Outgoing

from .conftest import NATS_DSN, Calls, delete_nats_streams, free_port, require_server, unique, wait_until
from .test_contract import agent_for, start

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


async def _subscription(broker: Any, queue: Queue, **options: Any) -> Any:
    async def handler(**data: Any) -> None: ...

    agent = agent_for(queue, handler, **options)(broker=broker)
    spec = agent._consumer_specs['handle']
    return await broker._subscribe(Consumer(agent, agent.handle, queue, spec.timeout or DEFAULT_TIMEOUT_S,
                                            spec.options))


async def _fetch(subscription: Any, count: int) -> list[Any]:
    got: list[Any] = []
    for _ in range(50):
        got.extend(await subscription.fetch(count - len(got)))
        if len(got) >= count:
            return got
    raise AssertionError(f'fetched {len(got)} of {count}')


async def test_layout_and_wire_format(broker: Any) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': 1})
    await broker.send(queue.name, {'n': 2}, delay=60)
    js = await broker.jetstream()
    stream = await js.stream_info(f'{broker.prefix}-{queue.name}')
    assert stream.config.subjects == [f'{broker.prefix}.{queue.name}']
    assert stream.state.messages == 1
    stored = await js.get_msg(f'{broker.prefix}-{queue.name}', stream.state.first_seq)
    assert stored.data == b'{"n":1}'  # plain JSON: any producer can send
    assert set(stored.headers or {}) == {'Nats-Msg-Id', 'Mq-Sent-At'}
    delayed = await js.stream_info(f'{broker.prefix}-{queue.name}-delayed')
    assert delayed.state.messages == 1
    assert await broker.queue_length(queue.name) == 1  # the delayed one is not waiting


async def test_a_send_retried_after_a_lost_reply_is_stored_once(broker: Any) -> None:
    queue = Queue(unique())
    message = Outgoing(b'{"n":1}', 'same-id', (queue.name,))
    await broker._publish([message])
    await broker._publish([message])  # what a retry after a lost publish ack does
    assert await broker.queue_length(queue.name) == 1


async def test_headers_and_sent_at_round_trip(broker: Any) -> None:
    queue = Queue(unique())
    meta = {'trace': 'abc', 'nested': {'list': [1, 2.5, None, 'é']}}
    await broker._publish([Outgoing(b'{"n":1}', 'm1', (queue.name,), headers=meta,
                                    sent_at=1_700_000_000.123)])
    subscription = await _subscription(broker, queue)
    try:
        [delivery] = await _fetch(subscription, 1)
        assert (delivery.message_id, delivery.headers, delivery.sent_at, delivery.attempt) == (
            'm1', meta, 1_700_000_000.123, 1)
        await subscription.ack(delivery)
    finally:
        await subscription.stop_fetching()
        await subscription.close()


async def test_release_costs_no_attempt_keeps_order_and_a_retry_does(broker: Any) -> None:
    queue = Queue(unique())
    await broker.send_many(queue.name, [{'n': i} for i in range(5)])
    first = await _subscription(broker, queue)
    taken = await _fetch(first, 3)
    await first.stop_fetching()
    await first.release(taken)
    await first.close()
    second = await _subscription(broker, queue)
    try:
        again = await _fetch(second, 5)
        assert [d.body for d in again] == [b'{"n":%d}' % i for i in range(5)]  # same order
        assert [d.attempt for d in again] == [1] * 5  # released: never handled, no attempt
        await second.retry_later(again[0], 0.01, 'failed')
        for delivery in again[1:]:
            await second.ack(delivery)
        [retried] = await _fetch(second, 1)
        assert (retried.body, retried.attempt) == (b'{"n":0}', 2)  # a failure is one
        await second.ack(retried)
    finally:
        await second.stop_fetching()
        await second.close()
    await wait_until(lambda: _length_is(broker, queue.name, 0), what='empty queue')


async def _length_is(broker: Any, name: str, expected: int) -> bool:
    return bool(await broker.queue_length(name) == expected)


async def test_a_foreign_plain_json_message_is_consumed(broker: Any) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(**data: Any) -> None:
        calls.add(data)

    await start(broker, queue, handler)
    js = await broker.jetstream()  # a producer that knows nothing of us: no headers at all
    await js.publish(f'{broker.prefix}.{queue.name}', b'{"from": "outside"}')
    await js.publish(f'{broker.prefix}.{queue.name}', b'not json')
    assert await calls.wait_for(1) == [{'from': 'outside'}]
    await wait_until(lambda: _dead_count(broker, queue.name, 1), what='a dead letter')
    [letter] = await broker.dead_letters(queue.name)
    assert letter.body == b'not json' and letter.attempts == 1
    assert letter.message_id.startswith(f'{broker.prefix}-{queue.name}-')  # stream and sequence


async def _dead_count(broker: Any, name: str, count: int) -> bool:
    return len(await broker.dead_letters(name)) == count


async def test_exchange_copies_follow_amqp_topic_rules(broker: Any) -> None:
    exchange = unique('ex')
    tail = Queue(unique(), exchange, ('a.#',))  # '#' also matches zero words: 'a'
    middle = Queue(unique(), exchange, ('a.#.z',))  # '#' in the middle: no NATS wildcard
    one = Queue(unique(), exchange, ('a.*',))
    for topic in ('a', 'a.z', 'a.b.c.z', 'b.z'):
        await broker.send(exchange, {'topic': topic}, topic=topic)
    lengths = [await broker.queue_length(q.name) for q in (tail, middle, one)]
    assert lengths == [3, 2, 1]


async def test_a_nats_dsn_without_nats_py_names_the_install_command(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    ours = ('nats.', 'microagent_mq.tools.nats')
    for name in [m for m in sys.modules if m == 'nats' or m.startswith(ours)]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'nats', None)  # what an install without the extra has
    with pytest.raises(ConfigurationError, match=r"pip install 'microagent-mq\[nats\]'"):
        broker_from_dsn('nats://127.0.0.1:4222')
    assert main(['length', 'mailer', '--broker', 'nats://127.0.0.1:4222']) == 1
    assert "pip install 'microagent-mq[nats]'" in capsys.readouterr().err


async def test_the_cli_sends_and_counts_on_nats(capsys: pytest.CaptureFixture[str]) -> None:
    require_server('nats')
    name = Queue(unique()).name
    try:
        assert await _cli(['send', name, '{"a": 1}', '--broker', NATS_DSN]) == 0
        assert await _cli(['length', name, '--broker', NATS_DSN]) == 0
        assert capsys.readouterr().out.strip().splitlines()[-1] == '1'
    finally:
        await delete_nats_streams('mq', name)


async def _cli(argv: list[str]) -> int:
    return await asyncio.to_thread(main, argv)  # the CLI runs its own event loop


async def test_consuming_goes_on_after_the_stream_is_deleted_behind_its_back(broker: Any) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})

    await start(broker, queue, handler)
    await broker.send(queue.name, {'n': 1})
    await calls.wait_for(1)
    js = await broker.jetstream()
    await js.delete_stream(f'{broker.prefix}-{queue.name}')  # the test's own stream
    await broker.send(queue.name, {'n': 2})  # declared again by the send...
    assert await calls.wait_for(2) == [{'n': 1}, {'n': 2}]  # ...and its consumer by the fetch


async def test_a_delayed_send_to_an_exchange_reaches_queues_not_yet_consumed(broker: Any) -> None:
    exchange = unique('ex')
    queues = [Queue(unique(), exchange), Queue(unique(), exchange, ('a.*',)),
              Queue(unique(), exchange, ('b',))]
    await broker.send(exchange, {'n': 1}, topic='a.x', delay=0.2)
    received: dict[str, Calls] = {q.name: Calls() for q in queues}
    for queue in queues:
        async def handler(_q: str = queue.name, **data: Any) -> None:
            received[_q].add(data)
        await start(broker, queue, handler)
    assert await received[queues[0].name].wait_for(1) == [{'n': 1}]
    assert await received[queues[1].name].wait_for(1) == [{'n': 1}]
    assert len(received[queues[2].name]) == 0


async def test_requeue_moves_the_letters_present_when_called_not_new_ones(broker: Any) -> None:
    queue, calls = Queue(unique()), Calls()

    async def handler(n: int) -> None:
        calls.add({'n': n})
        raise Reject('still down')  # every requeued letter comes straight back

    await broker.send(queue.name, {'n': 1})
    await start(broker, queue, handler)
    await wait_until(lambda: _dead_count(broker, queue.name, 1), what='a dead letter')
    for round_ in range(2, 5):
        assert await broker.requeue_dead_letters(queue.name) == 1  # not a livelock
        await calls.wait_for(round_)
        await wait_until(lambda: _dead_count(broker, queue.name, 1), what='the letter back')


async def test_free_records_do_not_outlive_the_consumer_that_counted_them(broker: Any) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': 1})
    first = await _subscription(broker, queue)
    taken = await _fetch(first, 1)
    await first.stop_fetching()
    await first.release(taken)  # one free record for this message...
    await first.close()
    js = await broker.jetstream()
    await js.delete_consumer(f'{broker.prefix}-{queue.name}', 'microagent_mq')  # ...now void
    second = await _subscription(broker, queue)
    try:
        [again] = await _fetch(second, 1)
        assert again.attempt == 1
        await second.retry_later(again, 0.01, 'failed')
        [retried] = await _fetch(second, 1)
        assert retried.attempt == 2  # a stale record would make this attempt 1 again
        await second.ack(retried)
    finally:
        await second.stop_fetching()
        await second.close()


async def test_a_fetch_that_fails_midway_keeps_what_it_had_taken(broker: Any) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': 1})
    subscription = await _subscription(broker, queue)
    try:
        [first] = await _fetch(subscription, 1)
        await subscription.retry_later(first, 0.01, 'failed')
        real, failures = subscription._free_counts, []

        async def failing_once() -> dict[str, int]:  # e.g. the connection dropped just then
            if not failures:
                failures.append(1)
                raise ConnectionError('dropped')
            return dict(await real())

        subscription._free_counts = failing_once
        with pytest.raises(ConnectionError):
            await _fetch(subscription, 1)
        [again] = await subscription.fetch(1)  # at once: not left to the visibility timeout
        assert (again.body, again.attempt) == (b'{"n":1}', 2)
        await subscription.ack(again)
    finally:
        await subscription.stop_fetching()
        await subscription.close()


async def test_an_unreachable_server_raises_within_the_send_timeout() -> None:
    from microagent_mq.tools.nats import NATSBroker

    Queue('mailer')
    broker = NATSBroker(f'nats://127.0.0.1:{free_port()}', connect_timeout=0.2, send_timeout=1)
    try:
        with pytest.raises(BrokerUnavailable, match=r'NATS at nats://127\.0\.0\.1'):
            await asyncio.wait_for(broker.mailer.send({'n': 1}), 20)
    finally:
        await broker.close()
