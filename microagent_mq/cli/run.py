"""``microagent-mq run`` in one process: start agents, serve health, stop on a signal."""

import asyncio
import importlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from ..agent import MicroAgent
from ..broker import AbstractQueueBroker
from ..exceptions import BrokerUnavailable
from .errors import EXIT_RUNTIME, CLIError
from .health import HealthServer
from .observe import Observers

log = logging.getLogger('microagent_mq.cli')
READY_PROBE_S = 2.0  # a broker that does not answer a length query in this long is not ready
STATUS_EVERY_S = 1.0  # how often a supervised worker reports its readiness
START_RETRY_FIRST_S, START_RETRY_MAX_S = 0.5, 10.0  # a broker unreachable at start


_early_signals: list[int] = []


def catch_early_signals() -> None:
    """Remember a SIGTERM/SIGINT that arrives before the agents run, instead of dying of it.

    A supervisor may stop a worker that is still importing or connecting; that worker then
    starts and stops at once, cleanly, rather than exiting with -15 mid-way.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda number, frame: _early_signals.append(number))


def remember_early_signals(signals: list[int]) -> None:
    """Signals caught before this module was imported (``python -m microagent_mq``)."""
    _early_signals.extend(signals)
    catch_early_signals()


def load_agent(path: str) -> type[MicroAgent]:
    """``package.module:AgentClass`` imported."""
    module_name, _, class_name = path.partition(':')
    if not module_name or not class_name:
        raise CLIError(f'{path!r}: expected MODULE:AgentClass')
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure is the user's module
        raise CLIError(f'cannot import {module_name!r}: {type(exc).__name__}: {exc}') from exc
    agent = getattr(module, class_name, None)
    if not (isinstance(agent, type) and issubclass(agent, MicroAgent)):
        raise CLIError(f'{path!r} is not a MicroAgent subclass')
    return agent


def restrict(agent: MicroAgent, only: set[str]) -> None:
    """Make ``agent`` consume only the queues in ``only`` (seed 003's ``--handlers``)."""
    cls = type(agent)
    # Instance attributes shadow the class's: other instances keep every consumer.
    agent._consumer_specs = {  # type: ignore[misc]
        attr: spec for attr, spec in cls._consumer_specs.items() if spec.name in only}
    agent._queue_groups = {  # type: ignore[misc]
        name: group for name, group in cls._queue_groups.items() if name in only}


async def run_agents(broker: AbstractQueueBroker, agent_classes: list[type[MicroAgent]],
                     grace: float | None, only: set[str] | None = None,
                     health_port: int | None = None, observers: Observers | None = None) -> None:
    """Start the agents, wait for SIGINT or SIGTERM, stop them gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if _early_signals:
        log.info('Stopped before starting (%s)', signal.Signals(_early_signals[0]).name)
        stop.set()
    agents = [cls(broker=broker) for cls in agent_classes]
    if only is not None:
        consumed = {spec.name for a in agents for spec in a._consumer_specs.values()}
        if unknown := sorted(only - consumed):
            raise CLIError(f'--only {",".join(unknown)}: no agent given consumes '
                           f'{"that queue" if len(unknown) == 1 else "those queues"}')
        for agent in agents:
            restrict(agent, only)
    started: list[MicroAgent] = []
    health = HealthServer(health_port, lambda: readiness(broker, started)) if health_port else None
    background: list[asyncio.Task[None]] = []
    try:
        for agent in agents:
            if not await start_when_reachable(agent, stop):
                return  # stopped while the broker was still unreachable: nothing ran
            started.append(agent)
        if health is not None:
            await health.start()
        if observers is not None:
            await observers.start([c.queue.name for agent in started for c in agent._consumers])
        if status_dir := os.environ.get('MQ_STATUS_FILE'):
            background.append(asyncio.create_task(report_status(Path(status_dir), broker, started)))
        background.append(asyncio.create_task(watch_parent(stop)))
        log.info('Running %s on %r; SIGINT or SIGTERM stops', ', '.join(
            type(a).__name__ for a in agents), broker)
        await stop.wait()
        log.info('Stopping')
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if health is not None:
            await health.stop()
        if observers is not None:
            await observers.stop()
        for agent in reversed(started):
            try:
                await agent.stop(grace)
            except Exception:
                log.exception('Stopping %s failed', type(agent).__name__)
        await broker.close()


async def start_when_reachable(agent: MicroAgent, stop: asyncio.Event) -> bool:
    """Start ``agent``, waiting out a broker that is unreachable (a worker started while
    RabbitMQ restarts must not die of it); False if told to stop first. Other errors are final.
    """
    pause = START_RETRY_FIRST_S
    while True:
        try:
            await agent.start()
            return True
        except BrokerUnavailable as exc:
            log.warning('%s cannot start yet: %s; retrying in %.1fs', type(agent).__name__, exc, pause)
        except Exception as exc:
            raise CLIError(f'{type(agent).__name__} failed to start: '
                           f'{type(exc).__name__}: {exc}', EXIT_RUNTIME) from exc
        try:
            await asyncio.wait_for(stop.wait(), pause)
            return False
        except TimeoutError:
            pause = min(pause * 2, START_RETRY_MAX_S)


async def readiness(broker: AbstractQueueBroker, agents: list[MicroAgent]) -> tuple[bool, dict[str, Any]]:
    """Ready: every consumer of the started agents consuming, and the broker answering."""
    queues = [c.queue.name for agent in agents for c in agent._consumers]
    runners = broker._runners
    stopped = sorted(q for q in queues if q not in runners or not runners[q].running)
    details: dict[str, Any] = {'consumers': len(queues), 'not_consuming': stopped}
    if not agents:
        return False, {**details, 'error': 'agents not started'}
    try:
        if queues:
            await asyncio.wait_for(broker.queue_length(queues[0]), READY_PROBE_S)
    except Exception as exc:
        return False, {**details, 'broker': f'unreachable: {type(exc).__name__}: {exc}'}
    return not stopped, {**details, 'broker': 'reachable'}


async def report_status(path: Path, broker: AbstractQueueBroker, agents: list[MicroAgent]) -> None:
    """For a supervisor: write this worker's readiness to ``path`` every second, atomically."""
    temp = path.with_suffix('.tmp')
    while True:
        ready, details = await readiness(broker, agents)
        temp.write_bytes(orjson.dumps({'ready': ready, 'pid': os.getpid(), **details}))
        temp.replace(path)
        await asyncio.sleep(STATUS_EVERY_S)


async def watch_parent(stop: asyncio.Event) -> None:
    """A worker whose supervisor died (SIGKILL) stops by itself instead of running orphaned."""
    if not os.environ.get('MQ_SUPERVISED'):
        return
    parent = os.getppid()
    while os.getppid() == parent:  # noqa: ASYNC110 - no event tells of a parent's death
        await asyncio.sleep(1.0)
    log.warning('Supervisor %d is gone; stopping', parent)
    stop.set()


def loop_runner(use_uvloop: bool | None) -> asyncio.Runner:
    """An asyncio runner, on uvloop when asked (or by default when installed)."""
    if use_uvloop is False:
        return asyncio.Runner()
    try:
        import uvloop
    except ImportError as exc:
        if use_uvloop:
            raise CLIError("--uvloop needs uvloop: pip install 'microagent-mq[uvloop]'") from exc
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


