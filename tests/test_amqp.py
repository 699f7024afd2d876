"""RabbitMQ specifics: declarations, failures of the server."""

import time

import pytest

from microagent_mq import BrokerUnavailable, Queue
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.tools.amqp import AMQPBroker

from .conftest import (
    delete_amqp_queues,
    free_port,
    unique,
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




async def test_send_to_a_queue_deleted_behind_our_back_declares_it_again(
        broker: AbstractQueueBroker) -> None:
    queue = Queue(unique())
    await broker.send(queue.name, {'n': 1})
    await delete_amqp_queues([queue.name], [])  # the broker still thinks it is declared
    await broker.send(queue.name, {'n': 2})
    assert await broker.queue_length(queue.name) == 1
