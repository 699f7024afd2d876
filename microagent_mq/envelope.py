"""BioConnect's message envelope and its ``send_message`` / ``receive_message`` helpers.

The envelope is the body on the wire (plain JSON, so BioConnect's other clients read it).
The helpers are synchronous, for scripts and web apps; ``asend_message`` and
``areceive_message`` are their async twins. The broker: ``broker=`` (a ``SyncBroker``, an
async broker or a DSN), else the default broker, else ``MQ_BROKER`` (and ``MQ_QUEUES``, a
declarations file to load) from the environment. A queue not declared yet is declared on
first use, as BioConnect's queues are named by their users.
"""

import asyncio
import inspect
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from .broker import AbstractQueueBroker
from .default_broker import default_broker_or_none
from .exceptions import ConfigurationError, QueueNotFound
from .pull import Received
from .queue import Queue
from .sync import SyncBroker, SyncReceived, connect

__all__ = ['Envelope', 'EnvelopeError', 'areceive_message', 'asend_message', 'receive_message',
           'send_message']

REQUIRED = ('title', 'message_type', 'send_from', 'send_to')
OPTIONAL_TEXT = ('env', 'comments', 'original_message')
BATCH = 100  # messages one receive takes at most
POLL_S = 1.0  # a receive that waits forever looks at its stop flag this often
Callback = Callable[[dict[str, Any]], Any]


class EnvelopeError(ConfigurationError):
    """A BioConnect envelope lacks a required field or has one of the wrong type."""


@dataclass(frozen=True)
class Envelope:
    """BioConnect's message schema; ``create_time`` (epoch seconds) is set for you."""

    title: str
    message_type: str
    send_from: str
    send_to: str
    create_time: float = field(default_factory=time.time)
    env: str | None = None
    comments: str | None = None
    data: dict[str, Any] | None = None
    original_message: str | None = None

    def __post_init__(self) -> None:
        for name in REQUIRED:
            value = getattr(self, name)
            if value is None or value == '':
                raise EnvelopeError(f'envelope field {name!r} is required')
            if not isinstance(value, str):
                raise EnvelopeError(f'envelope field {name!r} must be a string, not {type(value).__name__}')
        for name in OPTIONAL_TEXT:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise EnvelopeError(f'envelope field {name!r} must be a string, not {type(value).__name__}')
        if self.data is not None and not isinstance(self.data, dict):
            raise EnvelopeError(f"envelope field 'data' must be a dict, not {type(self.data).__name__}")
        if isinstance(self.create_time, bool) or not isinstance(self.create_time, int | float):
            raise EnvelopeError(f"envelope field 'create_time' must be epoch seconds, not "
                                f'{type(self.create_time).__name__}')

    @classmethod
    def from_dict(cls, message: dict[str, Any]) -> 'Envelope':
        """An envelope read from a message body; ``EnvelopeError`` names what is wrong."""
        for name in (*REQUIRED, 'create_time'):
            if name not in message:
                raise EnvelopeError(f'envelope field {name!r} is required')
        if unknown := sorted(set(message) - set(cls.__dataclass_fields__)):
            raise EnvelopeError(f'unknown envelope fields {unknown}')
        return cls(**message)

    def to_dict(self) -> dict[str, Any]:
        """The envelope as the JSON object sent."""
        return asdict(self)


def send_message(*, title: str, message_type: str, send_from: str, send_to: str, env: str | None = None,
                 comments: str | None = None, data: dict[str, Any] | None = None,
                 original_message: str | None = None, broker: Any = None) -> dict[str, Any]:
    """Send an envelope to queue ``send_to``; return it as a dict."""
    envelope = Envelope(title, message_type, send_from, send_to, env=env, comments=comments, data=data,
                        original_message=original_message)
    _declared(send_to)
    message = envelope.to_dict()
    _sync_broker(broker).send(send_to, message)
    return message


def receive_message(queue_name: str, max_wait_time: float = 1, call_back_function: Callback | None = None,
                    broker: Any = None) -> list[dict[str, Any]] | None:
    """Receive envelopes (as dicts) from ``queue_name``.

    Without a callback: wait up to ``max_wait_time`` s (0: forever) for the first, take what
    else is waiting, acknowledge them and return the list. With ``call_back_function``: call
    it for each message, acknowledging after it returns, retrying (per policy) when it
    raises, until ``max_wait_time`` s pass with nothing new (0: until SIGINT/SIGTERM).
    A body that is no envelope is dead-lettered with the reason.
    """
    wait = _check_wait(max_wait_time)
    _declared(queue_name)
    sync = _sync_broker(broker)
    if call_back_function is None:
        got = _receive_batch(sync, queue_name, wait)
        for received, _ in got:
            received.ack()
        return [message for _, message in got]
    stop = threading.Event()
    with _stop_on_signals(stop):
        while not stop.is_set():
            got = _receive_batch(sync, queue_name, wait, stop)
            if not got and (wait is not None or stop.is_set()):
                return None
            for received, message in got:
                try:
                    call_back_function(message)
                except Exception:
                    received.retry()
                else:
                    received.ack()
    return None


