"""The bytes of one ``basic.publish``: its method, content header and body frames.

What pamqp marshals through its generic frame and property objects (a ``Basic.Publish``, a
``ContentHeader``, a ``Basic.Properties``, one encoder call per field), written here straight
for the only properties a send carries (``amqp_codec``): ``content_type``, ``headers``,
``delivery_mode``, ``priority``, ``message_id``. The output is pamqp's, byte for byte
(tests/test_amqp_wire.py compares them); a header value of another type than ``int`` or
``str`` (a journal's ``BCC`` list) is encoded by pamqp itself.
"""

import struct
from typing import Any

from pamqp import encode
from pamqp import frame as pamqp_frame
from pamqp.commands import Basic

FRAME_END = b'\xce'
_FRAME = struct.Struct('>BHI')  # frame type, channel, payload size
_CONTENT_HEADER = struct.Struct('>HHQ')  # class (Basic), weight (0), body size
_LONG = struct.Struct('>I')
_HEADER_FRAME = 2
_BODY_FRAME = 3

# Basic.Properties flags, in the order AMQP writes their values
_CONTENT_TYPE = 1 << 15
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_PRIORITY = 1 << 11
_MESSAGE_ID = 1 << 7


def method_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """A ``basic.publish`` method frame, validated by pamqp (exchange name, lengths)."""
    if len(routing_key) > 255:  # what aiormq's basic_publish checks first
        raise ValueError('Routing key too long (max 255 bytes)')
    publish = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
    return pamqp_frame.marshal(publish, channel)


def properties(content_type: str, headers: dict[str, Any], delivery_mode: int, priority: int,
               message_id: str) -> bytes:
    """Encoded ``Basic.Properties`` (flags, then values) of a send; ``priority`` 0: none."""
    flags = _CONTENT_TYPE | _HEADERS | _DELIVERY_MODE | _MESSAGE_ID
    parts = [_short_string(content_type), _table(headers), bytes((delivery_mode,))]
    if priority:
        flags |= _PRIORITY
        parts.append(bytes((priority,)))
    parts.append(_short_string(message_id))
    return struct.pack('>H', flags) + b''.join(parts)


def content_frames(channel: int, properties: bytes, body: bytes, max_content: int) -> bytes:
    """The content header frame and the body frames (each at most ``max_content`` bytes)."""
    size = len(body)
    header = _CONTENT_HEADER.pack(Basic.frame_id, 0, size) + properties
    out = [_FRAME.pack(_HEADER_FRAME, channel, len(header)), header, FRAME_END]
    if size < max_content:  # aiormq's _split_body: one frame below the maximum
        if size:
            out += (_FRAME.pack(_BODY_FRAME, channel, size), body, FRAME_END)
    else:
        for start in range(0, size, max_content):
            chunk = body[start:start + max_content]
            out += (_FRAME.pack(_BODY_FRAME, channel, len(chunk)), chunk, FRAME_END)
    return b''.join(out)


def _short_string(value: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise TypeError('string exceeds maximum length of 255 bytes')  # pamqp's error
    return bytes((len(data),)) + data


def _table(table: dict[str, Any]) -> bytes:
    """A field table as pamqp writes it (keys sorted; an int in its smallest type)."""
    parts = []
    for key, value in sorted(table.items()):
        name = key.encode()
        kind = type(value)
        if len(name) > 128:  # pamqp cuts it (with a warning)
            return encode.field_table(table)
        if kind is int and -(1 << 63) <= value < (1 << 63):
            parts.append(bytes((len(name),)) + name + encode.table_integer(value))
        elif kind is str:
            data = value.encode()
            parts.append(bytes((len(name),)) + name + b'S' + _LONG.pack(len(data)) + data)
        else:
            return encode.field_table(table)
    data = b''.join(parts)
    return _LONG.pack(len(data)) + data
