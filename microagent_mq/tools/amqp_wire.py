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
_SIGNED_BYTE = struct.Struct('>b')
_LONG_LONG = struct.Struct('>q')
_HEADER_FRAME = 2
_BODY_FRAME = 3

# Basic.Properties flags, in the order AMQP writes their values
_CONTENT_TYPE = 1 << 15
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_PRIORITY = 1 << 11
_MESSAGE_ID = 1 << 7
_WITHOUT_PRIORITY = struct.pack('>H', _CONTENT_TYPE | _HEADERS | _DELIVERY_MODE | _MESSAGE_ID)
_WITH_PRIORITY = struct.pack('>H', _CONTENT_TYPE | _HEADERS | _DELIVERY_MODE | _MESSAGE_ID | _PRIORITY)
_SHORT_STRINGS = {'application/json': b'\x10application/json'}  # the content type of sends


def method_frame(channel: int, exchange: str, routing_key: str, mandatory: bool) -> bytes:
    """A ``basic.publish`` method frame, validated by pamqp (exchange name, lengths)."""
    if len(routing_key) > 255:  # what aiormq's basic_publish checks first
        raise ValueError('Routing key too long (max 255 bytes)')
    publish = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
    return pamqp_frame.marshal(publish, channel)


def properties(content_type: str, headers: dict[str, Any], delivery_mode: int, priority: int,
               message_id: str) -> bytes:
    """Encoded ``Basic.Properties`` (flags, then values) of a send; ``priority`` 0: none."""
    kind = _SHORT_STRINGS.get(content_type) or _short_string(content_type)
    mode = bytes((delivery_mode,))
    if priority:
        return b''.join((_WITH_PRIORITY, kind, _table(headers), mode, bytes((priority,)),
                         _short_string(message_id)))
    return b''.join((_WITHOUT_PRIORITY, kind, _table(headers), mode, _short_string(message_id)))


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
    parts: list[bytes] = []
    for key, value in sorted(table.items()):
        name = _NAMES.get(key)
        if name is None:
            encoded = key.encode()
            if len(encoded) > 128:  # pamqp cuts it (with a warning)
                return encode.field_table(table)
            name = bytes((len(encoded),)) + encoded
            if len(_NAMES) < NAMES_KEPT:
                _NAMES[key] = name
        kind = type(value)
        if kind is str:
            data = value.encode()
            parts += (name, b'S', _LONG.pack(len(data)), data)
        elif kind is int and -128 <= value <= 127:
            parts += (name, b'b', _SIGNED_BYTE.pack(value))
        elif kind is int and 4294967295 < value <= 9223372036854775807:  # epoch ms
            parts += (name, b'l', _LONG_LONG.pack(value))
        elif kind is int and -(1 << 63) <= value < (1 << 63):
            parts += (name, encode.table_integer(value))
        else:
            return encode.field_table(table)
    data = b''.join(parts)
    return _LONG.pack(len(data)) + data


NAMES_KEPT = 256  # header names kept encoded (ours are a handful)
_NAMES: dict[str, bytes] = {}
