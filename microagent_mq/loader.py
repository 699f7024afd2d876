"""``load_queues``: read queue declarations from a file or a URL."""

import time
import urllib.error
import urllib.request
from collections import namedtuple
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from .exceptions import ConfigurationError, QueueSourceError
from .queue import (
    Queue,
    check_durability,
    check_max_length,
    check_max_priority,
    check_name,
    check_overflow,
    check_retention,
    identifier,
)

URL_TIMEOUT_S = 10.0
MAX_SOURCE_BYTES = 1024 * 1024
QUEUE_KEYS = frozenset({'name', 'exchange', 'topics', 'durability', 'retention', 'max_priority',
                        'max_length', 'overflow'})
OPTION_KEYS = ('durability', 'retention', 'max_priority', 'max_length', 'overflow')
# Names a NamedTuple keeps for itself; a queue cannot take them.
RESERVED = frozenset({'_make', '_replace', '_asdict', '_fields', '_field_defaults'})


def load_queues(source: str) -> NamedTuple:
    """Load queue declarations from ``file://path``, a plain path or an ``http(s)://`` URL.

    Returns a NamedTuple whose attributes are the declared ``Queue`` objects, each under
    the identifier form of its name (``bioconnect-id-service`` as ``bioconnect_id_service``).
    """
    raw = _read(source)
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise QueueSourceError(
            f'{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}'
        ) from exc
    return declare_queues(document, source)


def declare_queues(document: Any, source: str = '<dict>') -> NamedTuple:
    """Declare the queues of an already parsed ``{"queues": [...]}`` document."""
    if not isinstance(document, dict) or not isinstance(document.get('queues'), list):
        raise QueueSourceError(f'{source}: expected an object with a "queues" list')
    if unknown := set(document) - {'queues'}:
        raise QueueSourceError(f'{source}: unknown top-level keys {sorted(unknown)}')
    specs = document['queues']
    names = [_check_spec(spec, index, source) for index, spec in enumerate(specs)]
    if duplicates := sorted({name for name in names if names.count(name) > 1}):
        raise QueueSourceError(f'{source}: duplicate queue names {duplicates}')
    fields = [identifier(name) for name in names]
    for index, field in enumerate(fields):
        if (first := fields.index(field)) != index:
            raise QueueSourceError(f'{source}: queues {names[first]!r} and {names[index]!r} both map '
                                   f'to the attribute {field!r}')
        if field in RESERVED:
            raise QueueSourceError(f'{source}: queues[{index}]: the name {names[index]!r} is reserved')
    queues = [
        Queue(spec['name'], spec.get('exchange', ''), tuple(spec.get('topics', ())),
              **{key: spec[key] for key in OPTION_KEYS if key in spec})
        for spec in specs
    ]
    result: NamedTuple = _named_tuple(fields)(*queues)
    return result


def _check_spec(spec: Any, index: int, source: str) -> str:
    where = f'{source}: queues[{index}]'
    if not isinstance(spec, dict):
        raise QueueSourceError(f'{where}: expected an object, got {type(spec).__name__}')
    if unknown := set(spec) - QUEUE_KEYS:
        raise QueueSourceError(f'{where}: unknown keys {sorted(unknown)}')
    if 'name' not in spec:
        raise QueueSourceError(f'{where}: missing "name"')
    try:
        name = check_name(spec['name'])
    except ConfigurationError as exc:
        raise QueueSourceError(f'{where}: {exc}') from exc
    if name in RESERVED:
        raise QueueSourceError(f'{where}: the name {name!r} is reserved')
    topics = spec.get('topics', [])
    if not isinstance(topics, list):
        raise QueueSourceError(f'{where}: "topics" must be a list')
    for key, check in (('durability', check_durability), ('retention', check_retention),
                       ('max_priority', check_max_priority), ('max_length', check_max_length),
                       ('overflow', check_overflow)):
        if key in spec:
            try:
                check(spec[key])
            except ConfigurationError as exc:
                raise QueueSourceError(f'{where}: queue {name!r}: {exc}') from exc
    return name


def _named_tuple(names: list[str]) -> type[Any]:
    # namedtuple refuses names with a leading underscore; rename them, then give each
    # renamed field a property under its real name.
    cls = namedtuple('Queues', names, rename=True)  # type: ignore[misc]
    for index, name in enumerate(names):
        if name.startswith('_'):
            setattr(cls, name, property(itemgetter(index)))
    return cls


def _read(source: str) -> bytes:
    if source.startswith(('http://', 'https://')):
        return _read_url(source)
    path = Path(source.removeprefix('file://'))
    try:
        with path.open('rb') as file:
            data = file.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise QueueSourceError(f'{source}: cannot read {path}: {exc.strerror}') from exc
    return _limited(data, source)


def _read_url(url: str) -> bytes:
    # URL_TIMEOUT_S bounds the whole fetch, not each socket operation: a server that
    # trickles its answer a byte at a time must not keep a service from starting for long.
    deadline = time.monotonic() + URL_TIMEOUT_S
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
            data = _read_before(response, deadline, url)
    except urllib.error.HTTPError as exc:
        raise QueueSourceError(f'{url}: cannot fetch queue declarations: HTTP {exc.code} '
                               f'{exc.reason}') from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, 'reason', exc)
        raise QueueSourceError(f'{url}: cannot fetch queue declarations: {reason}') from exc
    return _limited(data, url)


def _read_before(response: Any, deadline: float, url: str) -> bytes:
    sock = getattr(getattr(response.fp, 'raw', None), '_sock', None)
    data = bytearray()
    while len(data) <= MAX_SOURCE_BYTES:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise QueueSourceError(f'{url}: no complete answer within {URL_TIMEOUT_S}s')
        if sock is not None:
            sock.settimeout(remaining)
        try:
            chunk = response.read1(65536)
        except TimeoutError as exc:
            raise QueueSourceError(f'{url}: no complete answer within {URL_TIMEOUT_S}s') from exc
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _limited(data: bytes, source: str) -> bytes:
    if len(data) > MAX_SOURCE_BYTES:
        raise QueueSourceError(f'{source}: larger than {MAX_SOURCE_BYTES} bytes')
    return data
