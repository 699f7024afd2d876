"""Queue options of issue 13 (retention, max_priority, max_length, overflow): declarations,
and the checks every broker makes before anything reaches a transport."""

from datetime import datetime
from pathlib import Path

import pytest

from microagent_mq import ConfigurationError, Queue, QueueException, QueueSourceError, load_queues
from microagent_mq.testing import NullBroker


def write(tmp_path: Path, content: str) -> str:
    path = tmp_path / 'queues.json'
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize(('given', 'seconds'), [
    (0, 0.0), (2, 2.0), (2.5, 2.5), ('90s', 90.0), ('15m', 900.0), ('12h', 43200.0),
    ('7d', 604800.0), ('30', 30.0), (' 1.5m ', 90.0),
])
def test_retention_takes_seconds_or_a_duration(given: float | str, seconds: float) -> None:
    queue = Queue('kept', retention=given)
    assert queue.retention == seconds
    assert queue.retention_s == seconds


@pytest.mark.parametrize('given', [-1, '7w', 'd', '', True, None, '400d', float('nan'), [1]])
def test_a_bad_retention_is_refused(given: object) -> None:
    with pytest.raises(ConfigurationError, match="queue 'kept': invalid retention"):
        Queue('kept', retention=given)  # type: ignore[arg-type]


