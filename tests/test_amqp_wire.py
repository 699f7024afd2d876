"""The bytes ``amqp_wire`` writes for a publish are pamqp's (and so aiormq's), byte for byte."""

from typing import Any

import pytest
from pamqp import frame as pamqp_frame
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from microagent_mq.tools import amqp_wire
from microagent_mq.tools.amqp_codec import CONTENT_TYPE, PERSISTENT, outgoing_properties

INTS = [0, 1, -1, 127, 128, -128, -129, 32767, 32768, -32768, -32769, 65535, 65536,
        2 ** 31 - 1, 2 ** 31, -2 ** 31, -2 ** 31 - 1, 2 ** 32 - 1, 2 ** 32, 1_700_000_000_123,
        2 ** 63 - 1, -2 ** 63]


def pamqps(channel: int, headers: dict[str, Any], priority: int, message_id: str,
           body: bytes, max_content: int = 131_064) -> bytes:
    properties = Basic.Properties(message_id=message_id, content_type=CONTENT_TYPE,
                                  delivery_mode=PERSISTENT, headers=headers,
                                  priority=priority or None)
    frames: list[Any] = [ContentHeader(0, len(body), properties)]
    if body and len(body) < max_content:  # aiormq's _split_body
        frames.append(ContentBody(body))
    elif body:
        frames += [ContentBody(body[i:i + max_content]) for i in range(0, len(body), max_content)]
    return b''.join(pamqp_frame.marshal(f, channel) for f in frames)


def ours(channel: int, headers: dict[str, Any], priority: int, message_id: str, body: bytes,
         max_content: int = 131_064) -> bytes:
    properties = amqp_wire.properties(CONTENT_TYPE, headers, PERSISTENT, priority, message_id)
    return amqp_wire.content_frames(channel, properties, body, max_content)


@pytest.mark.parametrize('value', INTS)
def test_every_integer_size_is_written_as_pamqp_writes_it(value: int) -> None:
    headers = {'x-attempt': 1, 'x-sent-at': value}
    assert ours(1, headers, 0, 'id-1', b'{}') == pamqps(1, headers, 0, 'id-1', b'{}')


@pytest.mark.parametrize('headers', [
    {'x-attempt': 3, 'x-headers': '{"trace": "é✓"}', 'x-sent-at': 1_700_000_000_000},
    {'x-attempt': 1, 'mq-delay-to': 'orders.due', 'x-error': 'ValueError("x")'},
    {'x-attempt': 1, 'BCC': ['orders.journal']},  # a list: pamqp encodes the table
    {'x-attempt': 1, 'x-flag': True, 'x-ratio': 0.5, 'x-none': None},
    {'x-attempt': 1, 'k' * 200: 'a key pamqp cuts to 128 bytes'},
    {'x-attempt': 1, 'big': 2 ** 70},  # beyond 64 bits: pamqp's error, as before
])
@pytest.mark.parametrize('priority', [0, 1, 9])
def test_headers_and_priority_are_written_as_pamqp_writes_them(headers: dict[str, Any],
                                                               priority: int) -> None:
    try:
        expected = pamqps(7, headers, priority, 'mid', b'{"a":1}')
    except TypeError:
        with pytest.raises(TypeError):
            ours(7, headers, priority, 'mid', b'{"a":1}')
        return
    assert ours(7, headers, priority, 'mid', b'{"a":1}') == expected


@pytest.mark.parametrize('size', [0, 1, 99, 100, 101, 250, 300])
def test_a_body_is_split_into_frames_as_aiormq_splits_it(size: int) -> None:
    body = bytes(range(256)) * 2
    assert ours(2, {'x-attempt': 1}, 0, 'm', body[:size], 100) == \
        pamqps(2, {'x-attempt': 1}, 0, 'm', body[:size], 100)


def test_the_codec_properties_are_those_of_the_message_aio_pika_builds() -> None:
    properties = outgoing_properties('m-1', 2, headers={'user': [1, 2]}, sent_at=1700000000.5,
                                     extra={'x-error': 'boom'}, priority=3)
    expected = Basic.Properties(
        message_id='m-1', content_type=CONTENT_TYPE, delivery_mode=PERSISTENT, priority=3,
        headers={'x-attempt': 2, 'x-sent-at': 1_700_000_000_500, 'x-headers': '{"user":[1,2]}',
                 'x-error': 'boom'})
    assert properties == expected.marshal()


def test_method_frames_are_pamqps_and_checked_as_aiormq_checks_them() -> None:
    assert amqp_wire.method_frame(3, 'ex', 'user.created', True) == pamqp_frame.marshal(
        Basic.Publish(exchange='ex', routing_key='user.created', mandatory=True), 3)
    with pytest.raises(ValueError, match='Routing key too long'):
        amqp_wire.method_frame(3, '', 'q' * 256, True)
    with pytest.raises(ValueError):
        amqp_wire.method_frame(3, 'bad exchange name!', 'q', True)


def test_a_too_long_message_id_is_refused_as_pamqp_refuses_it() -> None:
    with pytest.raises(TypeError):
        amqp_wire.properties(CONTENT_TYPE, {'x-attempt': 1}, PERSISTENT, 0, 'x' * 256)
