"""The seed's helpers: ``@transactional`` functions and ``register_event`` inside them."""

import functools
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from .store import Outbox, OutboxError

P = ParamSpec('P')
R = TypeVar('R')

_default: list[Outbox] = []


@dataclass
class _Transaction:
    outbox: Outbox
    rows: list[dict[str, Any]] = field(default_factory=list)


_current: ContextVar[_Transaction | None] = ContextVar('microagent_mq_outbox_transaction', default=None)


def set_default_outbox(outbox: Outbox | None) -> None:
    """The outbox ``@transactional`` functions write to unless given one."""
    _default[:] = [] if outbox is None else [outbox]


def transactional(func: Callable[P, Awaitable[R]] | None = None, *, outbox: Outbox | None = None) -> Any:
    """Run an async function taking an ``AsyncSession`` (first argument or ``session=``) in a
    transaction: commit when it returns, roll back when it raises. Events it registered are
    written to the outbox just before the commit, so they are sent only if it commits. A
    session already in a transaction is used as it is (its owner commits or rolls back).

    A call inside another ``@transactional`` call joins the outer transaction.
    """
    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            outer = _current.get()
            if outer is not None:
                return await fn(*args, **kwargs)
            session = kwargs.get('session', args[0] if args else None)
            if not isinstance(session, AsyncSession):
                raise OutboxError(f'@transactional {fn.__qualname__} needs an AsyncSession as its '
                                  f'first argument or session=, got {type(session).__name__}')
            chosen = outbox or (_default[0] if _default else None)
            if chosen is None:
                raise OutboxError('@transactional: no outbox; pass outbox= or call set_default_outbox()')
            state = _Transaction(chosen)
            token = _current.set(state)
            try:
                if session.in_transaction():  # the caller's transaction: the caller commits
                    return await _run(fn, state, session, *args, **kwargs)
                async with session.begin():
                    return await _run(fn, state, session, *args, **kwargs)
            finally:
                _current.reset(token)
        return wrapper

    return decorate if func is None else decorate(func)


async def _run(fn: Callable[P, Awaitable[R]], state: _Transaction, session: AsyncSession,
               *args: P.args, **kwargs: P.kwargs) -> R:
    result = await fn(*args, **kwargs)
    for row in state.rows:
        await state.outbox.add(session, row['queue'], row['data'], **row['options'])
    return result


def register_event(message_or_queue: Any, data: Any = None, **send_options: Any) -> None:
    """Send this message if, and only if, the enclosing ``@transactional`` call commits.

    Validated now (a bad queue or option raises here); written to the outbox at commit.
    """
    state = _current.get()
    if state is None:
        raise OutboxError('register_event outside a @transactional function: its message '
                          'would belong to no transaction')
    state.outbox.row(message_or_queue, data, dict(send_options))  # validate now
    state.rows.append({'queue': message_or_queue, 'data': data, 'options': send_options})
