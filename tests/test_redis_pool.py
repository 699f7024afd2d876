"""The broker's Redis pool takes and gives back free connections itself (``tools/redis_pool``):
what redis-py's own path guarantees must still hold on that lean path."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from microagent_mq.tools import redis_pool
from microagent_mq.tools.redis_pool import WaitingPool

from .conftest import REDIS_DSN, require_server, wait_until

pytestmark = pytest.mark.redis


@pytest.fixture
async def pool() -> AsyncIterator[WaitingPool]:
    require_server('redis')
    pool = WaitingPool.from_url(REDIS_DSN, max_connections=3)
    yield pool
    await pool.disconnect()


def test_the_lean_path_is_on_with_this_redis_py() -> None:
    assert redis_pool.LEAN  # else the tests below test redis-py's path only


async def test_a_connection_given_back_with_a_reply_unread_is_not_handed_out_as_is(
        pool: WaitingPool) -> None:
    conn: Any = await pool.get_connection()
    await conn.send_command('PING')  # its reply is never read
    await wait_until(conn.can_read, timeout_s=5, what='the PONG to arrive')
    await pool.release(conn)
    again: Any = await pool.get_connection()
    try:
        await again.send_command('ECHO', 'mine')
        assert await again.read_response() == b'mine'  # not the stale PONG
    finally:
        await pool.release(again)


async def test_taking_and_giving_back_keep_the_pool_in_step(pool: WaitingPool) -> None:
    # 20 users of 3 connections: those past the limit wait for a release.
    async def use(i: int) -> bytes:
        conn: Any = await pool.get_connection()
        try:
            await conn.send_command('ECHO', str(i))
            reply: bytes = await conn.read_response()
            await asyncio.sleep(0.001)
            return reply
        finally:
            await pool.release(conn)

    replies = await asyncio.gather(*(use(i) for i in range(20)))
    assert replies == [str(i).encode() for i in range(20)]
    assert not pool._in_use_connections
    assert len(pool._available_connections) == 3  # never more than max_connections made


async def test_a_connection_marked_for_reconnect_is_disconnected_when_given_back(
        pool: WaitingPool) -> None:
    conn: Any = await pool.get_connection()
    conn._should_reconnect = True  # as redis-py's maintenance notifications mark one
    await pool.release(conn)
    assert not conn.is_connected
    again: Any = await pool.get_connection()  # connects again on the way out
    try:
        await again.send_command('PING')
        assert await again.read_response() in (b'PONG', 'PONG')
    finally:
        await pool.release(again)
