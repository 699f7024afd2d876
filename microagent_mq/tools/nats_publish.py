"""One store into JetStream, awaited until the server acknowledged it: ``js.publish``, shorter.

nats-py's ``JetStreamContext.publish`` is a request: a future in the connection's response
map, resolved by the response subscription's callback and awaited through
``asyncio.wait_for`` (a second future and callback: one more turn of the event loop before the
sender resumes, with whatever else is ready running first), then the ack parsed with ``json``
into a ``PubAck``. A send only needs to know the message was stored. Here the callback of this
broker's ack inbox resolves the very future the sender awaits, a timer bounds the wait, and the
ack is read with orjson. Failures are nats-py's own: no stream for the subject raises
``NoStreamResponseError``, an ``error`` in the ack its ``APIError``, no ack in time
``nats.errors.TimeoutError``.

A batch (``Stores.batch``: a ``send_many``) publishes every store at once and waits for all
their acks together, as ``js.publish_async`` does, without what that costs a message: a
semaphore, random token bytes from the OS, a done callback, a ``PubAck`` dataclass from
``json``. At most ``BATCH_PENDING`` acks are awaited at a time, as nats-py bounds its own.
"""

import asyncio
import itertools

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client as NATSClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

NO_RESPONDERS = '503'
BATCH_PENDING = 4000  # a batch's stores awaiting their ack at once (nats-py's default bound)


class Stores:
    """Publishes with a reply to this connection's ack inbox and waits for each ack."""

    def __init__(self, client: NATSClient, timeout: float) -> None:
        self._client = client
        self._timeout = timeout
        self._prefix = client.new_inbox()
        self._tokens = itertools.count()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._sub: Subscription | None = None

    async def start(self) -> None:
        """Listen on the ack inbox (nats-py subscribes it again after a reconnect)."""
        self._sub = await self._client.subscribe(f'{self._prefix}.*', cb=self._on_ack)

    async def _on_ack(self, msg: Msg) -> None:
        future = self._waiting.get(msg.subject[len(self._prefix) + 1:])
        if future is not None and not future.done():
            future.set_result(msg)

    def _expire(self, token: str) -> None:
        future = self._waiting.get(token)
        if future is not None and not future.done():
            future.set_exception(nats.errors.TimeoutError())

    def _expect(self) -> tuple[str, str, asyncio.Future[Msg]]:
        """A new token, the reply subject that carries it, and the future its ack resolves."""
        token = str(next(self._tokens))
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        return token, f'{self._prefix}.{token}', future

    def _forget(self, tokens: list[str]) -> None:
        for token in tokens:
            self._waiting.pop(token, None)

    def batch(self, timeout: float) -> 'StoreBatch':
        """Stores published at once and acknowledged together (``timeout``: for each wait)."""
        return StoreBatch(self, timeout)

    async def store(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        """Publish to ``subject`` and return once JetStream stored it; raise if it did not."""
        token, reply, future = self._expect()
        timer = asyncio.get_running_loop().call_later(self._timeout, self._expire, token)
        try:
            await self._client.publish(subject, body, reply=reply, headers=headers)
            ack = await future
        finally:
            timer.cancel()
            del self._waiting[token]
        check_ack(ack)


class StoreBatch:
    """The stores of one batch: ``add`` publishes, ``wait`` returns once all were stored."""

    def __init__(self, stores: Stores, timeout: float) -> None:
        self._stores = stores
        self._timeout = timeout
        self._tokens: list[str] = []
        self._acks: list[asyncio.Future[Msg]] = []

    async def add(self, subject: str, body: bytes, headers: dict[str, str]) -> None:
        if len(self._acks) >= BATCH_PENDING:
            await self.wait()
        token, reply, future = self._stores._expect()
        self._tokens.append(token)
        self._acks.append(future)
        await self._stores._client.publish(subject, body, reply=reply, headers=headers)

    async def wait(self) -> None:
        """Wait for every ack so far; raise the first failure (``TimeoutError`` past the timeout)."""
        tokens, acks, self._tokens, self._acks = self._tokens, self._acks, [], []
        if not acks:
            return
        try:
            replies = await asyncio.wait_for(asyncio.gather(*acks), self._timeout)
        finally:
            self._stores._forget(tokens)
        for reply in replies:
            check_ack(reply)

    async def settle(self) -> None:
        """Wait for the acks so far, whatever they say (the batch ends in an error of its own)."""
        try:
            await self.wait()
        except Exception:  # the caller raises its own error
            pass

    def forget(self) -> None:
        """Stop waiting for the acks so far."""
        self._stores._forget(self._tokens)
        self._tokens, self._acks = [], []


def check_ack(ack: Msg) -> None:
    """Raise what nats-py's ``js.publish`` raises for an ack that is not a stored message."""
    if not ack.data:
        if ack.headers and ack.headers.get('Status') == NO_RESPONDERS:
            raise nats.js.errors.NoStreamResponseError
        raise nats.errors.Error(f'empty publish ack (headers {ack.headers!r})')
    try:
        reply = orjson.loads(ack.data)
    except orjson.JSONDecodeError as exc:
        raise nats.errors.Error(f'unreadable publish ack {ack.data[:200]!r}') from exc
    if 'error' in reply:
        raise nats.js.errors.APIError.from_error(reply['error'])
