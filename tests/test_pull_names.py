"""Queue names from other systems (``bioconnect-id-service``): accepted, reachable, routed."""

from pathlib import Path

import pytest

from microagent_mq import ConfigurationError, Queue, QueueSourceError, load_queues
from microagent_mq.broker import AbstractQueueBroker
from microagent_mq.queue import identifier

from .conftest import unique


@pytest.mark.parametrize('name', ['bioconnect-id-service', 'a.b-c_d', '9lives', 'x-1.y'])
def test_names_of_other_systems_are_accepted(name: str) -> None:
    assert Queue(name).name == name


@pytest.mark.parametrize('name', ['Bio', 'a b', 'a--b', 'a.', '-a', 'a..b', '', 'orders.dlq'])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigurationError, match='invalid queue name'):
        Queue(name)


def test_load_queues_exposes_the_identifier_form(tmp_path: Path) -> None:
    path = tmp_path / 'queues.json'
    path.write_text('{"queues": [{"name": "bioconnect-id-service"}, {"name": "mailer"}]}')
    queues = load_queues(str(path))
    assert queues.bioconnect_id_service.name == 'bioconnect-id-service'  # type: ignore[attr-defined]
    assert queues.mailer.name == 'mailer'  # type: ignore[attr-defined]
    assert identifier('a.b-c') == 'a_b_c'


def test_load_queues_refuses_two_names_for_one_attribute(tmp_path: Path) -> None:
    path = tmp_path / 'queues.json'
    path.write_text('{"queues": [{"name": "id-service"}, {"name": "id.service"}]}')
    with pytest.raises(QueueSourceError, match=r"'id-service' and 'id\.service' both map to the attribute"):
        load_queues(str(path))


async def test_hyphenated_names_route_on_every_broker(broker: AbstractQueueBroker) -> None:
    base = unique('bio').replace('_', '-')
    queue = Queue(f'{base}-id.service')
    fanned = Queue(f'{base}-audit', exchange=f'{base}-events', topics=('sample.*',))
    await broker.queue(queue.name).send({'n': 1})
    await broker.send(fanned.exchange, {'n': 2}, topic='sample.created')
    await broker.send(fanned.exchange, {'n': 3}, topic='other.created')
    [direct] = await broker.queue(queue.name).receive(wait=5)
    [routed] = await broker.queue(fanned.name).receive(wait=5)
    assert (direct.data, routed.data) == ({'n': 1}, {'n': 2})
    await direct.ack()
    await routed.ack()
    assert await broker.queue(fanned.name).receive(wait=0.3) == []
    assert await broker.queue(queue.name).length() == 0
