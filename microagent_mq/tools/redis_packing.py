"""Stream reads and acks packed by hand, and their replies read straight off a connection.

redis-py encodes every argument of every command again (``pack_command``): for an ack of a
batch it encodes each entry id, for a shared read each stream key, and that was most of the
client's CPU in a drain. Here the ids (bytes already) and stream keys are framed as RESP bulk
strings directly, and a read's pipeline (acks, then the read) is one write and its replies.
"""

from typing import Any

from redis.exceptions import ResponseError

Entries = list[tuple[bytes, dict[bytes, bytes] | None]]  # as redis-py's xreadgroup gives them


def bulk(value: bytes) -> bytes:
    """``value`` as a RESP bulk string."""
    return b'$%d\r\n%s\r\n' % (len(value), value)


XREADGROUP, GROUP, COUNT, BLOCK, STREAMS, NEW, XACK, XDEL = (
    bulk(word) for word in (b'XREADGROUP', b'GROUP', b'COUNT', b'BLOCK', b'STREAMS', b'>',
                            b'XACK', b'XDEL'))


def ack_commands(stream: bytes, ids: list[bytes], group: bytes) -> bytes:
    """XACK and XDEL of ``ids``; ``stream`` and ``group`` already packed (``bulk``)."""
    packed = [bulk(entry_id) for entry_id in ids]
    return b''.join([b'*%d\r\n' % (3 + len(ids)), XACK, stream, group, *packed,
                     b'*%d\r\n' % (2 + len(ids)), XDEL, stream, *packed])


def read_command(group: bytes, name: bytes, count: int, block: int | None,
                 streams: list[bytes]) -> bytes:
    """XREADGROUP of new entries of ``streams`` (all already packed); no BLOCK if None."""
    head = [XREADGROUP, GROUP, group, name, COUNT, bulk(b'%d' % count)]
    if block is not None:
        head += [BLOCK, bulk(b'%d' % block)]
    return b''.join([b'*%d\r\n' % (len(head) + 1 + 2 * len(streams)), *head, STREAMS,
                     *streams, NEW * len(streams)])


async def read_replies(conn: Any, acks: int) -> Any:
    """The replies of ``acks`` ack pairs then a read, sent as one write: the read's reply.

    Every reply is read, even after an error (the connection stays in step); the first
    error is raised then.
    """
    failure: ResponseError | None = None
    for _ in range(2 * acks):
        try:
            await conn.read_response()
        except ResponseError as exc:
            failure = failure or exc
    reply = await conn.read_response()
    if failure is not None:
        raise failure
    return reply


def parse_read(reply: Any) -> list[tuple[bytes, Entries]]:
    """A raw XREADGROUP reply as (stream, entries): a map under RESP3, pairs under RESP2."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    return [(stream, [(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)) if flat else None)
                      for entry_id, flat in entries])
            for stream, entries in pairs]
