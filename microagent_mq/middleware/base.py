"""``Middleware``: hooks the engine and the send path call around every message.

Called only by the engine (handling) and the broker's send path (``send``, ``send_many``,
``publish``, ``publish_many``), never by transports, so every broker behaves the same. A hook
that raises is logged and ignored: observing a message never changes its fate.
"""

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from ..messages import RESERVED_PREFIX, TOPIC_HEADER, TYPE_HEADER, MessageInfo

if TYPE_CHECKING:
    from ..transport import Delivery, Outgoing

log = logging.getLogger('microagent_mq.middleware')

# What became of a message the engine took on. 'released': neither handled nor failed — a
# stop past its grace cancelled the handler, or another consumer took the message over; it
# is delivered again without costing an attempt.
Outcome = Literal['handled', 'retried', 'dead_lettered', 'filtered', 'released']


class Middleware:
    """Base of middlewares: no-op hooks; a subclass implements the ones it needs.

    Installed with ``MicroAgent(..., middlewares=[...])`` (handling) or
    ``SomeBroker(dsn, middlewares=[...])`` (sending and handling). ``before_*`` hooks run in
    list order, broker's before agent's; ``after_handle`` in reverse order (the first
    middleware wraps the others). Handling hooks run in the task that runs the handler, so a
    context variable set in ``before_handle`` is seen by the handler.
    """

    async def before_send(self, outgoing: 'Outgoing') -> None:
        """A message is about to be published. To add headers, assign a new dict to
        ``outgoing.headers`` (the one there may be shared by other messages: never mutate it)."""

    async def before_handle(self, info: MessageInfo) -> None:
        """The engine took a message on (before decoding it and calling the handler)."""

    async def after_handle(self, info: MessageInfo, outcome: Outcome, seconds: float) -> None:
        """The message is settled: ``outcome`` says how, ``seconds`` since ``before_handle``."""


def message_info(delivery: 'Delivery', queue: str, max_attempts: int) -> MessageInfo:
    """What middlewares know of ``delivery`` (as a handler's ``MessageInfo``)."""
    headers = delivery.headers or {}
    return MessageInfo(
        message_id=delivery.message_id, queue=queue, attempt=delivery.attempt,
        max_attempts=max_attempts, type_name=headers.get(TYPE_HEADER, ''),
        topic=headers.get(TOPIC_HEADER, ''), sent_at=delivery.sent_at,
        headers={k: v for k, v in headers.items() if not k.startswith(RESERVED_PREFIX)})


async def before_send(middlewares: Sequence[Middleware], batch: Sequence['Outgoing']) -> None:
    """Every middleware's ``before_send`` for every message of ``batch``."""
    for outgoing in batch:
        for middleware in middlewares:
            try:
                await middleware.before_send(outgoing)
            except Exception:
                log.exception('%s.before_send failed; sending anyway', type(middleware).__name__)


class Observation:
    """One message's way through the handling hooks (made only when there are middlewares)."""

    __slots__ = ('began', 'info', 'middlewares')

    def __init__(self, middlewares: Sequence[Middleware], info: MessageInfo) -> None:
        self.middlewares = middlewares
        self.info = info
        self.began = time.perf_counter()

    async def before(self) -> None:
        """``before_handle`` of each middleware, in order."""
        for middleware in self.middlewares:
            try:
                await middleware.before_handle(self.info)
            except Exception:
                log.exception('%s.before_handle failed; handling anyway', type(middleware).__name__)
        self.began = time.perf_counter()

    async def after(self, outcome: Outcome) -> None:
        """``after_handle`` of each middleware, in reverse order."""
        seconds = time.perf_counter() - self.began
        for middleware in reversed(self.middlewares):
            try:
                await middleware.after_handle(self.info, outcome, seconds)
            except Exception:
                log.exception('%s.after_handle failed', type(middleware).__name__)
