"""The fault proxy itself, against a small echo server of the test's own."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from .conftest import wait_until
from .faults import FaultProxy


class Echo:
    """An echo server that also records what reached it."""

    def __init__(self) -> None:
        self.received = b''
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                self.received += data
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, '127.0.0.1', 0)
        return int(self.server.sockets[0].getsockname()[1])


@pytest.fixture
async def echo_proxy() -> AsyncIterator[tuple[Echo, FaultProxy]]:
    echo = Echo()
    port = await echo.start()
    async with FaultProxy(port) as proxy:
        yield echo, proxy
    assert echo.server is not None
    echo.server.close()


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection('127.0.0.1', proxy.port)


async def read_or_eof(reader: asyncio.StreamReader, count: int) -> bytes:
    """What arrives before the connection ends (empty when it is cut)."""
    try:
        return await asyncio.wait_for(reader.readexactly(count), 10)
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except ConnectionError:
        return b''


async def roundtrip(proxy: FaultProxy, data: bytes) -> bytes:
    reader, writer = await connect(proxy)
    writer.write(data)
    reply = await read_or_eof(reader, len(data))
    writer.close()
    return reply


async def test_forwards_both_ways(echo_proxy: tuple[Echo, FaultProxy]) -> None:
    echo, proxy = echo_proxy
    assert await roundtrip(proxy, b'hello') == b'hello'
    assert echo.received == b'hello'
    assert proxy.accepted == 1


async def test_cut_ends_every_connection_and_new_ones_work(
        echo_proxy: tuple[Echo, FaultProxy]) -> None:
    _, proxy = echo_proxy
    clients = [await connect(proxy) for _ in range(3)]
    await wait_until(lambda: proxy.connections == 3, what='three connections')
    assert proxy.cut() == 3
    for reader, writer in clients:
        assert await read_or_eof(reader, 1) == b''  # EOF or reset: the connection is gone
        writer.close()
    await wait_until(lambda: proxy.connections == 0, what='links forgotten')
    assert await roundtrip(proxy, b'again') == b'again'


async def test_stall_holds_bytes_until_resume(echo_proxy: tuple[Echo, FaultProxy]) -> None:
    echo, proxy = echo_proxy
    reader, writer = await connect(proxy)
    proxy.stall()
    writer.write(b'held')
    await wait_until(lambda: proxy.held == 4, what='bytes held by the stall')
    assert echo.received == b''  # read by the proxy, not forwarded
    proxy.resume()
    assert await read_or_eof(reader, 4) == b'held'
    assert echo.received == b'held'
    writer.close()


async def test_lost_reply_reaches_the_server_but_not_the_client(
        echo_proxy: tuple[Echo, FaultProxy]) -> None:
    echo, proxy = echo_proxy
    proxy.lose_next_reply()
    assert await roundtrip(proxy, b'request') == b''  # the reply died in the proxy
    assert echo.received == b'request'  # ... after the server had served the request
    assert proxy.cuts == 1
    assert await roundtrip(proxy, b'next') == b'next'  # one reply only


async def test_latency_delays_each_chunk_and_keeps_order(
        echo_proxy: tuple[Echo, FaultProxy]) -> None:
    _, proxy = echo_proxy
    proxy.latency_s = 0.2
    loop = asyncio.get_running_loop()
    reader, writer = await connect(proxy)
    started = loop.time()
    for n in range(5):
        writer.write(b'%d' % n)
        await writer.drain()
    assert await read_or_eof(reader, 5) == b'01234'
    # A lower bound only (load can make it later, never sooner): there and back, delayed.
    assert loop.time() - started >= 0.4
    writer.close()


async def test_refuse_closes_new_connections(echo_proxy: tuple[Echo, FaultProxy]) -> None:
    echo, proxy = echo_proxy
    proxy.refuse = True
    assert await roundtrip(proxy, b'x') == b''
    assert echo.received == b''
    proxy.refuse = False
    assert await roundtrip(proxy, b'y') == b'y'
