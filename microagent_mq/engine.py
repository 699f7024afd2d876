"""The delivery engine: fetch, decode, run the handler under its timeout, settle. Written once."""

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from .consumer import Consumer, PoisonMessage
from .control import Reject, Retry
from .deadlines import Deadlines
from .transport import Delivery, Subscription

FETCH_BACKOFF_MAX_S = 5.0
CANCEL_WAIT_S = 5.0  # how long stop() waits for cancelled tasks to end


class ConsumerRunner:
    """Feeds one consumer from its subscription, with bounded concurrency and a graceful stop."""

    def __init__(self, consumer: Consumer, subscription: Subscription, log: logging.Logger) -> None:
        self.consumer = consumer
        self.log = log
        self._sub = subscription
        config = consumer.config
        self._config = config
        self._queue = consumer.queue.name
        self._capacity = config.concurrency + config.prefetch
        # A message that waited this long in the buffer gets its reservation renewed
        # before the handler starts, so it cannot expire while the handler runs.
        self._renew_after = config.visibility(consumer.timeout) - consumer.timeout
        self._slots = asyncio.Semaphore(config.concurrency)
        self._buffer: deque[Delivery] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._stopping = False
        self._in_handler = False
        self._loop_task: asyncio.Task[None] | None = None
        self._deadlines = Deadlines(consumer.timeout)

    def start(self) -> None:
        """Start fetching in a task owned by this runner."""
        self._loop_task = asyncio.create_task(self._run(), name=f'consume:{self._queue}')

    async def stop(self, grace: float | None = None) -> None:
        """Stop fetching, let running handlers finish within ``grace`` s, give back the rest."""
        grace = self._config.stop_grace if grace is None else grace
        self._stopping = True
        self._room.set()
        loop_task = self._loop_task
        inline = self._in_handler  # the loop task itself is running a handler
        if loop_task is not None and not inline:
            loop_task.cancel()  # waiting for messages or for a free slot: nothing to finish
        waiting = {*self._tasks, *([loop_task] if loop_task else [])}
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=grace)
            for task in late:
                self.log.warning('%s of %s still running after %.1fs grace: cancelled',
                                 'Fetch loop' if task is loop_task and not inline else 'Handler',
                                 self._queue, grace)
                task.cancel()
            if late:
                _, stuck = await asyncio.wait(late, timeout=CANCEL_WAIT_S)
                if stuck:
                    self.log.error('%d task(s) of %s ignored cancellation; left behind',
                                   len(stuck), self._queue)
        if loop_task is not None and loop_task.done() and not loop_task.cancelled():
            if exc := loop_task.exception():
                self.log.error('Consumer loop of %s failed: %r', self._queue, exc)
        self._deadlines.close()
        if self._buffer:
            await self._settle(self._sub.release, list(self._buffer))
            self._buffer.clear()
        await self._settle(self._sub.close)

    async def _run(self) -> None:
        failures = 0
        while not self._stopping:
            free = self._capacity - len(self._tasks)
            if free <= 0:
                self._room.clear()
                await self._room.wait()
                continue
            try:
                batch = await self._sub.fetch(free)
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
            if batch:
                self._buffer.extend(batch)
                await self._dispatch()

    async def _dispatch(self) -> None:
        buffer = self._buffer
        if self._config.concurrency == 1:
            # In line, no task per message: one at a time keeps FIFO order and is cheapest.
            while buffer and not self._stopping:
                self._in_handler = True
                try:
                    await self._process(buffer.popleft())
                finally:
                    self._in_handler = False
            return
        while buffer and not self._stopping:
            await self._slots.acquire()
            if self._stopping:
                self._slots.release()
                return
            task = asyncio.create_task(self._process(buffer.popleft()))
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        self._room.set()

    async def _process(self, delivery: Delivery) -> None:
        consumer = self.consumer
        try:
            kwargs = consumer.arguments(delivery)
        except PoisonMessage as exc:
            await self._dead_letter(delivery, f'poison message: {exc}')
            return
        if delivery.attempt > self._config.max_attempts:
            await self._dead_letter(delivery, 'delivered more than max_attempts times '
                                    '(consumers stopped while handling it)')
            return
        if time.monotonic() - delivery.received_at > self._renew_after:
            if not await self._renew(delivery):
                return  # another consumer took it over
        task = asyncio.current_task()
        assert task is not None
        outcome: BaseException | None = None
        self._deadlines.start(task)
        try:
            await consumer.handler(**kwargs)
        except BaseException as exc:  # judged below, in one place
            outcome = exc
        if self._deadlines.finish(task):
            await self._failed(delivery, f'timed out after {consumer.timeout}s')
        elif outcome is None:
            await self._settle(self._sub.ack, delivery)
        elif isinstance(outcome, Retry):
            await self._failed(delivery, outcome.reason, outcome.delay)
        elif isinstance(outcome, Reject):
            await self._dead_letter(delivery, f'rejected: {outcome.reason}')
        elif isinstance(outcome, Exception):
            self.log.warning('Handler %s failed on message %s (attempt %d)', consumer.name,
                             delivery.message_id, delivery.attempt, exc_info=outcome)
            await self._failed(delivery, f'{type(outcome).__name__}: {outcome}')
        else:  # cancelled by stop() past its grace (not the message's fault), or exiting
            if self._stopping:
                await self._settle(self._sub.release, [delivery])
            raise outcome

    async def _renew(self, delivery: Delivery) -> bool:
        try:
            return await self._sub.extend(delivery)
        except Exception:
            self.log.warning('Could not renew message %s of %s; handling it anyway',
                             delivery.message_id, self._queue, exc_info=True)
            return True

    async def _failed(self, delivery: Delivery, error: str, delay: float | None = None) -> None:
        attempt = delivery.attempt
        if attempt >= self._config.max_attempts:
            await self._dead_letter(delivery, f'{error} (attempt {attempt} of '
                                    f'{self._config.max_attempts})')
            return
        delay = self._config.backoff(attempt) if delay is None else delay
        self.log.info('Message %s of %s: %s; attempt %d in %.2fs',
                      delivery.message_id, self._queue, error, attempt + 1, delay)
        await self._settle(self._sub.retry_later, delivery, delay, error)

    async def _dead_letter(self, delivery: Delivery, error: str) -> None:
        self.log.error('Message %s of %s dead-lettered after %d attempt(s): %s',
                       delivery.message_id, self._queue, delivery.attempt, error)
        await self._settle(self._sub.dead_letter, delivery, error)

    async def _settle(self, action: Callable[..., Awaitable[None]], *args: object) -> None:
        try:
            await action(*args)
        except Exception:
            # Unsettled is not lost: the broker delivers the message again.
            self.log.exception('%s on %s failed; the message will be delivered again',
                               getattr(action, '__name__', 'settling'), self._queue)
