"""pytest plugin (entry point ``pytest11``): the ``mq_null_broker`` and ``mq_test_broker`` fixtures.

pytest imports this module; nothing else does, so pytest stays a test-time dependency.
With pytest-asyncio the fixtures are ``pytest_asyncio.fixture``s, which both of its modes
accept: their teardown then stops the consumers a test left running on the test's own loop,
before pytest-asyncio closes it. An async test that asks for one of them needs no
``@pytest.mark.asyncio`` even in strict mode. Without pytest-asyncio they are plain fixtures.
"""

import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest

from .. import default_broker
from ..broker import AbstractQueueBroker
from .null import NullBroker
from .virtual import TestBroker

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - the dev extra installs it
    pytest_asyncio = None  # type: ignore[assignment]

FIXTURES = {'mq_null_broker': NullBroker, 'mq_test_broker': TestBroker}
B = TypeVar('B', bound=AbstractQueueBroker)


@contextmanager
def installed(broker: B) -> Iterator[B]:
    """``broker`` is the process's default broker inside; the previous one after."""
    previous = default_broker._process_default  # restored exactly, even when it was None
    default_broker.set_default_broker(broker)
    try:
        yield broker
    finally:
        default_broker.set_default_broker(previous)


def _async_fixture(name: str, make: Callable[[], B]) -> Any:
    async def fixture() -> AsyncIterator[B]:
        with installed(make()) as broker:
            yield broker
        await broker.close(grace=0)

    fixture.__doc__ = f'A {make.__name__}, the default broker during the test, closed after it.'
    return pytest_asyncio.fixture(name=name)(fixture)


def _sync_fixture(name: str, make: Callable[[], B]) -> Any:
    def fixture() -> Iterator[B]:
        with installed(make()) as broker:
            yield broker
        # No loop to close it on: consumers left running ended with the test's loop.

    fixture.__doc__ = f'A {make.__name__}, the default broker during the test.'
    return pytest.fixture(name=name)(fixture)


_make_fixture = _sync_fixture if pytest_asyncio is None else _async_fixture
mq_null_broker = _make_fixture('mq_null_broker', NullBroker)
mq_test_broker = _make_fixture('mq_test_broker', TestBroker)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Module | pytest.Class, name: str,
                              obj: object) -> None:
    """Mark an async test using a fixture of ours for pytest-asyncio (strict mode needs it)."""
    if not inspect.iscoroutinefunction(obj) or not collector.config.pluginmanager.hasplugin('asyncio'):
        return
    if collector.get_closest_marker('asyncio') or any(
            mark.name == 'asyncio' for mark in getattr(obj, 'pytestmark', ())):
        return  # marked already, perhaps with a loop scope: leave it as it is
    try:
        parameters = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    if FIXTURES.keys() & parameters.keys():
        pytest.mark.asyncio(obj)
