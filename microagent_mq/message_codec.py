"""Message classes to JSON bodies and back: dataclasses through orjson, pydantic v2 models their way.

The body is the plain JSON of the fields. orjson writes datetimes, dates, UUIDs, enums and
nested dataclasses natively; reading them back, each field's annotation says what to rebuild,
through a plan made once per class. Pydantic is never imported here: a model is recognised
by its ``model_validate_json`` / ``model_dump_json`` methods.
"""

import dataclasses
import datetime
import enum
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from .exceptions import ConfigurationError, SerializingError

Convert = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Codec:
    """How one message class becomes a body (``encode``) and a body becomes one (``decode``)."""

    encode: Callable[[Any], bytes]
    decode: Callable[[bytes], Any]


_codecs: dict[type, Codec] = {}


def codec_of(cls: type) -> Codec:
    """The codec of message class ``cls``, made on first use."""
    codec = _codecs.get(cls)
    if codec is None:
        codec = _codecs[cls] = _make_codec(cls)
    return codec


def _make_codec(cls: type) -> Codec:
    name = cls.__qualname__
    if hasattr(cls, 'model_validate_json') and hasattr(cls, 'model_dump_json'):
        return _pydantic_codec(cls, name)
    if dataclasses.is_dataclass(cls):
        return _dataclass_codec(cls, name)
    raise ConfigurationError(f'message class {name} must be a dataclass or a pydantic model')


def _pydantic_codec(cls: Any, name: str) -> Codec:
    def encode(message: Any) -> bytes:
        try:
            return message.model_dump_json().encode()  # type: ignore[no-any-return]
        except Exception as exc:  # pydantic's PydanticSerializationError
            raise SerializingError(f'{name} is not JSON-serialisable: {exc}') from exc

    def decode(body: bytes) -> Any:
        return cls.model_validate_json(body)

    return Codec(encode, decode)


def _dataclass_codec(cls: type, name: str) -> Codec:
    build = _dataclass_builder(cls)

    def encode(message: Any) -> bytes:
        try:
            return orjson.dumps(message, default=_default)
        except TypeError as exc:
            raise SerializingError(f'{name} is not JSON-serialisable: {exc}') from exc

    def decode(body: bytes) -> Any:
        data = orjson.loads(body)
        if not isinstance(data, dict):
            raise SerializingError(f'body is a JSON {type(data).__name__}, not an object')
        return build(data)

    return Codec(encode, decode)


def _default(value: Any) -> Any:
    # Called by orjson only for what it cannot write itself: sets become JSON arrays.
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f'Type is not JSON serializable: {type(value).__name__}')


def _dataclass_builder(cls: type) -> Callable[[dict[str, Any]], Any]:
    hints = typing.get_type_hints(cls)
    plan = [(f.name, conv) for f in dataclasses.fields(cls)
            if f.init and (conv := _converter(hints.get(f.name, Any))) is not None]

    def build(data: dict[str, Any]) -> Any:
        for key, conv in plan:
            if key in data:
                data[key] = conv(data[key])
        return cls(**data)

    return build


def _converter(hint: Any) -> Convert | None:
    """A function rebuilding a value of type ``hint`` from its JSON, or None if JSON is it."""
    if hint in _SCALARS:
        return _SCALARS[hint]
    if isinstance(hint, type):
        if issubclass(hint, enum.Enum):
            return hint
        if dataclasses.is_dataclass(hint):
            return _dataclass_builder(hint)
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        inner = _converter(options[0]) if len(options) == 1 else None
        return None if inner is None else _optional(inner)
    if origin in (list, set, frozenset) and args:
        return _sequence(origin, args[0])
    if origin is tuple and args:
        return _tuple(args)
    if origin is dict and len(args) == 2:
        value = _converter(args[1])
        return None if value is None else (lambda d: {k: value(v) for k, v in d.items()})
    return None


def _optional(inner: Convert) -> Convert:
    return lambda v: None if v is None else inner(v)


def _sequence(origin: type, item_hint: Any) -> Convert | None:
    item = _converter(item_hint)
    if item is None:
        return None if origin is list else origin
    return lambda v: origin(item(x) for x in v)


def _tuple(args: tuple[Any, ...]) -> Convert:
    if len(args) == 2 and args[1] is Ellipsis:
        item = _converter(args[0]) or (lambda x: x)
        return lambda v: tuple(item(x) for x in v)
    items = [_converter(a) or (lambda x: x) for a in args]
    return lambda v: tuple(conv(x) for conv, x in zip(items, v, strict=True))


_SCALARS: dict[Any, Convert] = {
    datetime.datetime: datetime.datetime.fromisoformat,
    datetime.date: datetime.date.fromisoformat,
    datetime.time: datetime.time.fromisoformat,
    uuid.UUID: uuid.UUID,
}
