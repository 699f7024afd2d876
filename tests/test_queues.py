"""Queue declarations and ``load_queues``: every bad input gets a clear error."""

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from microagent_mq import (
    ConfigurationError,
    Queue,
    QueueException,
    QueueNotFound,
    QueueSourceError,
    SerializingError,
    load_queues,
)
from microagent_mq.routing import topic_matches

DECLARATIONS = (b'{"queues": [{"name": "mailer"}, {"name": "pusher", "exchange": "events"},'
                b' {"name": "save", "exchange": "msg", "topics": ["m.*"]}]}')


def write(tmp_path: Path, content: bytes | str) -> Path:
    path = tmp_path / 'queues.json'
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_load_from_plain_path_and_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, DECLARATIONS)
    queues = load_queues(str(path))
    assert queues.mailer == Queue('mailer')
    assert queues.pusher.exchange == 'events'
    assert queues.save.topics == ('m.*',)
    assert load_queues(f'file://{path}') == queues  # absolute, redeclared harmlessly
    monkeypatch.chdir(tmp_path)
    assert load_queues('file://queues.json') == queues  # relative
    assert tuple(queues._fields) == ('mailer', 'pusher', 'save')


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    write(tmp_path, DECLARATIONS)
    (tmp_path / 'big.json').write_bytes(b' ' * (2 * 1024 * 1024))

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_load_from_http(http_server: str) -> None:
    queues = load_queues(f'{http_server}/queues.json')
    assert [q.name for q in queues] == ['mailer', 'pusher', 'save']


def test_http_errors(http_server: str) -> None:
    with pytest.raises(QueueSourceError, match=r'cannot fetch.*HTTP 404'):
        load_queues(f'{http_server}/missing.json')
    with pytest.raises(QueueSourceError, match='larger than'):
        load_queues(f'{http_server}/big.json')
    with pytest.raises(QueueSourceError, match='cannot fetch'):
        load_queues('http://127.0.0.1:1/queues.json')


@pytest.mark.parametrize(('content', 'message'), [
    ('{"queues": [}', r'invalid JSON at line 1, column 13'),
    ('{\n  "queues": [\n    {"name": "a"},\n  ]\n}', r'invalid JSON at line 3, column 18: trailing comma'),
    ('[]', 'expected an object with a "queues" list'),
    ('{"queue": []}', 'expected an object with a "queues" list'),
    ('{"queues": [], "extra": 1}', r"unknown top-level keys \['extra'\]"),
    ('{"queues": ["mailer"]}', r'queues\[0\]: expected an object, got str'),
    ('{"queues": [{"exchange": "x"}]}', r'queues\[0\]: missing "name"'),
    ('{"queues": [{"name": "Mailer"}]}', r"invalid queue name 'Mailer'"),
    ('{"queues": [{"name": "a--b"}]}', r"invalid queue name 'a--b'"),
    ('{"queues": [{"name": "a b"}]}', r"invalid queue name 'a b'"),
    ('{"queues": [{"name": "a-b"}, {"name": "a_b"}]}', r"'a-b' and 'a_b' both map to the attribute 'a_b'"),
    ('{"queues": [{"name": 5}]}', r'invalid queue name 5'),
    ('{"queues": [{"name": "a"}, {"name": "a"}]}', r"duplicate queue names \['a'\]"),
    ('{"queues": [{"name": "a", "durable": true}]}', r"unknown keys \['durable'\]"),
    ('{"queues": [{"name": "a", "topics": "x.*"}]}', r'"topics" must be a list'),
    ('{"queues": [{"name": "_fields"}]}', 'reserved'),
])
def test_bad_declarations(tmp_path: Path, content: str, message: str) -> None:
    with pytest.raises(QueueSourceError, match=message):
        load_queues(str(write(tmp_path, content)))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QueueSourceError, match=r'cannot read .*No such file'):
        load_queues(f'file://{tmp_path}/nope.json')


