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


def test_declarations_carry_every_option(tmp_path: Path) -> None:
    queues = load_queues(write(tmp_path, '{"queues": [{"name": "audit", "retention": "15m"},'
                                         ' {"name": "jobs", "max_priority": 3, "max_length": 100,'
                                         ' "overflow": "drop_oldest"}, {"name": "plain"}]}'))
    assert queues.audit == Queue('audit', retention=900)
    assert queues.jobs.max_priority == 3
    assert (queues.jobs.max_length, queues.jobs.overflow) == (100, 'drop_oldest')
    assert (queues.plain.retention, queues.plain.max_priority, queues.plain.max_length,
            queues.plain.overflow) == (0.0, 0, 0, 'reject')


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
