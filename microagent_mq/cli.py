"""``microagent-mq``: run agents, send a message, read a queue's length."""

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import orjson

from .agent import MicroAgent
from .broker import AbstractQueueBroker
from .exceptions import QueueException
from .factory import broker_from_dsn
from .loader import load_queues

log = logging.getLogger('microagent_mq.cli')


class CLIError(Exception):
    """A problem worth one line on stderr, not a traceback."""


def parser() -> argparse.ArgumentParser:
    """The command line, with its three commands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--broker', default=os.environ.get('MQ_BROKER', 'memory://default'),
                        help='broker DSN: memory://, redis://, rediss://, amqp://, amqps:// '
                             '(env MQ_BROKER; default %(default)s)')
    common.add_argument('--queues', default=os.environ.get('MQ_QUEUES', 'queues.json'),
                        help='queue declarations: a path, file:// or http(s):// URL '
                             '(env MQ_QUEUES; default %(default)s)')
    common.add_argument('--log-level', default='INFO', help='default %(default)s')
    root = argparse.ArgumentParser(prog='microagent-mq', description=__doc__)
    commands = root.add_subparsers(dest='command', required=True)
    run = commands.add_parser('run', parents=[common], help='run agents until SIGINT/SIGTERM')
    run.add_argument('agents', nargs='+', metavar='MODULE:AgentClass')
    run.add_argument('--grace', type=float, default=None,
                     help='seconds running handlers get to finish on stop')
    run.add_argument('--uvloop', action=argparse.BooleanOptionalAction, default=None,
                     help='use uvloop (default: when installed)')
    send = commands.add_parser('send', parents=[common], help='send one JSON message')
    send.add_argument('queue')
    send.add_argument('message', metavar='JSON')
    send.add_argument('--topic', default='')
    send.add_argument('--delay', type=float, default=0.0)
    length = commands.add_parser('length', parents=[common], help='print a queue length')
    length.add_argument('queue')
    _add_outbox(commands, common)
    return root


def _add_outbox(commands: Any, common: argparse.ArgumentParser) -> None:
    # `outbox relay` needs the [outbox] extra: without it the command says so when used.
    try:
        from .outbox.cli import add_parser
    except ImportError:
        outbox = commands.add_parser('outbox', help="the transactional outbox (pip install "
                                     "'microagent-mq[outbox]')")
        outbox.add_argument('rest', nargs=argparse.REMAINDER)
        return
    add_parser(commands, common)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    try:
        load_queues(args.queues)
        broker = broker_from_dsn(args.broker)
        if args.command == 'run':
            agents = [load_agent(path) for path in args.agents]
            runner = _loop_runner(args.uvloop)
            with runner:
                runner.run(run_agents(broker, agents, args.grace))
        elif args.command == 'outbox':
            if not hasattr(args, 'db'):
                raise CLIError("outbox commands need SQLAlchemy: pip install 'microagent-mq[outbox]'")
            from .outbox.cli import run_relay
            asyncio.run(run_relay(broker, args))
        elif args.command == 'send':
            asyncio.run(send(broker, args.queue, args.message, topic=args.topic, delay=args.delay))
        else:
            print(asyncio.run(length(broker, args.queue)))
    except (CLIError, QueueException) as exc:
        print(f'microagent-mq: error: {exc}', file=sys.stderr)
        return 2 if isinstance(exc, CLIError) else 1
    return 0


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


def _loop_runner(use_uvloop: bool | None) -> asyncio.Runner:
    if use_uvloop is False:
        return asyncio.Runner()
    try:
        import uvloop
    except ImportError as exc:
        if use_uvloop:
            raise CLIError("--uvloop needs uvloop: pip install 'microagent-mq[uvloop]'") from exc
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


async def run_agents(broker: AbstractQueueBroker, agent_classes: list[type[MicroAgent]],
                     grace: float | None) -> None:
    """Start the agents, wait for SIGINT or SIGTERM, stop them gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    agents = [cls(broker=broker) for cls in agent_classes]
    started: list[MicroAgent] = []
    try:
        for agent in agents:
            await agent.start()
            started.append(agent)
        log.info('Running %s on %r; SIGINT or SIGTERM stops', ', '.join(
            type(a).__name__ for a in agents), broker)
        await stop.wait()
        log.info('Stopping')
    finally:
        for agent in reversed(started):
            with contextlib.suppress(Exception):
                await agent.stop(grace)
        await broker.close()


async def send(broker: AbstractQueueBroker, queue: str, message: str, **options: Any) -> None:
    """Send one message given as JSON text."""
    try:
        data = orjson.loads(message)
    except orjson.JSONDecodeError as exc:
        raise CLIError(f'the message is not valid JSON: {exc}') from exc
    if not isinstance(data, dict):
        raise CLIError('the message must be a JSON object')
    try:
        await broker.send(queue, data, **options)
    finally:
        await broker.close()


async def length(broker: AbstractQueueBroker, queue: str) -> int:
    """The number of messages waiting in ``queue``."""
    try:
        return await broker.queue_length(queue)
    finally:
        await broker.close()


if __name__ == '__main__':  # pragma: no cover
    sys.exit(main())
