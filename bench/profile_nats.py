"""What one NATS end-to-end message costs: ``python -m bench.profile_nats SYSTEM N [--profile|--trace]``.

Runs the ``end_to_end`` scenario (N sequential awaited sends, the consumer in the same
process) on ``nats`` or ``nats-raw`` and counts, per message: protocol commands written by
kind (a JetStream publish, a pull request, an ack, ...), socket writes, messages received by
kind, and CPU µs. With ``--profile``, the top of a cProfile by total time too. Counting is
done by wrapping nats-py's client, the same wrapper for both systems. With ``--trace``
(instead of the counts): every socket read and write timed, the medians of the two halves of
a send's cycle (``print_critical_path``) and 40 consecutive reads and writes.
"""

import asyncio
import cProfile
import pstats
import resource
import statistics
import sys
import time
from collections import Counter

from nats.aio.client import Client

from .systems import SYSTEMS, message

written: Counter[str] = Counter()
received: Counter[str] = Counter()


def kind_of(subject: str) -> str:
    if subject.startswith('$JS.API.CONSUMER.MSG.NEXT'):
        return 'pull request'
    if subject.startswith('$JS.ACK'):
        return 'ack'
    if subject.startswith('$JS.API'):
        return 'api request'
    if subject.startswith('_INBOX'):
        return 'inbox'
    return 'publish'


def wrap() -> None:
    send_publish, process_msg = Client._send_publish, Client._process_msg

    async def counted_publish(self: Client, subject: str, reply: str, *args: object) -> None:
        written[kind_of(subject)] += 1
        await send_publish(self, subject, reply, *args)  # type: ignore[arg-type]

    async def counted_msg(self: Client, sid: int, subject: bytes, reply: bytes, data: bytes,
                          *args: object) -> None:
        if reply.startswith(b'$JS.ACK'):
            received['stream message'] = received['stream message'] + 1
        elif not data:
            received['status / empty'] += 1
        else:
            received['reply with data (publish ack, api)'] += 1
        await process_msg(self, sid, subject, reply, data, *args)  # type: ignore[arg-type]

    Client._send_publish = counted_publish  # type: ignore[method-assign]
    Client._process_msg = counted_msg  # type: ignore[method-assign]


def count_socket_writes() -> Counter[str]:
    writes: Counter[str] = Counter()
    from asyncio import selector_events
    transport = selector_events._SelectorSocketTransport
    write, writelines = transport.write, transport.writelines

    def counted_write(self: object, data: object) -> None:
        writes['transport.write'] += 1
        write(self, data)  # type: ignore[arg-type]

    def counted_writelines(self: object, lines: object) -> None:
        writes['transport.writelines'] += 1
        writelines(self, lines)  # type: ignore[arg-type]

    transport.write = counted_write  # type: ignore[method-assign]
    transport.writelines = counted_writelines  # type: ignore[method-assign]
    return writes


async def main(name: str, n: int, profile: bool, trace: bool = False) -> None:
    log: list[tuple[float, str, bytes]] = []
    if trace:
        trace_wire(log)
    else:
        wrap()
    writes = count_socket_writes()
    system = SYSTEMS[name]()
    await system.setup()
    try:
        await system.start_consumer()
        await asyncio.sleep(0.2)
        written.clear()
        received.clear()
        writes.clear()
        log.clear()
        done = system.handled.expect(n)
        profiler = cProfile.Profile()
        if profile:
            profiler.enable()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu, start = time.process_time(), time.perf_counter()
        for i in range(n):
            await system.send(message(i))
        finished = await asyncio.wait_for(done, 120)
        cpu_us = (time.process_time() - cpu) / n * 1e6
        after = resource.getrusage(resource.RUSAGE_SELF)
        user_us = (after.ru_utime - usage.ru_utime) / n * 1e6
        sys_us = (after.ru_stime - usage.ru_stime) / n * 1e6
        profiler.disable()
        print(f'{name}: {n / (finished - start):,.0f} msg/s, {cpu_us:.0f} µs CPU/msg '
              f'(user {user_us:.0f}, system {sys_us:.0f})')
        counted = (('socket', writes),) if trace else (
            ('written', written), ('received', received), ('socket', writes))
        for title, counts in counted:
            print(f'  {title}: ' + ', '.join(f'{k} {v / n:.2f}' for k, v in sorted(counts.items())))
        if trace:
            print_critical_path(log)
            t0 = log[len(log) // 2][0]
            for t, way, data in log[len(log) // 2:len(log) // 2 + 40]:
                print(f'{(t - t0) * 1e6:8.0f} µs {way} {summary(data)}')
        if profile:
            pstats.Stats(profiler).sort_stats('tottime').print_stats(30)
    finally:
        await system.teardown()



def trace_wire(log: list[tuple[float, str, bytes]]) -> None:
    """Record every socket write and read with its time (``--trace``)."""
    from asyncio import selector_events, streams
    transport = selector_events._SelectorSocketTransport
    write = transport.write
    data_received = streams.StreamReaderProtocol.data_received

    def traced_write(self: object, data: bytes) -> None:
        log.append((time.perf_counter(), 'W', bytes(data)))
        write(self, data)  # type: ignore[arg-type]

    def traced_received(self: object, data: bytes) -> None:
        log.append((time.perf_counter(), 'R', bytes(data)))
        data_received(self, data)  # type: ignore[arg-type]

    transport.write = traced_write  # type: ignore[method-assign]
    streams.StreamReaderProtocol.data_received = traced_received  # type: ignore[method-assign]


def print_critical_path(log: list[tuple[float, str, bytes]]) -> None:
    """Split each send's cycle: from reading its store ack to writing the next send (this
    process's work on the critical path, the consumer's included when it runs first), and
    from that write to reading its ack (the server, the network and wake-ups)."""
    ours: list[float] = []
    server: list[float] = []
    acked = written = None
    for t, way, data in log:
        if way == 'R' and b'"seq"' in data:  # a store ack (JSON with the stream sequence)
            if written is not None:
                server.append(t - written)
                written = None
            acked = t
        elif way == 'W' and b'HPUB' in data:  # a send (with headers; acks and pulls have none)
            if acked is not None:
                ours.append(t - acked)
                acked = None
            written = t
    print(f'  critical path, medians: store ack read -> next send written '
          f'{statistics.median(ours) * 1e6:.0f} µs; send written -> its ack read '
          f'{statistics.median(server) * 1e6:.0f} µs')


def summary(data: bytes) -> str:
    ops = []
    for line in data.split(b'\r\n'):
        word = line.split(b' ', 1)[0]
        if word in (b'PUB', b'HPUB', b'MSG', b'HMSG'):
            subject = line.split(b' ')[1].decode()
            ops.append(f'{word.decode()} {kind_of(subject) if word in (b"PUB", b"HPUB") else subject[:28]}')
    return '; '.join(ops)


if __name__ == '__main__':
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), '--profile' in sys.argv, '--trace' in sys.argv))