async def asend_message(*, title: str, message_type: str, send_from: str, send_to: str,
                        env: str | None = None, comments: str | None = None,
                        data: dict[str, Any] | None = None, original_message: str | None = None,
                        broker: AbstractQueueBroker | None = None) -> dict[str, Any]:
    """``send_message`` for async code."""
    envelope = Envelope(title, message_type, send_from, send_to, env=env, comments=comments, data=data,
                        original_message=original_message)
    _declared(send_to)
    message = envelope.to_dict()
    await _async_broker(broker).send(send_to, message)
    return message


async def areceive_message(queue_name: str, max_wait_time: float = 1,
                           call_back_function: Callback | None = None,
                           broker: AbstractQueueBroker | None = None) -> list[dict[str, Any]] | None:
    """``receive_message`` for async code; the callback may be ``async def``; 0 runs until cancelled."""
    wait = _check_wait(max_wait_time)
    _declared(queue_name)
    target = _async_broker(broker)
    if call_back_function is None:
        got = await _areceive_batch(target, queue_name, wait)
        for received, _ in got:
            await received.ack()
        return [message for _, message in got]
    while True:
        got = await _areceive_batch(target, queue_name, wait)
        if not got and wait is not None:
            return None
        for received, message in got:
            try:
                result = call_back_function(message)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                await received.retry()
            else:
                await received.ack()


# receiving ------------------------------------------------------------------------------

def _receive_batch(sync: SyncBroker, name: str, wait: float | None,
                   stop: threading.Event | None = None) -> list[tuple[SyncReceived, dict[str, Any]]]:
    while True:  # wait=None: forever, in slices, so a stop is seen
        got = sync.receive(name, BATCH, POLL_S if wait is None else wait)
        if got or wait is not None or (stop is not None and stop.is_set()):
            break
    checked = []
    for received in got:
        if (message := _checked(received.data)) is None:
            received.reject(f'not a BioConnect envelope: {_why(received.data)}')
        else:
            checked.append((received, message))
    return checked


async def _areceive_batch(broker: AbstractQueueBroker, name: str,
                          wait: float | None) -> list[tuple[Received, dict[str, Any]]]:
    while not (got := await broker.receive(name, BATCH, POLL_S if wait is None else wait)):
        if wait is not None:
            break
    checked = []
    for received in got:
        if (message := _checked(received.data)) is None:
            await received.reject(f'not a BioConnect envelope: {_why(received.data)}')
        else:
            checked.append((received, message))
    return checked


def _checked(data: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return Envelope.from_dict(data).to_dict()
    except (EnvelopeError, TypeError):
        return None


def _why(data: dict[str, Any]) -> str:
    try:
        Envelope.from_dict(data)
    except (EnvelopeError, TypeError) as exc:
        return str(exc)
    return 'valid'


def _check_wait(max_wait_time: float) -> float | None:
    if (isinstance(max_wait_time, bool) or not isinstance(max_wait_time, int | float)
            or not max_wait_time >= 0):
        raise ConfigurationError(f'max_wait_time={max_wait_time!r}: expected seconds >= 0 (0: forever)')
    return None if max_wait_time == 0 else float(max_wait_time)


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM end a receive loop after its current message (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# which broker -----------------------------------------------------------------------------

_wrapped: 'weakref.WeakKeyDictionary[AbstractQueueBroker, SyncBroker]' = weakref.WeakKeyDictionary()
_from_env: dict[str, SyncBroker] = {}
_async_from_env: dict[tuple[str, int], AbstractQueueBroker] = {}
_lock = threading.Lock()


def _declared(name: str) -> None:
    try:
        Queue.get(name)
    except QueueNotFound:
        Queue(name)


def _env_dsn() -> str:
    dsn = os.environ.get('MQ_BROKER')
    if not dsn:
        raise ConfigurationError('no broker: pass broker=, set a default broker, or set MQ_BROKER')
    if queues := os.environ.get('MQ_QUEUES'):
        from .loader import load_queues

        load_queues(queues)
    return dsn


def _sync_broker(broker: Any) -> SyncBroker:
    if isinstance(broker, SyncBroker):
        return broker
    if isinstance(broker, str):
        return _connected(broker)
    if broker is None:
        broker = default_broker_or_none()
        if broker is None:
            return _connected(_env_dsn())
    if not isinstance(broker, AbstractQueueBroker):
        raise ConfigurationError(f'broker={broker!r}: expected a SyncBroker, a broker or a DSN')
    with _lock:  # an async broker, driven from a SyncBroker's thread of its own
        wrapped = _wrapped.get(broker)
        if wrapped is None or wrapped.closed:
            wrapped = _wrapped[broker] = SyncBroker(broker)
        return wrapped


def _connected(dsn: str) -> SyncBroker:
    with _lock:
        sync = _from_env.get(dsn)
        if sync is None or sync.closed:
            sync = _from_env[dsn] = connect(dsn)
        return sync


def _async_broker(broker: AbstractQueueBroker | None) -> AbstractQueueBroker:
    if broker is not None:
        return broker
    default = default_broker_or_none()
    if default is not None:
        return default
    from .factory import broker_from_dsn

    dsn = _env_dsn()
    key = (dsn, id(asyncio.get_running_loop()))  # a broker's connections belong to one loop
    made = _async_from_env.get(key)
    if made is None:
        made = _async_from_env[key] = broker_from_dsn(dsn)
    return made