@pytest.mark.parametrize(('option', 'value', 'message'), [
    ('max_priority', 10, 'invalid max_priority 10: an integer from 1 to 9'),
    ('max_priority', -1, 'invalid max_priority'),
    ('max_priority', 2.0, 'invalid max_priority'),
    ('max_priority', True, 'invalid max_priority'),
    ('max_length', -5, 'invalid max_length -5'),
    ('max_length', '10', 'invalid max_length'),
    ('overflow', 'drop_newest', "unknown overflow 'drop_newest': expected 'reject' or 'drop_oldest'"),
])
def test_bad_options_are_refused_with_one_line(option: str, value: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Queue('q', **{option: value})  # type: ignore[arg-type]


def test_drop_oldest_and_priorities_do_not_mix() -> None:
    with pytest.raises(ConfigurationError, match="'drop_oldest' cannot be combined with max_priority"):
        Queue('q', max_priority=2, max_length=5, overflow='drop_oldest')


@pytest.mark.parametrize(('spec', 'message'), [
    ('{"name": "a", "retention": "soon"}', r"queues\[0\]: queue 'a': invalid retention 'soon'"),
    ('{"name": "a", "max_priority": 12}', r"queues\[0\]: queue 'a': invalid max_priority 12"),
    ('{"name": "a", "overflow": "spill"}', r"queues\[0\]: queue 'a': unknown overflow 'spill'"),
    ('{"name": "a", "max_lenght": 3}', r"unknown keys \['max_lenght'\]"),
])
def test_the_loader_names_the_bad_entry(tmp_path: Path, spec: str, message: str) -> None:
    with pytest.raises(QueueSourceError, match=message):
        load_queues(write(tmp_path, f'{{"queues": [{spec}]}}'))


def test_declaring_a_queue_again_with_other_options_is_a_conflict() -> None:
    Queue('jobs', max_priority=3)
    Queue('jobs', max_priority=3)  # the same: harmless
    with pytest.raises(QueueException, match="queue 'jobs' is already declared"):
        Queue('jobs', max_priority=5)
    Queue('kept', retention='1m')
    Queue('kept', retention=60)  # the same retention, said another way
    with pytest.raises(QueueException, match="queue 'kept' is already declared"):
        Queue('kept', retention='2m')


async def test_priority_is_checked_at_the_sender() -> None:
    Queue('jobs', max_priority=3)
    Queue('plain')
    Queue('fast', exchange='work', max_priority=5)
    Queue('slow', exchange='work')
    broker = NullBroker()
    await broker.send('jobs', {'n': 1}, priority=3)
    await broker.send('jobs', {'n': 2}, priority=0)
    for bad in (4, -1, 1.5, True, '2'):
        with pytest.raises(ConfigurationError, match='invalid priority'):
            await broker.send('jobs', {'n': 3}, priority=bad)
    with pytest.raises(ConfigurationError, match="queue 'plain' has no priorities"):
        await broker.send('plain', {'n': 4}, priority=0)
    # an exchange: every queue that takes the message must take priorities
    with pytest.raises(ConfigurationError, match="queue 'slow' has no priorities"):
        await broker.send('work', {'n': 5}, priority=1)
    assert [p.data['n'] for p in broker.published] == [1, 2]


async def test_history_and_replay_need_a_retaining_queue() -> None:
    Queue('plain')
    Queue('kept', retention=60)
    broker = NullBroker()
    with pytest.raises(QueueException, match="queue 'plain' keeps no history: declare it with retention"):
        await broker.replay('plain')
    with pytest.raises(QueueException, match="queue 'plain' keeps no history"):
        await broker.history('plain')
    with pytest.raises(ConfigurationError, match='invalid limit 0'):
        await broker.history('kept', limit=0)
    with pytest.raises(ConfigurationError, match="invalid since 'yesterday': an ISO 8601 time"):
        await broker.replay('kept', since='yesterday')
    with pytest.raises(ConfigurationError, match='invalid until'):
        await broker.replay('kept', until=[2026])


def test_the_time_window_takes_datetimes_epochs_and_iso_strings() -> None:
    from microagent_mq.replay import epoch

    moment = datetime(2026, 11, 27, 10, 0)
    assert epoch(moment, 'since') == moment.timestamp()
    assert epoch('2026-11-27T10:00', 'since') == moment.timestamp()
    assert epoch(1700000000, 'since') == 1700000000.0
    assert epoch(None, 'since') is None


async def test_the_null_broker_records_the_priority() -> None:
    Queue('jobs', max_priority=3)
    broker = NullBroker()
    await broker.send('jobs', {'n': 1}, priority=2)
    await broker.send('jobs', {'n': 2})
    assert [(p.data['n'], p.priority) for p in broker.published] == [(1, 2), (2, 0)]


async def test_the_test_broker_keeps_priorities_bounds_and_history() -> None:
    from microagent_mq import MicroAgent, QueueFull, consumer
    from microagent_mq.testing import TestBroker

    jobs = Queue('jobs', max_priority=2, max_length=4, retention='1h')
    seen: list[int] = []

    class Agent(MicroAgent):
        @consumer(jobs)
        async def handle(self, n: int) -> None:
            seen.append(n)

    broker = TestBroker()
    await Agent(broker=broker).start()
    for n, priority in ((1, 0), (2, 2), (3, 1), (4, 2)):
        await broker.send('jobs', {'n': n}, priority=priority)
    with pytest.raises(QueueFull):
        await broker.send('jobs', {'n': 5})
    await broker.process_messages()
    assert seen == [2, 4, 3, 1]
    assert [e.data['n'] for e in await broker.history('jobs')] == [1, 2, 3, 4]
    assert await broker.replay('jobs', since=0) == 4
    await broker.process_messages()
    assert seen == [2, 4, 3, 1, 2, 4, 3, 1]  # replayed with their priorities
    await broker.close()


@pytest.mark.parametrize('kind', ['memory', 'test'])
async def test_drop_oldest_without_max_length_drops_nothing(kind: str) -> None:
    # overflow applies to a bound (RabbitMQ's x-overflow needs x-max-length): without one,
    # the in-process queues used to drop every message as soon as it was stored.
    from microagent_mq.testing import TestBroker
    from microagent_mq.tools.memory import MemoryBroker

    Queue('unbounded', overflow='drop_oldest')
    broker = MemoryBroker('memory://unbounded') if kind == 'memory' else TestBroker()
    await broker.send('unbounded', {'n': 1})
    await broker.send_many('unbounded', [{'n': 2}, {'n': 3}])
    assert await broker.queue_length('unbounded') == 3
    await broker.close()


@pytest.mark.parametrize('kind', ['memory', 'test'])
async def test_a_bounded_queue_counts_every_send_path(kind: str) -> None:
    # A send of one message takes a shorter path on a plain queue: a bounded queue must not.
    from microagent_mq import QueueFull
    from microagent_mq.testing import TestBroker
    from microagent_mq.tools.memory import MemoryBroker

    Queue('bounded', max_length=2)
    Queue('plain')
    broker = MemoryBroker('memory://bounded') if kind == 'memory' else TestBroker()
    await broker.send('plain', {'n': 0})
    await broker.send('bounded', {'n': 1})
    await broker.send('bounded', {'n': 2})
    with pytest.raises(QueueFull):
        await broker.send('bounded', {'n': 3})
    with pytest.raises(QueueFull):
        await broker.send_many('bounded', [{'n': 4}])
    assert await broker.queue_length('bounded') == 2
    assert await broker.queue_length('plain') == 1
    await broker.close()
