"""The default broker: process-wide, overridden per block, task-local."""

import asyncio

import pytest

from microagent_mq import ConfigurationError, get_default_broker, override_broker, set_default_broker
from microagent_mq.tools.memory import MemoryBroker


@pytest.fixture(autouse=True)
def _no_default() -> None:
    set_default_broker(None)


def test_no_default_is_a_clear_error() -> None:
    with pytest.raises(ConfigurationError, match='no default broker'):
        get_default_broker()


def test_set_then_override_then_restore() -> None:
    first, second = MemoryBroker('memory://a'), MemoryBroker('memory://b')
    set_default_broker(first)
    with override_broker(second) as inside:
        assert inside is second and get_default_broker() is second
        with override_broker(first):
            assert get_default_broker() is first
        assert get_default_broker() is second
    assert get_default_broker() is first
    set_default_broker(None)


async def test_overrides_in_concurrent_tasks_do_not_leak() -> None:
    brokers = [MemoryBroker(f'memory://{n}') for n in range(2)]
    seen: dict[int, list[object]] = {0: [], 1: []}
    both_inside = asyncio.Barrier(2)

    async def task(n: int) -> None:
        async with override_broker(brokers[n]):
            await both_inside.wait()  # both overrides are active at once here
            seen[n].append(get_default_broker())
        with pytest.raises(ConfigurationError):
            get_default_broker()

    await asyncio.gather(task(0), task(1))
    assert seen == {0: [brokers[0]], 1: [brokers[1]]}
