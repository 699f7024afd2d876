"""The delivery engine: fetch, decode, run the handler under its timeout, settle. Written once."""

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .consumer import FILTERED, Consumer, PoisonMessage
from .control import Reject, Retry
from .deadlines import Deadlines
from .idempotency import Idempotency
from .middleware.base import Middleware, Observation, Outcome, message_info
from .options import PREFETCH_HOLD_S
from .transport import Delivery, Subscription

FETCH_BACKOFF_MAX_S = 5.0
CANCEL_WAIT_S = 5.0  # how long stop() waits for cancelled tasks to end
# How long a stop waits for a fetch in progress to return, whatever the grace: a read
# cancelled mid-way can leave its messages taken on the server and never handed back.
FETCH_RETURN_S = 2.0
LOOP_RESTART_S = 1.0  # a fetch loop that failed unexpectedly starts again after this

# The runner and task of the handler running in this context: a stop called from a handler
# (even through tasks it made, as asyncio.gather's) knows it must not wait for that task.
_handling: contextvars.ContextVar[tuple['ConsumerRunner', asyncio.Task[Any]] | None] = \
    contextvars.ContextVar('microagent_mq_handling', default=None)


def handling_runner() -> 'ConsumerRunner | None':
    """The runner whose handler runs in this context (None outside handlers)."""
    handling = _handling.get()
    return handling[0] if handling is not None else None


