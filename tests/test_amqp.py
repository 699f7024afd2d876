"""RabbitMQ specifics: declarations, failures of the server."""

import asyncio
import time

import pytest

from microagent_mq import BrokerUnavailable, MicroAgent, Queue, consumer
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.tools.amqp import AMQPBroker

from .conftest import (
    AMQP_DSN,
    Calls,
    delete_amqp_queues,
    free_port,
    rabbitmqctl,
    require_server,
    unique,
    wait_until,
)


@pytest.fixture
def broker_kind() -> str:
    """conftest's ``broker`` fixture, on RabbitMQ only: it closes and deletes what was declared."""
    return 'amqp'


async def test_unreachable_rabbitmq_raises_within_bounded_time() -> None:
    Queue('mailer')
    broker = AMQPBroker(f'amqp://guest:s3cret@127.0.0.1:{free_port()}/', connect_timeout=1,
                        send_timeout=1)
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        await broker.mailer.send({'a': 1})
    assert 's3cret' not in str(raised.value)
    assert time.monotonic() - started < 10
    await broker.close()


async def test_queue_length_does_not_create_queues(broker: AbstractQueueBroker) -> None:
    queue = Queue(unique())
    assert await broker.queue_length(queue.name) == 0
    assert await broker.queue_length(queue.name) == 0  # the channel survived the miss
    await broker.send(queue.name, {'n': 1})
    assert await broker.queue_length(queue.name) == 1


@pytest.mark.timeout(180)
async def test_consumers_and_senders_survive_a_rabbitmq_restart() -> None:
    require_server('amqp')
    queue, calls = Queue(unique()), Calls()

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})

    consuming, sending = AMQPBroker(AMQP_DSN), AMQPBroker(AMQP_DSN, send_timeout=60)
    agent = Agent(broker=consuming)
    await agent.start()
    try:
        await sending.send(queue.name, {'n': 1})
        await calls.wait_for(1)
        try:
            await asyncio.to_thread(rabbitmqctl, 'stop_app')
            restarting = asyncio.create_task(asyncio.to_thread(rabbitmqctl, 'start_app'))
            for n in range(2, 6):  # sent while RabbitMQ comes back: retried, then confirmed
                await sending.send(queue.name, {'n': n})
            await restarting
        finally:
            await asyncio.to_thread(rabbitmqctl, 'start_app')  # never leave it stopped
        await wait_until(lambda: {c['n'] for c in calls.items} == {1, 2, 3, 4, 5},
                         timeout_s=60, what='messages after the restart')
    finally:
        await agent.stop(grace=1)
        await sending.close()
        await delete_amqp_queues([queue.name], [])


async def test_send_to_a_queue_deleted_behind_our_back_declares_it_again(
        broker: AbstractQueueBroker) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': 1})
    await delete_amqp_queues([queue.name], [])  # the broker still thinks it is declared
    await broker.send(queue.name, {'n': 2})
    assert await broker.queue_length(queue.name) == 1
