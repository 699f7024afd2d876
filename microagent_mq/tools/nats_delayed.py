"""Delayed sends on NATS JetStream 2.9, which has no scheduled delivery: a stream and a mover.

A delayed message waits in its queue's ``-delayed`` stream (header ``Mq-Due``). Every broker
consuming the queue runs a mover for it, pulling from the durable consumer ``mover``: a due
message is stored into the queue (de-duplicated by its id: a move repeated after a crash is
stored once), then acked; one not due yet is given back with ``nak(delay=time left)``, so no
message ever waits behind another. A mover stopped while holding messages leaves them to its
``ack_wait``: they arrive that much later, never lost. A due message that finds its queue
full (``max_length``, overflow 'reject') waits in the delayed stream, tried again every
``FULL_RETRY_S``: never dropped.
"""

import asyncio
import time
from typing import TYPE_CHECKING

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from ..exceptions import QueueFull
from .nats_codec import DUE, MOVER, copy_headers, int_header, message_id_of

if TYPE_CHECKING:
    from .nats import NATSBroker

MOVER_FETCH_S = 0.5
MOVER_ACK_WAIT_S = 30.0
FAILURE_PAUSE_S = 1.0
FULL_RETRY_S = 1.0


class DelayedMover:
    """One task per watched queue, owned here, stopped with ``stop()``."""

    def __init__(self, broker: 'NATSBroker') -> None:
        self._broker = broker
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()

    async def watch(self, queue: str) -> None:
        """Start moving the delayed messages of ``queue`` (once per queue)."""
        task = self._tasks.get(queue)
        if task is not None and not task.done():
            return
        broker = self._broker
        js = await broker.jetstream()
        stream = broker.names.delayed_stream(queue)
        await broker.ensure_stream(stream, broker.names.delayed_subject(queue))
        await js.add_consumer(stream, api.ConsumerConfig(
            durable_name=MOVER, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=MOVER_ACK_WAIT_S,
            max_deliver=-1, max_ack_pending=-1))
        pull = await js.pull_subscribe_bind(MOVER, stream=stream)
        if self._stop.is_set():  # set by an earlier stop: this is a new start
            self._stop = asyncio.Event()
        self._tasks[queue] = asyncio.create_task(self._run(queue, pull),
                                                 name=f'nats-delayed-mover:{queue}')

    async def stop(self) -> None:
        """Stop every mover: each ends after its fetch in progress (cancelled past a bound)."""
        self._stop.set()
        tasks, self._tasks = list(self._tasks.values()), {}
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=MOVER_FETCH_S + 2)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, queue: str, pull: JetStreamContext.PullSubscription) -> None:
        log = self._broker.log
        failing = False
        try:
            while not self._stop.is_set():
                try:
                    msgs = await pull.fetch(100, timeout=MOVER_FETCH_S)
                    await self._move(queue, msgs)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except Exception as exc:  # what was not moved comes back after MOVER_ACK_WAIT_S
                    if not failing:
                        log.warning('Moving delayed messages of %s failed: %r; will retry', queue, exc)
                    failing = True
                    await asyncio.sleep(FAILURE_PAUSE_S)
                    continue
                if failing:
                    log.warning('Moving delayed messages of %s works again', queue)
                    failing = False
        finally:
            try:
                await pull.unsubscribe()
            except Exception:  # the connection may be gone already
                pass

    async def _move(self, queue: str, msgs: list[Msg]) -> None:
        broker = self._broker
        now_ms = time.time() * 1000
        for msg in msgs:
            due_ms = int_header(msg.headers, DUE, 0)
            if due_ms > now_ms:
                await msg.nak(delay=(due_ms - now_ms) / 1000)
                continue
            await broker.ensure_queue(queue)
            message_id = message_id_of(msg.headers, f'delayed-{msg.metadata.sequence.stream}')
            try:
                await broker.store(queue, msg.data, copy_headers(msg.headers, message_id, message_id))
            except QueueFull:
                await msg.nak(delay=FULL_RETRY_S)  # accepted already: it waits for room
                continue
            await msg.ack()