class ConsumerRunner:
    """Feeds one consumer from its subscription, with bounded concurrency and a graceful stop."""

    def __init__(self, consumer: Consumer, subscription: Subscription, log: logging.Logger,
                 idempotency: Idempotency | None = None,
                 middlewares: Sequence[Middleware] = ()) -> None:
        self.consumer = consumer
        self.log = log
        self._sub = subscription
        config = consumer.config
        self._config = config
        self._queue = consumer.queue.name
        low, high = config.prefetch_range
        self._capacity = config.concurrency + low
        # prefetch='auto': the capacity follows the handlers' pace (``_adapt``).
        self._prefetch_range = (low, high) if high > low else None
        self._fetch_began = 0.0
        self._fetched = 0  # the last fetch's count
        # Where a fetch is a round trip (``reads_ahead``), under a backlog (the last fetch came
        # back full) the next fetch starts once half the capacity is free, while the handlers
        # get through the rest: the server reads while they work. Never more than capacity held.
        self._reads_ahead = subscription.reads_ahead
        self._ahead: asyncio.Task[Sequence[Delivery]] | None = None
        self._backlog = False
        # A message that waited this long in the buffer gets its reservation renewed
        # before the handler starts, so it cannot expire while the handler runs.
        self._renew_after = config.visibility(consumer.timeout) - consumer.timeout
        self._slots = asyncio.Semaphore(config.concurrency)
        self._buffer: deque[Delivery] = deque()
        # Handler tasks and their messages; a dict keeps them in fetch order (see ``_stop``).
        self._tasks: dict[asyncio.Task[Any], Delivery] = {}
        self._room = asyncio.Event()
        self._stopping = False
        self._inline: Delivery | None = None  # the message the loop task is handling in line
        # Messages of handlers the stop cancelled: the stop releases them, with the buffer.
        self._cancelled: list[Delivery] = []
        self._released = False  # the stop released what it holds: later ones release themselves
        self._loop_task: asyncio.Task[None] | None = None
        self._inline_task: asyncio.Task[Any] | None = None  # the loop task, when handlers run in line
        self._stop_task: asyncio.Task[None] | None = None
        self._closing: asyncio.Future[None] | None = None
        self._closed = asyncio.Event()  # the subscription is closed: nothing more to settle
        self._deadlines = Deadlines(consumer.timeout)
        self._idempotency = idempotency  # None unless the consumer is idempotent=True
        # Without middlewares a message costs nothing more: no MessageInfo, no hook call.
        self._middlewares = tuple(middlewares)
        self._handle = self._observed if self._middlewares else self._process

    def start(self) -> None:
        """Start fetching in a task owned by this runner."""
        self._loop_task = asyncio.create_task(self._supervise(), name=f'consume:{self._queue}')

    @property
    def stopping(self) -> bool:
        """True once a stop began."""
        return self._stopping

    @property
    def closed(self) -> bool:
        """True once the stop closed the subscription (later than the stop for a self-stop)."""
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Wait until the subscription is closed."""
        await self._closed.wait()

    @property
    def running(self) -> bool:
        """True while the fetch loop runs (False once stopped, or if it died)."""
        return self._loop_task is not None and not self._loop_task.done()

    async def stop(self, grace: float | None = None) -> None:
        """Stop fetching, let running handlers finish within ``grace`` s, give back the rest.

        Idempotent, and a cancelled ``stop()`` still completes: half a stop (a buffer never
        released, a subscription never closed) is worse than a late one.
        """
        if self._stop_task is None:
            # A handler of this runner stopping its own agent: the stop must neither wait for
            # it (it waits for the stop: stuck for the whole grace) nor cancel it (its message,
            # handled, would be given back and delivered again).
            # Not asyncio.current_task(): the stop may come through a task the handler made.
            handling = _handling.get()
            own = handling[1] if handling is not None and handling[0] is self else None
            self._stop_task = asyncio.create_task(self._stop(grace, own), name=f'stop:{self._queue}')
        task = self._stop_task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                await asyncio.wait({task})
            raise

    async def _stop(self, grace: float | None, own: asyncio.Task[Any] | None = None) -> None:
        grace = self._config.stop_grace if grace is None else grace
        self._stopping = True
        self._room.set()
        try:
            # First of all: nothing new may arrive (RabbitMQ would push more, even the
            # messages released below, into a consumer that is going away).
            await self._sub.stop_fetching()
        except Exception:
            self.log.warning('Could not stop fetching from %s cleanly', self._queue, exc_info=True)
        loop_task = self._loop_task
        inline = self._inline is not None  # the loop task itself is running a handler
        # Every message held by a handler, in fetch order (all fetched before the buffer's).
        held = [self._inline] if self._inline is not None else list(self._tasks.values())
        handlers = {*self._tasks, *([loop_task] if loop_task and inline else [])}
        fetch: set[asyncio.Task[Any]] = {loop_task} if loop_task is not None and not inline else set()
        # A read ahead nobody took yet (the loop takes none once stopping): its messages go
        # back with the buffer's, after them.
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            fetch.add(ahead)
        if own is not None:
            handlers.discard(own)
            fetch.discard(own)
        began = asyncio.get_running_loop().time()
        late: set[asyncio.Task[Any]] = set()
        if handlers:
            _, late = await asyncio.wait(handlers, timeout=grace)
            for task in late:
                self.log.warning('Handler of %s still running after %.1fs grace: cancelled',
                                 self._queue, grace)
                task.cancel()
        if fetch:
            # A fetch in progress is waited for, not cancelled, so what it read is buffered
            # and released below instead of stranded on the server.
            spent = asyncio.get_running_loop().time() - began
            _, stuck_fetch = await asyncio.wait(fetch, timeout=max(FETCH_RETURN_S - spent, 0.1))
            for task in stuck_fetch:
                self.log.warning('Fetch loop of %s did not return within %.1fs: cancelled',
                                 self._queue, FETCH_RETURN_S)
                task.cancel()
            late |= stuck_fetch
        if late:
            _, stuck = await asyncio.wait(late, timeout=CANCEL_WAIT_S)
            if stuck:
                self.log.error('%d task(s) of %s ignored cancellation; left behind',
                               len(stuck), self._queue)
        self._deadlines.close()
        # The messages of the handlers cancelled above and the buffer go back together, in
        # fetch order, in one call: released apart, the cancelled ones would go behind the
        # buffer's (each release puts its messages at the head of the queue).
        order = {id(d): i for i, d in enumerate(held)}
        unhandled = sorted(self._cancelled, key=lambda d: order.get(id(d), -1)) + list(self._buffer)
        if ahead is not None and ahead.done() and not ahead.cancelled() and ahead.exception() is None:
            unhandled += ahead.result()
        self._cancelled.clear()
        self._buffer.clear()
        self._released = True
        if unhandled:  # no attempt charged: not their fault
            await self._settle(self._sub.release, unhandled)
        if own is None:
            await self._close_subscription()
        else:
            # The handler that stopped us settles its message on this subscription once it
            # returns (after this stop): close it only then.
            own.add_done_callback(self._close_later)

    def _close_later(self, task: asyncio.Task[Any]) -> None:
        self._closing = asyncio.ensure_future(self._close_subscription())

    async def _close_subscription(self) -> None:
        try:
            await self._settle(self._sub.close)
            if self._idempotency is not None:
                await self._idempotency.close()
        finally:
            self._closed.set()

    async def _supervise(self) -> None:
        if self._config.concurrency == 1:
            # Handlers run in line in this task (``_dispatch``): it is their task for its whole
            # life, so it is known as such once here, not around every message (setting and
            # resetting a context variable cost ~0.8 us a message).
            self._inline_task = task = asyncio.current_task()
            assert task is not None
            _handling.set((self, task))
        # The fetch loop must never die silently: whatever escapes it is logged and the
        # loop starts again (a cancellation, or the process exiting, ends it).
        while not self._stopping:
            try:
                await self._run()
            except Exception:
                self.log.exception('Consumer loop of %s failed; restarting in %.1fs',
                                   self._queue, LOOP_RESTART_S)
                await asyncio.sleep(LOOP_RESTART_S)

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            if self._buffer:
                # Left by a dispatch that failed: handed out first, not kept waiting until a
                # fetch returns something (it may wait for a long while on a quiet queue).
                await self._dispatch()
                continue
            if self._prefetch_range is not None:
                self._adapt()
            free = self._capacity - len(self._tasks)
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            ahead, self._ahead = self._ahead, None
            try:
                batch = await (ahead if ahead is not None else self._fetch(free))
            except Exception as exc:  # a dropped connection: keep trying, say so
                failures += 1
                pause = min(0.1 * 2 ** min(failures, 10), FETCH_BACKOFF_MAX_S)
                self.log.warning('Fetching from %s failed (%r); retrying in %.1fs',
                                 self._queue, exc, pause)
                await asyncio.sleep(pause)
                continue
            if failures:
                self.log.warning('Fetching from %s works again after %d failures',
                                 self._queue, failures)
                failures = 0
            self._fetched = len(batch)
            if batch:
                self._buffer.extend(batch)
                await self._dispatch()

    def _adapt(self) -> None:
        """Hold ahead what the handlers get through in ``PREFETCH_HOLD_S``, within the range.

        The pace is the last fetch's count over the time since it began (its round trip, its
        wait for messages and their handling): under a backlog of fast handlers it grows to the
        top of the range, one fetch at a time; idle or slow, it falls back to the bottom.
        """
        assert self._prefetch_range is not None
        now = time.monotonic()
        elapsed, self._fetch_began = now - self._fetch_began, now
        low, high = self._prefetch_range
        ahead = int(self._fetched / elapsed * PREFETCH_HOLD_S) if elapsed > 0 else low
        self._capacity = self._config.concurrency + min(max(ahead, low), high)

    async def _fetch(self, count: int) -> Sequence[Delivery]:
        batch = await self._sub.fetch(count)
        self._backlog = self._reads_ahead and len(batch) >= count
        return batch

    async def _read_ahead(self) -> None:
        """Start the next fetch if half the capacity is free (see ``_reads_ahead``)."""
        free = self._capacity - len(self._buffer) - len(self._tasks) - (self._inline is not None)
        if free >= max(self._capacity // 2, 1):
            self._ahead = asyncio.create_task(self._fetch(free), name=f'fetch:{self._queue}')
            await asyncio.sleep(0)  # its request leaves now, not once the handlers yield

    async def _dispatch(self) -> None:
        buffer = self._buffer
        if self._config.concurrency == 1:
            # In line, no task per message: one at a time keeps FIFO order and is cheapest.
            while buffer and not self._stopping:
                self._inline = delivery = buffer.popleft()
                if self._backlog and self._ahead is None:
                    await self._read_ahead()
                try:
                    await self._handle(delivery)
                finally:
                    self._inline = None
            return
        while buffer and not self._stopping:
            await self._slots.acquire()
            if self._stopping:
                self._slots.release()
                return
            delivery = buffer.popleft()
            task = asyncio.create_task(self._handle(delivery))
            self._tasks[task] = delivery
            task.add_done_callback(self._task_done)
            if self._backlog and self._ahead is None:
                await self._read_ahead()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(task, None)
        self._slots.release()
        self._room.set()

    async def _observed(self, delivery: Delivery) -> None:
        """``_process`` between the middlewares' hooks (used only when there are some)."""
        seen = Observation(self._middlewares,
                           message_info(delivery, self._queue, self._config.max_attempts))
        await seen.before()
        outcome: Outcome = 'released'
        try:
            outcome = await self._process(delivery) or 'released'
        finally:
            await seen.after(outcome)

    async def _process(self, delivery: Delivery) -> Outcome | None:
        """Handle and settle one message; what became of it (None: released, not settled)."""
        consumer = self.consumer
        idempotency = self._idempotency
        if idempotency is not None and await idempotency.seen(delivery):
            await self._settle(self._sub.ack, delivery)
            return 'filtered'  # handled before: acknowledged without calling the handler
        try:
            kwargs = consumer.arguments(delivery)
        except PoisonMessage as exc:
            return await self._dead_letter(delivery, f'poison message: {exc}')
        except Exception as exc:
            # Any other failure to read it (a foreign header of an unexpected type, say) is
            # poison too: escaping, it would kill the fetch loop and leave the message unsettled.
            return await self._dead_letter(delivery, f'poison message: {type(exc).__name__}: {exc}')
        if delivery.attempt > self._config.max_attempts:
            return await self._dead_letter(delivery, 'delivered more than max_attempts times '
                                           '(its consumers died while handling it)')
        if time.monotonic() - delivery.received_at > self._renew_after:
            if not await self._renew(delivery):
                return None  # another consumer took it over
        task = self._inline_task or asyncio.current_task()
        assert task is not None
        outcome: BaseException | None = None
        result: object = None
        self._deadlines.start(task)
        # A handler task of its own (concurrency > 1) says whose it is; the loop task said so once.
        token = None if task is self._inline_task else _handling.set((self, task))
        try:
            result = await consumer.handler(**kwargs)
        except BaseException as exc:  # judged below, in one place
            outcome = exc
        if token is not None:
            _handling.reset(token)
        if self._deadlines.finish(task):
            return await self._failed(delivery, f'timed out after {consumer.timeout}s')
        elif outcome is None:
            if idempotency is not None:
                await idempotency.record(delivery)
            try:  # ``_settle`` in line: one coroutine less on every message's path
                await self._sub.ack(delivery)
            except Exception:
                self._settle_failed(self._sub.ack)
            return 'filtered' if result is FILTERED else 'handled'
        elif isinstance(outcome, Retry):
            return await self._failed(delivery, outcome.reason, outcome.delay)
        elif isinstance(outcome, Reject):
            return await self._dead_letter(delivery, f'rejected: {outcome.reason}')
        elif isinstance(outcome, Exception):
            self.log.warning('Handler %s failed on message %s (attempt %d)', consumer.name,
                             delivery.message_id, delivery.attempt, exc_info=outcome,
                             extra=self._about(delivery))
            return await self._failed(delivery, f'{type(outcome).__name__}: {outcome}')
        elif isinstance(outcome, asyncio.CancelledError) and task.cancelling() == 0:
            # Nobody cancelled this task: the handler raised CancelledError itself (an inner
            # task's, say). That is this message failing, not a stop.
            self.log.warning('Handler %s raised CancelledError on message %s (attempt %d)',
                             consumer.name, delivery.message_id, delivery.attempt,
                             extra=self._about(delivery))
            return await self._failed(delivery, 'CancelledError raised by the handler')
        elif isinstance(outcome, asyncio.CancelledError):
            # Cancelled from outside (a stop past its grace, the loop shutting down): not the
            # message's fault, so it goes back without costing an attempt. During a stop, the
            # stop releases it with the buffer, in fetch order.
            if self._stopping and not self._released:
                self._cancelled.append(delivery)
            else:
                await self._settle(self._sub.release, [delivery])
            raise outcome
        else:  # KeyboardInterrupt, SystemExit...: the message failed; the process exits as asked
            self.log.error('Handler %s raised %s on message %s (attempt %d)', consumer.name,
                           type(outcome).__name__, delivery.message_id, delivery.attempt,
                           extra=self._about(delivery))
            await self._failed(delivery, f'{type(outcome).__name__} raised by the handler')
            raise outcome

    def _about(self, delivery: Delivery) -> dict[str, object]:
        """Log record fields for a message (shown by ``--log-format json``)."""
        return {'queue': self._queue, 'message_id': delivery.message_id, 'attempt': delivery.attempt}

    async def _renew(self, delivery: Delivery) -> bool:
        try:
            return await self._sub.extend(delivery)
        except Exception:
            self.log.warning('Could not renew message %s of %s; handling it anyway',
                             delivery.message_id, self._queue, exc_info=True,
                             extra=self._about(delivery))
            return True

    async def _failed(self, delivery: Delivery, error: str, delay: float | None = None) -> Outcome:
        attempt = delivery.attempt
        if attempt >= self._config.max_attempts:
            return await self._dead_letter(delivery, f'{error} (attempt {attempt} of '
                                           f'{self._config.max_attempts})')
        delay = self._config.backoff(attempt) if delay is None else delay
        self.log.info('Message %s of %s: %s; attempt %d in %.2fs',
                      delivery.message_id, self._queue, error, attempt + 1, delay,
                      extra=self._about(delivery))
        await self._settle(self._sub.retry_later, delivery, delay, error)
        return 'retried'

    async def _dead_letter(self, delivery: Delivery, error: str) -> Outcome:
        self.log.error('Message %s of %s dead-lettered after %d attempt(s): %s',
                       delivery.message_id, self._queue, delivery.attempt, error,
                       extra=self._about(delivery))
        await self._settle(self._sub.dead_letter, delivery, error)
        return 'dead_lettered'

    async def _settle(self, action: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await action(*args)
        except Exception:
            self._settle_failed(action)

    def _settle_failed(self, action: Callable[..., Awaitable[None]]) -> None:
        # Unsettled is not lost, the transport makes sure of it: Redis leaves the message
        # pending in the group (taken over once its visibility lapses), RabbitMQ gets it
        # back by a nack or when the channel closes; memory cannot fail here.
        self.log.exception('%s on %s failed; the message will be delivered again',
                           getattr(action, '__name__', 'settling'), self._queue)
