"""The NATS broker's own store-and-wait (``nats_publish``) and ack-subject reading (``nats_codec``)."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .conftest import NATS_DSN, require_server, unique

pytestmark = pytest.mark.nats


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    require_server('nats')
    import nats

    connection = await nats.connect(NATS_DSN)
    yield connection
    await connection.close()


@pytest.fixture
async def stream(client: Any) -> AsyncIterator[tuple[str, Any]]:
    """A stream of the test's own on subject ``<name>.q``: (its name, the JetStream context)."""
    from nats.js import api

    name = unique('np')
    js = client.jetstream()
    await js.add_stream(api.StreamConfig(name=name, subjects=[f'{name}.q']))
    yield name, js
    await js.delete_stream(name)


async def _stores(client: Any, ack_timeout_s: float = 5.0) -> Any:
    from microagent_mq.tools.nats_publish import Stores

    stores = Stores(client, ack_timeout_s)
    await stores.start()
    return stores


async def test_a_store_returns_once_the_stream_holds_the_message(
        client: Any, stream: tuple[str, Any]) -> None:
    name, js = stream
    stores = await _stores(client)
    await asyncio.gather(*(stores.store(f'{name}.q', b'{"n":%d}' % i, {'Nats-Msg-Id': f'id{i}'})
                           for i in range(3)))
    await stores.store(f'{name}.q', b'{"n":0}', {'Nats-Msg-Id': 'id0'})  # de-duplicated
    assert (await js.stream_info(name)).state.messages == 3
    assert stores._waiting == {}


async def test_a_store_refused_by_the_stream_raises_its_api_error(
        client: Any, stream: tuple[str, Any]) -> None:
    import nats.js.errors

    name, js = stream
    stores = await _stores(client)
    with pytest.raises(nats.js.errors.APIError) as refused:
        await stores.store(f'{name}.q', b'{}', {'Nats-Expected-Last-Sequence': '99'})
    assert refused.value.err_code == 10071  # wrong last sequence: what nats_bounded relies on
    assert (await js.stream_info(name)).state.messages == 0


async def test_a_store_to_a_subject_without_a_stream_raises_no_stream(client: Any) -> None:
    import nats.js.errors

    stores = await _stores(client)
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await stores.store(f'{unique("np")}.nostream', b'{}', {})
    assert stores._waiting == {}


async def test_a_store_nobody_acknowledges_times_out(client: Any) -> None:
    import nats.errors

    subject = f'{unique("np")}.silent'
    await client.subscribe(subject)  # someone listens, nobody answers: no 503 either
    stores = await _stores(client, ack_timeout_s=0.2)
    with pytest.raises(nats.errors.TimeoutError):
        await asyncio.wait_for(stores.store(subject, b'{}', {}), 5)
    assert stores._waiting == {}


async def test_a_batch_returns_once_the_stream_holds_every_message(
        client: Any, stream: tuple[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from microagent_mq.tools import nats_publish

    monkeypatch.setattr(nats_publish, 'BATCH_PENDING', 3)
    name, js = stream
    stores = await _stores(client)
    batch = stores.batch(5.0)
    most = 0
    for i in range(10):
        await batch.add(f'{name}.q', b'{"n":%d}' % i, {'Nats-Msg-Id': f'id{i}'})
        most = max(most, len(stores._waiting))
    await batch.wait()
    assert most == 3  # never more than BATCH_PENDING awaited at once
    assert (await js.stream_info(name)).state.messages == 10
    assert stores._waiting == {}


async def test_a_batch_with_a_refused_store_raises_its_error_after_the_others(
        client: Any, stream: tuple[str, Any]) -> None:
    import nats.js.errors

    name, js = stream
    stores = await _stores(client)
    batch = stores.batch(5.0)
    await batch.add(f'{name}.q', b'{"n":0}', {})
    await batch.add(f'{name}.q', b'{"n":1}', {'Nats-Expected-Last-Sequence': '99'})
    await batch.add(f'{name}.q', b'{"n":2}', {})
    with pytest.raises(nats.js.errors.APIError) as refused:
        await batch.wait()
    assert refused.value.err_code == 10071
    assert (await js.stream_info(name)).state.messages == 2
    assert stores._waiting == {}


async def test_a_batch_nobody_acknowledges_times_out_and_forgets_its_stores(client: Any) -> None:
    subject = f'{unique("np")}.silent'
    await client.subscribe(subject)
    stores = await _stores(client)
    batch = stores.batch(0.2)
    await batch.add(subject, b'{}', {})
    with pytest.raises(asyncio.TimeoutError):
        await batch.wait()
    assert stores._waiting == {}
    await batch.add(subject, b'{}', {})
    batch.forget()  # a batch given up on (retried whole) leaves nothing behind
    assert stores._waiting == {}
    await batch.settle()  # nothing left to wait for


async def test_a_batch_to_a_subject_without_a_stream_raises_no_stream(client: Any) -> None:
    import nats.js.errors

    stores = await _stores(client)
    batch = stores.batch(5.0)
    await batch.add(f'{unique("np")}.nostream', b'{}', {})
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await batch.wait()
    assert stores._waiting == {}


def test_delivery_of_reads_both_ack_subject_layouts() -> None:
    from nats.aio.msg import Msg

    from microagent_mq.tools.nats_codec import delivery_of

    plain = '$JS.ACK.mq-q.microagent_mq.3.41.57.1700000000000000000.9'
    with_domain = '$JS.ACK.hub.ACCHASH.mq-q.microagent_mq.3.41.57.1700000000000000000.9.rand'
    for reply in (plain, with_domain):
        meta = Msg.Metadata._from_reply(reply)  # what nats-py reads: the same numbers
        assert delivery_of(reply) == (meta.num_delivered, meta.sequence.stream) == (3, 41)
