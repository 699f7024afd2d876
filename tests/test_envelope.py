"""BioConnect's envelope: the seed's examples (seeds/000) run as written, save the import path."""

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Iterator
from enum import StrEnum
from typing import Any

import pytest

from microagent_mq import Queue, override_broker
from microagent_mq import envelope as envelope_module
from microagent_mq.envelope import (
    Envelope,
    EnvelopeError,
    areceive_message,
    asend_message,
    receive_message,
    send_message,
)
from microagent_mq.sync import SyncBroker, connect
from microagent_mq.tools.memory import MemoryBroker

from .conftest import unique

logger = logging.getLogger('bioconnect')


class QueueName(StrEnum):  # BioConnect's constants (bioconnect_lib.mq.message_queue.QueueName)
    L7 = 'l7'
    BIOCONNECT_ID_SERVICE = 'bioconnect-id-service'
    BIOCONNECT_DATA_PACKAGE = 'bioconnect-data-package'


@pytest.fixture
def mq_broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[SyncBroker]:
    """The seed's examples pass no broker: MQ_BROKER names it."""
    dsn = f'memory://{unique()}'
    monkeypatch.setenv('MQ_BROKER', dsn)
    sync = connect(dsn)  # the same memory namespace, to look at what the examples did
    yield sync
    sync.close()
    for made in envelope_module._from_env.values():
        made.close()
    envelope_module._from_env.clear()


def test_seed_send_example(mq_broker: SyncBroker) -> None:
    # --- as in the seed, from here (the import path aside) ---
    try:
        title = "Message Title"
        message_type = "Message Type"
        send_from = f'{QueueName.L7}'
        send_to = f'{QueueName.BIOCONNECT_ID_SERVICE}'
        env = "DEV"
        comments = "comments"

        data = {
            "sample_id": 111111,
            "sample_name": "a sample name",
            "project_id": "a project"
        }

        response = send_message(
                title=title,
                message_type=message_type,
                send_from=send_from,
                send_to=send_to,
                env=env,
                comments=comments,
                data=data)
        logger.info(f'response: {response}')
    except Exception:
        logger.error("Failed to send message", exc_info=True)
    # --- to here ---
    assert response['send_to'] == 'bioconnect-id-service' and response['create_time'] > 0
    [received] = mq_broker.receive('bioconnect-id-service', wait=5)
    assert received.data == response
    assert set(response) == {'title', 'message_type', 'send_from', 'send_to', 'create_time', 'env',
                             'comments', 'data', 'original_message'}


def _send(n: int, to: str = 'bioconnect-data-package') -> dict[str, Any]:
    return send_message(title=f't{n}', message_type='Message Type', send_from='l7', send_to=to,
                        data={'n': n})


def test_seed_receive_list_example(mq_broker: SyncBroker, capsys: pytest.CaptureFixture[str]) -> None:
    sent = [_send(n) for n in range(3)]
    # --- as in the seed ---
    try:
        queue_name = f'{QueueName.BIOCONNECT_DATA_PACKAGE}'
        max_wait_time = 1   # max wait time in seconds, 0 means forever
        message_list = receive_message(queue_name=queue_name,
                       max_wait_time=max_wait_time)
        for m in message_list:
            print(f'{m}')
    except Exception:
        logger.error("Failed to receive messages", exc_info=True)
    # ---
    assert message_list == sent
    assert capsys.readouterr().out.count("'title'") == 3
    assert mq_broker.length('bioconnect-data-package') == 0  # acknowledged
    assert mq_broker.receive('bioconnect-data-package', wait=0.2) == []


def test_seed_callback_example(mq_broker: SyncBroker, capsys: pytest.CaptureFixture[str]) -> None:
    sent = [_send(n, 'bioconnect-id-service') for n in range(2)]
    # --- as in the seed ---
    try:
        def my_call_back(message):  # type: ignore[no-untyped-def]
            print(f'call back: {message}')

        queue_name = f'{QueueName.BIOCONNECT_ID_SERVICE}'
        max_wait_time = 1   # max wait time in seconds
        receive_message(queue_name=queue_name,
                        call_back_function=my_call_back,
                        max_wait_time=max_wait_time)
    except Exception:
        logger.error("Failed to receive messages", exc_info=True)
    # ---
    out = capsys.readouterr().out
    assert [line.startswith('call back: ') for line in out.splitlines()] == [True, True]
    assert all(repr(m) in out for m in sent)
    assert mq_broker.receive('bioconnect-id-service', wait=0.2) == []


def test_a_callback_that_raises_gets_the_message_again(mq_broker: SyncBroker) -> None:
    sent = _send(1, 'bioconnect-id-service')
    calls: list[dict[str, Any]] = []

    def flaky(message: dict[str, Any]) -> None:
        calls.append(message)
        if len(calls) == 1:
            raise RuntimeError('not yet')

    # the retry's backoff is the default 1 s: max_wait_time covers it
    receive_message('bioconnect-id-service', max_wait_time=3, call_back_function=flaky)
    assert calls == [sent, sent]
    assert mq_broker.receive('bioconnect-id-service', wait=0.2) == []


def test_wait_forever_stops_cleanly_on_sigterm(mq_broker: SyncBroker) -> None:
    _send(1, 'bioconnect-id-service')
    seen: list[dict[str, Any]] = []

    def stop_after_first(message: dict[str, Any]) -> None:
        seen.append(message)
        # as a supervisor would: the loop ends after this message, acknowledged
        threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()

    receive_message('bioconnect-id-service', max_wait_time=0, call_back_function=stop_after_first)
    assert len(seen) == 1
    assert mq_broker.receive('bioconnect-id-service', wait=0.2) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_a_body_that_is_no_envelope_is_dead_lettered(mq_broker: SyncBroker) -> None:
    Queue('bioconnect-id-service')
    mq_broker.send('bioconnect-id-service', {'hello': 1})
    assert receive_message('bioconnect-id-service', max_wait_time=1) == []
    [letter] = mq_broker.dead_letters('bioconnect-id-service')
    assert 'not a BioConnect envelope' in letter.error and "'title'" in letter.error


def test_validation_names_the_field() -> None:
    with pytest.raises(EnvelopeError, match="'send_to' is required"):
        send_message(title='t', message_type='m', send_from='l7', send_to='',
                     broker=MemoryBroker('memory://none'))
    with pytest.raises(EnvelopeError, match="'data' must be a dict, not list"):
        Envelope('t', 'm', 'l7', 'x', data=[1])  # type: ignore[arg-type]
    with pytest.raises(EnvelopeError, match="'title' must be a string, not int"):
        Envelope(1, 'm', 'l7', 'x')  # type: ignore[arg-type]
    with pytest.raises(EnvelopeError, match="'send_to' is required"):
        Envelope.from_dict({'title': 't', 'message_type': 'm', 'send_from': 'l7', 'create_time': 1.0})


async def test_async_twins_with_the_default_broker() -> None:
    broker = MemoryBroker(f'memory://{unique()}')
    with override_broker(broker):
        sent = await asend_message(title='t', message_type='m', send_from='l7',
                                   send_to='bioconnect-id-service', data={'n': 1})
        assert await areceive_message('bioconnect-id-service', max_wait_time=1) == [sent]
        await asend_message(title='t', message_type='m', send_from='l7', send_to='bioconnect-id-service')
        got: list[dict[str, Any]] = []

        async def handler(message: dict[str, Any]) -> None:
            got.append(message)

        await areceive_message('bioconnect-id-service', max_wait_time=0.5, call_back_function=handler)
        assert [m['title'] for m in got] == ['t']
    await broker.close()
    await asyncio.sleep(0)
