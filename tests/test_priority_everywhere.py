"""``priority=`` reaches the broker from every way of publishing: a typed message's own
``publish``, the module-level ``publish``/``publish_many``, an outbox row of a typed message,
and an exchange no queue of this process is bound to (checked for its range only)."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from microagent_mq import ConfigurationError, Message, Queue, publish, publish_many
from microagent_mq.default_broker import override_broker
from microagent_mq.outbox import Outbox, OutboxRelay
from microagent_mq.testing import NullBroker

from .conftest import unique
from .outbox_support import RecordingBroker, db_url


def job_class(max_priority: int) -> tuple[Any, str]:
    """A typed task class, and its queue (of its own, declared with ``max_priority``)."""
    name = unique()
    Queue(name, max_priority=max_priority)

    @dataclass(frozen=True)
    class Job(Message, queue=name):
        n: int

    return Job, name


@pytest.fixture
async def null() -> AsyncIterator[NullBroker]:
    broker = NullBroker('null://')
    async with override_broker(broker):
        yield broker


async def test_typed_publish_carries_its_priority(null: NullBroker) -> None:
    Job, name = job_class(max_priority=5)
    await Job(1).publish(priority=4)
    await publish(Job(2), priority=3)
    await publish_many([Job(3), Job(4)], priority=2)
    await publish(Job(5))
    assert [(p.data['n'], p.priority) for p in null.published_to(name)] == [
        (1, 4), (2, 3), (3, 2), (4, 2), (5, 0)]
    with pytest.raises(ConfigurationError, match='invalid priority 6'):
        await Job(6).publish(priority=6)


async def test_an_unbound_exchange_takes_a_priority_in_range(null: NullBroker) -> None:
    exchange = unique('ev')

    @dataclass(frozen=True)
    class Happened(Message, exchange=exchange, topic='a.b'):
        n: int

    await null.publish(Happened(1), priority=9)  # RabbitMQ routes it by its own bindings
    assert [p.priority for p in null.published if p.queue == exchange] == [9]
    with pytest.raises(ConfigurationError, match='invalid priority 10'):
        await null.publish(Happened(2), priority=10)
    with pytest.raises(ConfigurationError, match='invalid priority -1'):
        await null.publish(Happened(3), priority=-1)


async def test_a_typed_outbox_row_keeps_its_priority(tmp_path: Path) -> None:
    Job, name = job_class(max_priority=3)
    engine = create_async_engine(db_url('sqlite', tmp_path))
    outbox = Outbox(engine, table=unique('mq_outbox'))
    broker = RecordingBroker(f'memory://{unique("ns")}')
    try:
        await outbox.create()
        async with AsyncSession(engine) as session, session.begin():
            await outbox.add(session, Job(1))
            await outbox.add(session, Job(2), priority=3)
        await OutboxRelay(outbox, broker).run_once()  # relayed in their order: 1, then 2
        got = await broker.receive(name, max_count=2)
        assert [m.data['n'] for m in got] == [2, 1]  # the higher priority first
        for message in got:
            await message.ack()
    finally:
        await broker.close(grace=1)
        await engine.dispose()
