"""``wait_until``: poll a condition with a deadline instead of sleeping."""

import asyncio
import inspect
from collections.abc import Awaitable, Callable


async def wait_until(condition: Callable[[], object | Awaitable[object]], timeout_s: float = 10.0,
                     interval_s: float = 0.01) -> None:
    """Poll ``condition`` (sync or async) until it is true; ``TimeoutError`` after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await asyncio.sleep(interval_s)
