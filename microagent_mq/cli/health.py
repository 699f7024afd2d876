"""``/livez`` and ``/readyz`` over plain HTTP, served from the event loop itself.

Served by the loop it reports on: an answer to ``/livez`` proves the loop is responsive.
``/readyz`` asks a readiness check (a coroutine returning ``(ready, details)``).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

log = logging.getLogger('microagent_mq.cli')
ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]
REQUEST_TIMEOUT_S = 5.0


class HealthServer:
    """A tiny HTTP/1.0 server with two paths; anything else is 404."""

    def __init__(self, port: int, ready: ReadyCheck, host: str = '0.0.0.0') -> None:
        self.port, self.host, self._ready = port, host, ready
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; the port is taken or this raises ``OSError``."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info('Health checks on http://%s:%d/livez and /readyz', self.host, self.port)

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                request = await reader.readline()
                while (await reader.readline()).strip():  # headers: not needed
                    pass
                parts = request.decode('latin-1').split()
                path = parts[1] if len(parts) > 1 else ''
                status, body = await self._answer(path)
            payload = orjson.dumps(body)
            writer.write(f'HTTP/1.0 {status}\r\nContent-Type: application/json\r\n'
                         f'Content-Length: {len(payload)}\r\n\r\n'.encode() + payload)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, path: str) -> tuple[str, dict[str, Any]]:
        if path == '/livez':
            return '200 OK', {'status': 'ok'}
        if path == '/readyz':
            try:
                ready, details = await self._ready()
            except Exception as exc:
                ready, details = False, {'error': repr(exc)}
            return ('200 OK' if ready else '503 Service Unavailable'), {
                'status': 'ready' if ready else 'not ready', **details}
        return '404 Not Found', {'error': f'no such path {path!r}; try /livez or /readyz'}