def test_leading_underscore_names_are_attributes(tmp_path: Path) -> None:
    queues = load_queues(str(write(tmp_path, '{"queues": [{"name": "_internal"}, {"name": "b"}]}')))
    assert queues._internal.name == '_internal'
    assert queues.b.name == 'b'


def test_semantic_errors() -> None:
    with pytest.raises(ConfigurationError, match='topics need an exchange'):
        Queue('a', topics=('x',))
    with pytest.raises(ConfigurationError, match='invalid topic pattern'):
        Queue('a', 'ex', ('x..y',))
    with pytest.raises(ConfigurationError, match='cannot share the name'):
        Queue('a', 'a')
    Queue('mailer')
    Queue('mailer')  # the same definition again: harmless
    with pytest.raises(QueueException, match='already declared'):
        Queue('mailer', 'events')
    with pytest.raises(QueueException, match='already used by a queue'):
        Queue('other', 'mailer')
    Queue('pusher', 'events')
    with pytest.raises(QueueException, match='already used by an exchange'):
        Queue('events')


def test_get_and_get_all() -> None:
    mailer, pusher = Queue('mailer'), Queue('pusher', 'events')
    assert Queue.get('mailer') is mailer
    assert Queue.get_all() == {'mailer': mailer, 'pusher': pusher}
    exchange = Queue.get('events')
    assert exchange.is_exchange and not mailer.is_exchange
    assert 'events' not in Queue.get_all()
    with pytest.raises(QueueNotFound, match="no queue or exchange named 'nope'"):
        Queue.get('nope')
    assert issubclass(QueueNotFound, AttributeError)
    assert hash(Queue('mailer')) == hash(mailer) and Queue('mailer') == mailer


def test_serialize_roundtrip_and_errors() -> None:
    queue = Queue('mailer')
    text = queue.serialize({'user_id': 1, 'name': 'Zoë'})
    assert isinstance(text, str)
    assert queue.deserialize(text) == {'user_id': 1, 'name': 'Zoë'}
    assert queue.deserialize(text.encode()) == {'user_id': 1, 'name': 'Zoë'}
    with pytest.raises(SerializingError, match='not valid JSON'):
        queue.deserialize('{nope')
    with pytest.raises(SerializingError, match='JSON list, not an object'):
        queue.deserialize('[1]')
    with pytest.raises(SerializingError, match='not JSON-serialisable'):
        queue.serialize({'when': object()})
    with pytest.raises(SerializingError, match='must be a dict'):
        queue.serialize([1])  # type: ignore[arg-type]


@pytest.mark.parametrize(('pattern', 'topic', 'expected'), [
    ('user.*', 'user.created', True),
    ('user.*', 'user', False),
    ('user.*', 'user.created.now', False),
    ('#', '', True),
    ('#', 'a.b.c', True),
    ('order.#', 'order', True),
    ('order.#', 'order.item.deleted', True),
    ('#.deleted', 'deleted', True),
    ('#.deleted', 'order.item.deleted', True),
    ('*.item.#', 'order.item', True),
    ('*.item.#', 'item', False),
    ('a.#.z', 'a.z', True),
    ('a.#.z', 'a.b.c.z', True),
    ('a.#.z', 'a.b.c', False),
    ('m.*', '', False),
])
def test_topic_matching_follows_amqp(pattern: str, topic: str, expected: bool) -> None:
    assert topic_matches(pattern, topic) is expected


def test_a_trickling_server_cannot_stretch_the_url_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each byte arrives well within the socket timeout, so only a total deadline stops it.
    import socket

    import microagent_mq.loader as loader

    monkeypatch.setattr(loader, 'URL_TIMEOUT_S', 0.5)
    listener = socket.create_server(('127.0.0.1', 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(4096)
            conn.sendall(b'HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n')
            while not stop.is_set():
                try:
                    conn.sendall(b' ')
                except OSError:
                    return
                stop.wait(0.05)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        with pytest.raises(QueueSourceError, match=r'no complete answer within 0.5s'):
            load_queues(f'http://127.0.0.1:{listener.getsockname()[1]}/queues.json')
    finally:
        stop.set()
        listener.close()
        thread.join(5)
