"""``NATSBroker``: queues on NATS JetStream, one stream and one durable pull consumer per queue.

Layout and wire format: ``nats_codec``. Exchanges are routed here, by the declared queues
(as on Redis): a send to an exchange stores one copy in the stream of each queue whose
topics match (AMQP rules, ``routing.py``). NATS wildcards are not used for it: JetStream
refuses two streams whose subjects overlap, so one subject could never feed several queues.
``send(delay=)``: ``nats_delayed``; consuming, acks and attempts: ``nats_consumer``; dead
letters: ``nats_dlq``; queue options (retention, max_length, no priorities): ``nats_options``,
``nats_bounded``, ``nats_retained``.
"""

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client as NATSClient
    from nats.js import JetStreamContext, api
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("NATSBroker needs nats-py: pip install 'microagent-mq[nats]'") from exc

from ..broker import AbstractQueueBroker
from ..consumer import Consumer
from ..dsn import mask_dsn, parse_dsn
from ..exceptions import BrokerUnavailable, ConfigurationError, QueueFull
from ..transport import DeadLetter, Outgoing, Retained, Subscription
from .nats_bounded import Bound
from .nats_codec import (
    CONSUMER,
    DUE,
    PREFIX_RE,
    Names,
    message_headers,
)
from .nats_consumer import NATSSubscription
from .nats_delayed import DelayedMover
from .nats_dlq import dead_letters, requeue_dead_letters
from .nats_options import PlannedSend, QueuePlan, plan_of
from .nats_publish import Stores
from .nats_retained import retained

ERRORS = (nats.errors.Error, asyncio.TimeoutError, ConnectionError, OSError)
STREAM_EXISTS = 10058  # "stream name already in use with a different configuration"
DUPLICATE_WINDOW_S = 120.0  # a send retried within this is stored once (Nats-Msg-Id)
FREE_MAX_AGE_S = 30 * 24 * 3600.0  # free-delivery records of messages never settled expire
# nats-py's publish_async futures have no timeout: acks lost with a connection never come.
BATCH_ACK_TIMEOUT_S = 5.0
STORE_ACK_TIMEOUT_S = 5.0  # one send's ack, as nats-py's js.publish waits by default


