"""The outbox against real PostgreSQL and SQLite: rollback sends nothing, commit sends once."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from microagent_mq import BrokerUnavailable, ConfigurationError, MicroAgent, Queue, consumer
from microagent_mq.exceptions import QueueNotFound
from microagent_mq.outbox import (
    Outbox,
    OutboxError,
    OutboxRelay,
    OutboxTableMissing,
    register_event,
    set_default_outbox,
    transactional,
)
from microagent_mq.outbox.relay import SENT

from .conftest import Calls, unique, wait_until
from .outbox_support import RecordingBroker, db_url


@pytest.fixture(params=['sqlite', 'postgres'])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    made = create_async_engine(db_url(request.param, tmp_path))
    yield made
    await made.dispose()


@pytest.fixture
async def outbox(engine: AsyncEngine) -> AsyncIterator[Outbox]:
    box = Outbox(engine, table=unique('mq_outbox'))
    await box.create()
    yield box
    await box.drop()
    set_default_outbox(None)


@pytest.fixture
async def broker() -> AsyncIterator[RecordingBroker]:
    made = RecordingBroker(f'memory://{unique("ns")}')
    yield made
    await made.close(grace=1)


async def test_rollback_sends_nothing_commit_sends_once(outbox: Outbox, broker: RecordingBroker) -> None:
    Queue('orders')
    relay = OutboxRelay(outbox, broker)
    with pytest.raises(RuntimeError):
        async with AsyncSession(outbox.engine) as session, session.begin():
            await outbox.add(session, 'orders', {'n': 0})
            raise RuntimeError('the business step failed')
    ids = []
    async with AsyncSession(outbox.engine) as session, session.begin():
        for n in (1, 2, 3):
            ids.append(await outbox.add(session, 'orders', {'n': n}))
    assert await relay.run_once() == 3
    assert await relay.run_once() == 0  # marked sent: a second pass publishes nothing
    assert broker.published == ids  # once each, in commit order, with the rows' own ids
    assert await broker.queue_length('orders') == 3
    assert (await outbox.pending(), await outbox.sent()) == (0, 3)


async def test_delivered_with_the_rows_stable_id(outbox: Outbox, broker: RecordingBroker) -> None:
    queue = Queue(unique('q'))
    calls = Calls()

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            calls.add({'n': n})

    async with AsyncSession(outbox.engine) as session, session.begin():
        mid = await outbox.add(session, queue.name, {'n': 7}, message_id='order-7-created')
    assert mid == 'order-7-created'
    await OutboxRelay(outbox, broker).run_once()
    agent = Agent(broker=broker)
    await agent.start()
    assert await calls.wait_for(1) == [{'n': 7}]
    await agent.stop()
    assert broker.published == ['order-7-created']


async def test_undeclared_queue_is_marked_failed_not_retried(outbox: Outbox, broker: RecordingBroker) -> None:
    Queue('gone')
    Queue('kept')
    async with AsyncSession(outbox.engine) as session, session.begin():
        await outbox.add(session, 'gone', {'n': 1})
        await outbox.add(session, 'kept', {'n': 2})
    Queue.reset()  # the relay's process does not declare 'gone'
    Queue('kept')
    relay = OutboxRelay(outbox, broker)
    assert await relay.run_once() == 2
    failed = await outbox.failed()
    assert [(f.queue, f.body) for f in failed] == [('gone', b'{"n":1}')]
    assert 'QueueNotFound' in failed[0].error
    assert await broker.queue_length('kept') == 1
    assert await relay.run_once() == 0


async def test_broker_outage_leaves_rows_pending_then_publishes(outbox: Outbox,
                                                               broker: RecordingBroker) -> None:
    Queue('q1')
    async with AsyncSession(outbox.engine) as session, session.begin():
        ids = [await outbox.add(session, 'q1', {'n': n}) for n in range(5)]
    broker.refuse = BrokerUnavailable('down')
    relay = OutboxRelay(outbox, broker)
    with pytest.raises(BrokerUnavailable):
        await relay.run_once()
    assert await outbox.pending() == 5
    broker.refuse = None
    assert await relay.run_once() == 5
    assert broker.published == ids


async def test_send_options_travel_with_the_row(outbox: Outbox, broker: RecordingBroker) -> None:
    Queue('news', exchange='events', topics=['news.*'])
    Queue('other', exchange='events', topics=['other.*'])
    async with AsyncSession(outbox.engine) as session, session.begin():
        await outbox.add(session, 'events', {'n': 1}, topic='news.today')
    await OutboxRelay(outbox, broker).run_once()
    assert (await broker.queue_length('news'), await broker.queue_length('other')) == (1, 0)


async def test_add_validates_as_send_does(outbox: Outbox) -> None:
    Queue('q1')
    async with AsyncSession(outbox.engine) as session, session.begin():
        with pytest.raises(QueueNotFound):
            await outbox.add(session, 'nope', {'n': 1})
        with pytest.raises(ConfigurationError, match='unknown send options'):
            await outbox.add(session, 'q1', {'n': 1}, colour='red')
        with pytest.raises(ConfigurationError, match='invalid delay'):
            await outbox.add(session, 'q1', {'n': 1}, delay=-1)
        with pytest.raises(ConfigurationError, match='message_id'):
            await outbox.add(session, 'q1', {'n': 1}, message_id='x' * 201)
    assert await outbox.pending() == 0


async def test_clear_errors(outbox: Outbox, tmp_path: Path) -> None:
    Queue('q1')
    with pytest.raises(ConfigurationError, match='AsyncEngine'):
        Outbox(create_engine(f'sqlite:///{tmp_path}/sync.db'))  # type: ignore[arg-type]
    async with AsyncSession(outbox.engine) as session:
        with pytest.raises(OutboxError, match='outside a transaction'):
            await outbox.add(session, 'q1', {'n': 1})
    missing = Outbox(outbox.engine, table=unique('mq_missing'))
    async with AsyncSession(outbox.engine) as session, session.begin():
        with pytest.raises(OutboxTableMissing, match='does not exist'):
            await missing.add(session, 'q1', {'n': 1})
    with pytest.raises(OutboxTableMissing, match=r'outbox\.create\(\)'):
        await OutboxRelay(missing, RecordingBroker('memory://x')).start()


async def test_transactional_and_register_event(outbox: Outbox, broker: RecordingBroker) -> None:
    Queue('user_registered')
    set_default_outbox(outbox)

    @transactional
    async def create_user(session: AsyncSession, email: str, fail: bool = False) -> str:
        await session.execute(sa.select(1))  # the user's own writes would go here
        register_event('user_registered', {'email': email})
        if fail:
            raise ValueError('duplicate email')
        return email

    assert await create_user(AsyncSession(outbox.engine), 'a@example.com') == 'a@example.com'
    with pytest.raises(ValueError):
        await create_user(AsyncSession(outbox.engine), 'b@example.com', fail=True)
    with pytest.raises(OutboxError, match='outside a @transactional'):
        register_event('user_registered', {'email': 'c@example.com'})
    with pytest.raises(QueueNotFound):  # validated when registered, not at commit
        await transactional(outbox=outbox)(_register_unknown)(AsyncSession(outbox.engine))
    assert await OutboxRelay(outbox, broker).run_once() == 1
    assert await broker.queue_length('user_registered') == 1


async def _register_unknown(session: AsyncSession) -> None:
    register_event('no_such_queue', {'x': 1})


async def test_relay_task_publishes_commits_and_stops(outbox: Outbox, broker: RecordingBroker) -> None:
    Queue('q1')
    relay = OutboxRelay(outbox, broker, poll_interval=0.05)
    await relay.start()
    try:
        async with AsyncSession(outbox.engine) as session, session.begin():
            ids = [await outbox.add(session, 'q1', {'n': n}) for n in range(3)]
        await wait_until(lambda: len(broker.published) == 3, what='the relay to publish')
    finally:
        await relay.stop()
    assert broker.published == ids
    async with outbox.engine.connect() as conn:
        statuses = (await conn.execute(sa.select(outbox.table.c.status))).scalars().all()
    assert statuses == [SENT] * 3


async def test_sent_rows_are_deleted_after_keep(outbox: Outbox, broker: RecordingBroker) -> None:
    Queue('q1')
    async with AsyncSession(outbox.engine) as session, session.begin():
        await outbox.add(session, 'q1', {'n': 1})
    await OutboxRelay(outbox, broker, keep=3600).run_once()
    assert await outbox.sent() == 1  # kept: younger than an hour
    await OutboxRelay(outbox, broker, keep=0).run_once()
    assert await outbox.sent() == 0
    assert broker.published and len(broker.published) == 1





async def test_relay_options_are_checked(outbox: Outbox, broker: RecordingBroker) -> None:
    with pytest.raises(ConfigurationError, match='poll_interval'):
        OutboxRelay(outbox, broker, poll_interval=-1)
    with pytest.raises(ConfigurationError, match='batch_size'):
        OutboxRelay(outbox, broker, batch_size=0)


async def test_transactional_joins_the_callers_transaction(outbox: Outbox) -> None:
    Queue('q1')

    @transactional(outbox=outbox)
    async def step(session: AsyncSession) -> None:
        register_event('q1', {'n': 1})

    with pytest.raises(RuntimeError):
        async with AsyncSession(outbox.engine) as session, session.begin():
            await step(session)
            raise RuntimeError('the caller rolls back')
    assert await outbox.pending() == 0
    async with AsyncSession(outbox.engine) as session, session.begin():
        await step(session)
    assert await outbox.pending() == 1


@pytest.mark.parametrize('engine', ['postgres'], indirect=True)
async def test_notify_wakes_the_relay_even_after_its_listen_connection_died(
        outbox: Outbox, broker: RecordingBroker) -> None:
    Queue('q1')
    relay = OutboxRelay(outbox, broker, poll_interval=300)  # only a NOTIFY can wake it in time
    await relay.start()
    try:
        for n in range(2):
            async with AsyncSession(outbox.engine) as session, session.begin():
                await outbox.add(session, 'q1', {'n': n})
            # Marked sent: the pass is over and the relay is asleep again (only a wake-up helps).
            await wait_until(lambda n=n: _sent_is(outbox, n + 1), what=f'message {n} published')
            listening = relay._pg
            await listening.close()  # the fault: the relay's own LISTEN connection is gone
            await wait_until(lambda listening=listening: relay._pg is not None and relay._pg is not listening,
                             what='the relay to listen again')
    finally:
        await relay.stop()


async def _sent_is(outbox: Outbox, count: int) -> bool:
    return await outbox.sent() == count
