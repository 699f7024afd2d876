"""The admin primitives on the testing kit: TestBroker counts and repairs like a real broker."""

from microagent_mq import MicroAgent, Queue, Reject, consumer
from microagent_mq.testing import NullBroker, TestBroker
from microagent_mq.transport import QueueStats

from .conftest import unique


async def test_test_broker_stats_purge_and_requeue_by_id() -> None:
    broker, queue = TestBroker(), Queue(unique())

    class Rejecting(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            if n < 3:
                raise Reject('small')

    agent = Rejecting(broker=broker)
    await agent.start()
    await broker.send_many(queue.name, [{'n': 1}, {'n': 2}])
    await broker.process_messages()
    await broker.send(queue.name, {'n': 5}, delay=30)
    assert await broker.queue_stats(queue.name) == QueueStats(queue.name, 0, 1, 0, 2)
    first = (await broker.dead_letters(queue.name))[0]
    assert await broker.requeue_dead_letters(queue.name, [first.message_id]) == 1
    assert await broker.queue_stats(queue.name) == QueueStats(queue.name, 1, 1, 0, 1)
    assert await broker.purge(queue.name) == 2
    assert await broker.purge_dead_letters(queue.name) == 1
    assert await broker.queue_stats(queue.name) == QueueStats(queue.name, 0, 0, 0, 0)
    await agent.stop()


async def test_null_broker_has_nothing_to_count_or_repair() -> None:
    broker, queue = NullBroker(), Queue(unique())
    await broker.send(queue.name, {'n': 1})
    assert await broker.queue_stats(queue.name) == QueueStats(queue.name, 0, 0, 0, 0)
    assert await broker.purge(queue.name) == 0
    assert await broker.requeue_dead_letters(queue.name, ['x']) == 0
    assert len(broker.published) == 1