@dataclass(repr=False, eq=False)
class NATSBroker(AbstractQueueBroker):
    """``NATSBroker('nats://[user:password@]host:4222')``; also ``tls://``. Needs JetStream.

    ``prefix``: starts every stream and subject name, so applications can share a server.
    ``connect_timeout``: seconds for one connection attempt; nats-py reconnects by itself.
    ``send_timeout``: seconds a send keeps retrying (de-duplicated by JetStream) before it
    raises ``BrokerUnavailable``.
    """

    prefix: str = 'mq'
    connect_timeout: float = 2.0
    send_timeout: float = 15.0

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_dsn(self.dsn, ('nats', 'tls'))
        if not isinstance(self.prefix, str) or not PREFIX_RE.match(self.prefix):
            raise ConfigurationError(f'invalid prefix {self.prefix!r}: letters, digits and _ expected')
        self.names = Names(self.prefix)
        self._client: NATSClient | None = None
        self._js: JetStreamContext | None = None
        self._stores: Stores | None = None
        self._connecting = asyncio.Lock()
        self._streams: set[str] = set()
        self._plans: dict[str, QueuePlan | None] = {}  # queue options (nats_options), per queue
        self._bounds: dict[str, Bound] = {}  # bounded queues' counts (nats_bounded)
        self._mover = DelayedMover(self)

    # connection ---------------------------------------------------------------------------

    async def jetstream(self) -> JetStreamContext:
        """The JetStream context of the broker's one connection, made on first use."""
        if self._js is not None and self._client is not None and not self._client.is_closed:
            return self._js
        async with self._connecting:
            if self._js is None or self._client is None or self._client.is_closed:
                try:
                    # nats-py's first connect obeys max_reconnect_attempts too, and -1 would
                    # retry forever: two tries here (the caller retries within its own bound),
                    # then reconnect forever once connected.
                    client = await nats.connect(
                        self.dsn, name=f'microagent_mq {self.uid}', connect_timeout=self.connect_timeout,
                        max_reconnect_attempts=1, reconnect_time_wait=0.5,
                        error_cb=self._on_error, disconnected_cb=self._on_disconnect,
                        reconnected_cb=self._on_reconnect)
                except ERRORS as exc:
                    raise BrokerUnavailable(f'NATS at {mask_dsn(self.dsn)} is unreachable: {exc!r}') from exc
                client.options['max_reconnect_attempts'] = -1
                stores = Stores(client, STORE_ACK_TIMEOUT_S)
                try:
                    await stores.start()
                except ERRORS as exc:
                    await client.close()
                    raise BrokerUnavailable(f'NATS at {mask_dsn(self.dsn)} failed: {exc!r}') from exc
                self._client, self._stores = client, stores
                self._js = self._client.jetstream()
                self._streams.clear()
            return self._js

    @property
    def stores(self) -> Stores:
        """Single stores awaited until acknowledged; only valid after ``jetstream()`` was awaited."""
        assert self._stores is not None, 'not connected'
        return self._stores

    @property
    def client(self) -> NATSClient:
        """The connection; only valid after ``jetstream()`` was awaited."""
        assert self._client is not None, 'not connected'
        return self._client

    async def _on_error(self, exc: Exception) -> None:
        self.log.warning('NATS connection error: %r', exc)

    async def _on_disconnect(self) -> None:
        if self._client is None or self._client.is_closed:
            return  # our own close()
        self.log.warning('Disconnected from NATS at %s; reconnecting', mask_dsn(self.dsn))

    async def _on_reconnect(self) -> None:
        self.log.warning('Reconnected to NATS at %s', mask_dsn(self.dsn))

    async def _disconnect(self) -> None:
        await self._mover.stop()
        client = self._client
        self._streams.clear()
        if client is not None and not client.is_closed:
            self._client = self._js = self._stores = None
            await client.close()

    # declarations -------------------------------------------------------------------------

    async def ensure_stream(self, name: str, subject: str, work_queue: bool = True,
                            max_age: float | None = None, update: bool = False) -> None:
        """Create stream ``name`` capturing ``subject`` unless this broker did already.

        One that exists with another configuration is changed if ``update`` (a journal whose
        retention changed), else refused.
        """
        if name in self._streams:
            return
        js = await self.jetstream()
        retention = api.RetentionPolicy.WORK_QUEUE if work_queue else api.RetentionPolicy.LIMITS
        window = min(DUPLICATE_WINDOW_S, max_age) if max_age else DUPLICATE_WINDOW_S
        config = api.StreamConfig(name=name, subjects=[subject], retention=retention, max_age=max_age,
                                  storage=api.StorageType.FILE, duplicate_window=window)
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_EXISTS:
                raise
            if not update:
                raise ConfigurationError(f'NATS stream {name} exists with another configuration: '
                                         f'edit or delete it to match') from None
            self.log.warning('Changing NATS stream %s to max_age %ss', name, max_age)
            await js.update_stream(config)
        self._streams.add(name)

    def forget_stream(self, name: str) -> None:
        """Declare stream ``name`` again on next use (it may have been deleted)."""
        self._streams.discard(name)

    def plan(self, queue: str) -> QueuePlan | None:
        """What ``queue``'s options need (None: a plain queue); raises for priorities."""
        try:
            return self._plans[queue]
        except KeyError:
            plan = self._plans[queue] = plan_of(queue)
            return plan

    def bound(self, plan: QueuePlan) -> Bound:
        """The count and stores of bounded queue ``plan.queue``."""
        bound = self._bounds.get(plan.queue)
        if bound is None:
            bound = self._bounds[plan.queue] = Bound(self, plan)
        return bound

    async def ensure_queue(self, queue: str) -> None:
        stream = self.names.stream(queue)
        if stream not in self._streams:
            self.plan(queue)  # refuses what JetStream cannot do (priorities) before anything is made
            await self.ensure_stream(stream, self.names.subject(queue))

    async def ensure_journal(self, plan: QueuePlan) -> None:
        names = self.names
        await self.ensure_stream(names.journal_stream(plan.queue), names.journal_subject(plan.queue),
                                 work_queue=False, max_age=plan.retention_s, update=True)

    async def ensure_free(self, queue: str) -> None:
        await self.ensure_stream(self.names.free_stream(queue), self.names.free_subject(queue, '*'),
                                 work_queue=False, max_age=FREE_MAX_AGE_S)

    async def ensure_dlq(self, queue: str) -> None:
        await self.ensure_stream(self.names.dlq_stream(queue), self.names.dlq_subject(queue),
                                 work_queue=False)

    # sending ------------------------------------------------------------------------------

    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        deadline = time.monotonic() + self.send_timeout
        failures = 0
        while True:
            try:
                await self._publish_once(batch)
                return
            except BrokerUnavailable:
                if time.monotonic() >= deadline:
                    raise
                failures += 1
            except ERRORS as exc:  # retried whole: JetStream drops the copies it already has
                failures += 1
                self._streams.clear()
                if time.monotonic() >= deadline:
                    raise BrokerUnavailable(f'NATS at {mask_dsn(self.dsn)} did not store the message '
                                            f'within {self.send_timeout}s: {exc!r}') from exc
                self.log.warning('Publishing failed (%r); retry %d', exc, failures)
            await asyncio.sleep(min(0.05 * 2 ** failures, 1.0))

    async def _publish_once(self, batch: Sequence[Outgoing]) -> None:
        js = await self.jetstream()
        acks: list[Awaitable[Any]] = []
        single = len(batch) == 1 and len(batch[0].queues) == 1
        planned: PlannedSend | None = None
        stores = None if single else self.stores.batch(BATCH_ACK_TIMEOUT_S)
        try:
            for message in batch:
                headers = message_headers(message.message_id, message.sent_at, message.headers)
                for queue in message.queues:
                    plan = self.plan(queue)
                    if plan is not None:  # a queue with options: its own path (nats_options)
                        planned = planned or PlannedSend(self, js, batch, acks)
                        await self._store_planned(planned, plan, message, headers, acks)
                        continue
                    if message.delay > 0:
                        stream = self.names.delayed_stream(queue)
                        await self.ensure_stream(stream, self.names.delayed_subject(queue))
                        subject = self.names.delayed_subject(queue)
                        copy = {**headers, DUE: str(int((time.time() + message.delay) * 1000))}
                    else:
                        await self.ensure_queue(queue)
                        subject, copy = self.names.subject(queue), headers
                    if stores is None:
                        await self.stores.store(subject, message.body, copy)
                        return
                    await stores.add(subject, message.body, copy)
        except QueueFull:
            if stores is not None:  # what was sent before the refused one is stored: wait for it
                await stores.settle()
            raise
        except BaseException:
            if stores is not None:  # retried whole by _publish: these acks are not waited for
                stores.forget()
            raise
        # Every store acknowledged together: one wait for the batch, bounded (a timeout is
        # retried whole by _publish, de-duplicated by Nats-Msg-Id).
        if stores is not None:
            await stores.wait()
        if acks:
            await asyncio.wait_for(asyncio.gather(*acks), BATCH_ACK_TIMEOUT_S)

    async def _store_planned(self, planned: PlannedSend, plan: QueuePlan, message: Outgoing,
                             headers: dict[str, str], acks: list[Awaitable[Any]]) -> None:
        delayed = None
        if message.delay > 0:
            delayed = {**headers, DUE: str(int((time.time() + message.delay) * 1000))}
        try:
            await planned.store(plan, message, headers, delayed)
        except QueueFull:
            if acks:  # what was sent before the refused one is stored: wait for it, then say so
                await asyncio.wait_for(asyncio.gather(*acks, return_exceptions=True), BATCH_ACK_TIMEOUT_S)
            raise

    # consuming ----------------------------------------------------------------------------

    async def store(self, queue: str, body: bytes, headers: dict[str, str]) -> None:
        """Store a copy (a delayed move, a requeue) into ``queue``, within its bound if it has one."""
        plan = self.plan(queue)
        if plan is not None and plan.max_length:
            await self.bound(plan).store(self.names.subject(queue), body, headers)
        else:
            await self.jetstream()
            await self.stores.store(self.names.subject(queue), body, headers)

    async def _subscribe(self, consumer: Consumer) -> Subscription:
        queue = consumer.queue.name
        visibility = consumer.config.visibility(consumer.timeout)
        await self.declare_consumer(queue, visibility)
        subscription = NATSSubscription(self, queue, visibility)
        await subscription.start()
        await self._mover.watch(queue)
        return subscription

    async def declare_consumer(self, queue: str, visibility: float) -> None:
        """The queue's stream and its durable consumer, created or (ack_wait) updated.

        One durable consumer per queue, shared by all its consumers: the last to start sets
        the visibility (ack_wait) for all of them.
        """
        js = await self.jetstream()
        await self.ensure_queue(queue)
        try:
            await js.consumer_info(self.names.stream(queue), CONSUMER)
        except nats.js.errors.NotFoundError:
            # A new consumer counts deliveries from 1 again: earlier free records are void.
            self.log.info('Creating the JetStream consumer of %s', queue)
            try:
                await js.purge_stream(self.names.free_stream(queue))
            except nats.js.errors.NotFoundError:
                pass
        await js.add_consumer(self.names.stream(queue), api.ConsumerConfig(
            durable_name=CONSUMER, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=visibility,
            max_deliver=-1, max_ack_pending=-1))

    # inspecting ---------------------------------------------------------------------------

    async def _length(self, name: str, **options: Any) -> int:
        js = await self.jetstream()
        stream = self.names.stream(name)
        try:
            return int((await js.consumer_info(stream, CONSUMER)).num_pending or 0)
        except nats.js.errors.NotFoundError:
            pass
        try:  # no consumer yet: every message of the stream is waiting
            return int((await js.stream_info(stream)).state.messages)
        except nats.js.errors.NotFoundError:
            return 0

    async def _dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        return await dead_letters(self, name, limit)

    async def _requeue_dead_letters(self, name: str) -> int:
        return await requeue_dead_letters(self, name)

    async def _retained(self, name: str, since: float | None, until: float | None,
                        after: Any, limit: int) -> tuple[list[Retained], Any]:
        return await retained(self, name, since, until, after, limit)
