"""Item 11: a write whose reply is lost is retried by redis-py; it must not happen twice.

A tiny TCP proxy of the test's own sits between the broker and Redis: it forwards one chosen
request, swallows its reply and cuts that connection (Redis did the work, the client never
heard). Only this test's connections pass through it.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from microagent_mq import MicroAgent, Queue, Reject, consumer
from microagent_mq.tools.redis import RedisBroker
from microagent_mq.tools.redis_consumer import GROUP

from .conftest import REDIS_DSN, require_server, unique, wait_until

pytestmark = pytest.mark.redis


class LostReplyProxy:
    """Forwards TCP to ``upstream``; ``lose_reply_to(marker)`` arms it for one request."""

    def __init__(self, host: str, port: int) -> None:
        self._upstream = (host, port)
        self._marker: bytes | None = None
        self._watched = b'\0'  # the last marker armed: its requests are counted
        self.requests = 0  # requests that contained the watched marker (retries included)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.lost = 0  # replies swallowed

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, '127.0.0.1', 0)
        return int(self._server.sockets[0].getsockname()[1])

    def lose_reply_to(self, marker: bytes) -> None:
        """The next request containing ``marker`` goes through; its reply never comes back."""
        self._marker = self._watched = marker

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
                     ) -> None:
        upstream_in, upstream_out = await asyncio.open_connection(*self._upstream)
        doomed = asyncio.Event()  # set once this connection's next reply must be lost

        async def requests() -> None:
            while data := await client_in.read(65536):
                self.requests += self._watched in data
                if self._marker is not None and self._marker in data:
                    self._marker = None
                    doomed.set()
                upstream_out.write(data)
                await upstream_out.drain()

        async def replies() -> None:
            while data := await upstream_in.read(65536):
                if doomed.is_set():
                    self.lost += 1
                    break
                client_out.write(data)
                await client_out.drain()

        pumps = [asyncio.create_task(requests()), asyncio.create_task(replies())]
        self._tasks.update(pumps)
        with contextlib.suppress(Exception):
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
            self._tasks.discard(pump)
        for writer in (client_out, upstream_out):
            writer.close()


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[LostReplyProxy, RedisBroker, RedisBroker]]:
    """A proxy, a broker through it, and a direct broker with the same key prefix."""
    require_server('redis')
    parts = urlsplit(REDIS_DSN)
    proxy = LostReplyProxy(parts.hostname or '127.0.0.1', parts.port or 6379)
    port = await proxy.start()
    userinfo = parts.netloc.rpartition('@')[0]
    netloc = f'{userinfo}@127.0.0.1:{port}' if userinfo else f'127.0.0.1:{port}'
    prefix = f'test:{unique("ns")}:'
    through = RedisBroker(parts._replace(netloc=netloc).geturl(), prefix=prefix)
    direct = RedisBroker(REDIS_DSN, prefix=prefix)
    yield proxy, through, direct
    await through.close(grace=1)
    await proxy.close()
    client: Any = direct.client
    keys = [k async for k in client.scan_iter(match=f'{prefix}*')]
    if keys:
        await client.delete(*keys)
    await direct.close()


async def test_send_whose_reply_is_lost_is_stored_once(
        proxied: tuple[LostReplyProxy, RedisBroker, RedisBroker]) -> None:
    proxy, through, direct = proxied
    queue = Queue(unique())
    await through.send(queue.name, {'n': 1})  # connected, scripts loaded
    proxy.lose_reply_to(through.stream_key(queue.name).encode())
    await through.send(queue.name, {'n': 2})
    assert (proxy.lost, proxy.requests) == (1, 2)  # redis-py sent it again
    assert await direct.client.xlen(direct.stream_key(queue.name)) == 2


async def test_send_with_headers_whose_reply_is_lost_is_stored_once(
        proxied: tuple[LostReplyProxy, RedisBroker, RedisBroker]) -> None:
    # A typed message's send (headers: its type) takes a script of its own: as idempotent.
    proxy, through, direct = proxied
    queue = Queue(unique())
    await through.send(queue.name, {'n': 1}, headers={'k': 'v'})
    proxy.lose_reply_to(through.stream_key(queue.name).encode())
    await through.send(queue.name, {'n': 2}, headers={'k': 'v'})
    assert (proxy.lost, proxy.requests) == (1, 2)  # redis-py sent it again
    entries = await direct.client.xrange(direct.stream_key(queue.name))
    assert [fields[b'headers'] for _, fields in entries] == [b'{"k":"v"}', b'{"k":"v"}']


async def test_send_many_whose_reply_is_lost_is_stored_once(
        proxied: tuple[LostReplyProxy, RedisBroker, RedisBroker]) -> None:
    proxy, through, direct = proxied
    queue = Queue(unique())
    await through.send_many(queue.name, [{'n': 1}, {'n': 2}])
    proxy.lose_reply_to(through.stream_key(queue.name).encode())
    await through.send_many(queue.name, [{'n': 3}, {'n': 4}, {'n': 5}])
    assert (proxy.lost, proxy.requests) == (1, 2)  # redis-py sent it again
    assert await direct.client.xlen(direct.stream_key(queue.name)) == 5


async def test_reject_whose_reply_is_lost_dead_letters_once(
        proxied: tuple[LostReplyProxy, RedisBroker, RedisBroker]) -> None:
    proxy, through, direct = proxied
    queue = Queue(unique())

    class Agent(MicroAgent):
        @consumer(queue)
        async def handle(self, n: int) -> None:
            raise Reject('no')

    proxy.lose_reply_to(through.dead_key(queue.name).encode())
    agent = Agent(broker=through)
    await agent.start()
    await direct.send(queue.name, {'n': 1})
    await wait_until(lambda: proxy.requests == 2, what='redis-py sending it again')
    await agent.stop(grace=10)  # waits for that settlement to end
    assert proxy.lost == 1
    letters = await direct.dead_letters(queue.name)
    assert [letter.data for letter in letters] == [{'n': 1}]
    client: Any = direct.client
    summary = await client.xpending(direct.stream_key(queue.name), GROUP)
    assert int(summary['pending']) == 0


async def test_read_whose_reply_is_lost_costs_no_attempt(
        proxied: tuple[LostReplyProxy, RedisBroker, RedisBroker]) -> None:
    """The entries of a read whose reply was lost wait in this consumer's pending list; it
    takes them back after the visibility timeout as the attempt they were (no handler ran)."""
    proxy, through, direct = proxied
    queue = Queue(unique())
    handled: list[int] = []

    class Agent(MicroAgent):
        @consumer(queue, timeout=0.5, visibility_timeout=1, max_attempts=1)
        async def handle(self, n: int) -> None:
            handled.append(n)

    await direct.send(queue.name, {'n': 1})
    proxy.lose_reply_to(b'XREADGROUP')
    await Agent(broker=through).start()
    await wait_until(lambda: handled == [1], what='the message handled')
    assert proxy.lost == 1
    assert await direct.dead_letters(queue.name) == []
