"""A TCP proxy for fault injection: toxiproxy's model, small enough to read in one sitting.

A test (or the chaos run) starts ``FaultProxy(upstream_port)`` on a free loopback port and
points its client at ``proxy.port`` instead of the server. Faults touch only the
connections through this proxy, never anyone else's connections to the same server:

``cut()``              abort every live connection now (both sides see a reset).
``latency_s = x``      every chunk, each way, arrives ``x`` seconds late (order kept).
``stall()`` / ``resume()``  stop forwarding; bytes are held, not lost, until resume.
``lose_next_reply()``  the next request goes through, its reply is dropped, and that
                       connection is cut: the server did the work, the client never heard.
``refuse = True``      new connections are closed at once (a server that is down).
"""

import asyncio
import contextlib
from dataclasses import dataclass, field

CHUNK = 65536


@dataclass(eq=False)
class _Link:
    """One client connection and its upstream connection."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    awaiting_reply: bool = False  # armed by lose_next_reply: drop the next upstream chunk
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            writer.transport.abort()


class FaultProxy:
    """``async with FaultProxy(port) as proxy``: clients connect to ``proxy.port``."""

    def __init__(self, upstream_port: int, upstream_host: str = '127.0.0.1') -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency_s = 0.0
        self.refuse = False
        self.accepted = 0  # connections accepted so far (tests wait on reconnects with it)
        self.cuts = 0  # connections aborted by cut() or a lost reply
        self.held = 0  # bytes read but not yet forwarded (a stall holds them here)
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._lose_reply = False
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, 'start() the proxy first'
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Connections open through the proxy right now."""
        return len(self._links)

    async def start(self) -> 'FaultProxy':
        self._server = await asyncio.start_server(self._accept, '127.0.0.1', 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut()
        self._flowing.set()
        # The pumps end by themselves once their connections are aborted; cancelling a
        # start_server handler instead would make asyncio log an error.
        if tasks := [task for link in self._links for task in link.tasks]:
            _, late = await asyncio.wait(tasks, timeout=5 + self.latency_s)
            for task in late:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> 'FaultProxy':
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # faults -----------------------------------------------------------------------------

    def cut(self) -> int:
        """Abort every live connection; returns how many were cut."""
        links = list(self._links)
        for link in links:
            link.abort()
        self.cuts += len(links)
        return len(links)

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def lose_next_reply(self) -> None:
        """Let the next client request reach the server, drop its reply, cut that connection."""
        self._lose_reply = True

    # forwarding -------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:  # the server is down: the client sees what it would see without us
            writer.transport.abort()
            return
        self.accepted += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        try:
            link.tasks = [asyncio.create_task(self._pump(link, reader, up_writer, upward=True)),
                          asyncio.create_task(self._pump(link, up_reader, writer, upward=False))]
            await asyncio.gather(*link.tasks)
        finally:
            link.abort()
            self._links.discard(link)

    async def _pump(self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    upward: bool) -> None:
        """Copy one direction, chunk by chunk, applying the faults in force."""
        loop = asyncio.get_running_loop()
        try:
            while chunk := await reader.read(CHUNK):
                due = loop.time() + self.latency_s
                self.held += len(chunk)
                try:
                    await self._flowing.wait()
                    if (delay := due - loop.time()) > 0:
                        await asyncio.sleep(delay)  # latency: chunks keep their order (one pump)
                finally:
                    self.held -= len(chunk)
                if upward and self._lose_reply:
                    self._lose_reply, link.awaiting_reply = False, True
                elif not upward and link.awaiting_reply:
                    self.cuts += 1
                    link.abort()  # the reply dies here: the request was already served
                    return
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                link.abort()
