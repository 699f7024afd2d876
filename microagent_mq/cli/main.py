"""``microagent-mq``: run agents, send a message, read a queue's length.

Every option of ``run`` can come from the environment (``MQ_*``, shown in ``--help``); the
command line wins. Exit codes: 0 done, 1 a runtime failure (broker unreachable, invalid DSN,
a hook raised), 2 a usage error (unknown option, bad value, module not found).
"""

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import orjson

from .. import __version__
from ..broker import AbstractQueueBroker
from ..dsn import mask_dsn
from ..exceptions import QueueException
from ..factory import broker_from_dsn
from ..loader import load_queues
from . import admin, history
from .errors import EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, CLIError
from .logs import FORMATS, LEVELS, setup_logging
from .observe import Observers
from .run import catch_early_signals, load_agent, loop_runner, run_agents
from .supervisor import Supervisor, check_reload_available

log = logging.getLogger('microagent_mq.cli')
PROG = 'microagent-mq'


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f'{PROG}: error: {message} (see --help)', file=sys.stderr)
        sys.exit(EXIT_USAGE)


def env(name: str, default: Any = None) -> Any:
    """The value of ``MQ_<name>`` in the environment, or ``default``."""
    return os.environ.get(f'MQ_{name}', default)


def _bool_env(name: str) -> bool | None:
    value = env(name)
    if value is None:
        return None
    return value.strip().lower() in ('1', 'true', 'yes', 'on')


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a whole number, not {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected 1 or more, not {value}')
    return value


def _priority(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a priority from 0 to 9, not {text!r}') from None
    if not 0 <= value <= 9:
        raise argparse.ArgumentTypeError(f'expected a priority from 0 to 9, not {value}')
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a port number, not {text!r}') from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f'expected a port from 0 to 65535, not {value}')
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected seconds, not {text!r}') from None
    if not 0 <= value < float('inf'):
        raise argparse.ArgumentTypeError(f'expected seconds >= 0, not {text}')
    return value


def _level(text: str) -> str:
    if text.upper() not in LEVELS:
        raise argparse.ArgumentTypeError(f'expected one of {", ".join(LEVELS)}, not {text!r}')
    return text.upper()


def parser() -> argparse.ArgumentParser:
    """The command line, with its commands."""
    common = Parser(add_help=False)
    broker_default = env('BROKER', 'memory://default')
    common.add_argument('--broker', default=broker_default,
                        help='broker DSN: memory://, redis://, rediss://, redis+cluster://, amqp://, '
                             'amqps://, nats:// '
                             f'(env MQ_BROKER; now {mask_dsn(broker_default)})')
    common.add_argument('--queues', default=env('QUEUES', 'queues.json'),
                        help='queue declarations: a path, file:// or http(s):// URL '
                             '(env MQ_QUEUES; default %(default)s)')
    common.add_argument('--log-level', type=_level, default=_level(env('LOG_LEVEL', 'INFO')),
                        help=f'one of {", ".join(LEVELS)} (env MQ_LOG_LEVEL; default %(default)s)')
    common.add_argument('--log-format', choices=FORMATS, default=env('LOG_FORMAT', 'text'),
                        help='text, or json: one object per line (env MQ_LOG_FORMAT; '
                             'default %(default)s)')
    root = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument('--version', action='version', version=f'{PROG} {__version__}')
    commands = root.add_subparsers(dest='command', required=True, parser_class=Parser)
    run = commands.add_parser('run', parents=[common], help='run agents until SIGINT/SIGTERM')
    run.add_argument('agents', nargs='+', metavar='MODULE:AgentClass')
    run.add_argument('--grace', type=_seconds, default=env('GRACE'),
                     help='seconds running handlers get to finish on stop (env MQ_GRACE; '
                          'default: each consumer\'s stop_grace)')
    run.add_argument('--workers', type=_positive_int, default=env('WORKERS', '1'),
                     help='worker processes under a supervisor that restarts them (env MQ_WORKERS; '
                          'default %(default)s: one process, no supervisor)')
    run.add_argument('--only', default=env('ONLY'), metavar='QUEUE[,QUEUE]',
                     help='consume only these queues of the agents given (env MQ_ONLY)')
    run.add_argument('--reload', action=argparse.BooleanOptionalAction,
                     default=_bool_env('RELOAD') or False,
                     help='development: restart the workers when a *.py file changes (env '
                          "MQ_RELOAD; needs 'microagent-mq[reload]')")
    run.add_argument('--reload-dir', action='append', default=None, metavar='DIR',
                     help='where --reload watches (repeatable; env MQ_RELOAD_DIR; default: '
                          'the current directory)')
    run.add_argument('--health-port', type=_port, default=env('HEALTH_PORT'),
                     help='serve /livez and /readyz on this port (env MQ_HEALTH_PORT)')
    run.add_argument('--metrics-port', type=_port, default=env('METRICS_PORT'),
                     help='serve Prometheus metrics on this port; with --workers, the aggregate of '
                          "all workers (env MQ_METRICS_PORT; needs 'microagent-mq[metrics]')")
    run.add_argument('--tracing', action=argparse.BooleanOptionalAction,
                     default=_bool_env('TRACING') or False,
                     help="OpenTelemetry spans for sending and handling (env MQ_TRACING; needs "
                          "'microagent-mq[otel]' and an SDK configured, e.g. by opentelemetry-instrument)")
    run.add_argument('--uvloop', action=argparse.BooleanOptionalAction, default=_bool_env('UVLOOP'),
                     help='use uvloop (env MQ_UVLOOP; default: when installed)')
    send = commands.add_parser('send', parents=[common], help='send one JSON message')
    send.add_argument('queue')
    send.add_argument('message', metavar='JSON')
    send.add_argument('--topic', default='', help='routing key, for an exchange')
    send.add_argument('--delay', type=_seconds, default=0.0, help='seconds before delivery')
    send.add_argument('--priority', type=_priority, default=None,
                      help="0 to the queue's max_priority; higher is delivered first")
    length = commands.add_parser('length', parents=[common], help='print a queue length')
    length.add_argument('queue')
    _add_outbox(commands, common)
    admin.add_commands(commands, common, _positive_int)
    history.add_commands(commands, common, _positive_int)
    return root


def _add_outbox(commands: Any, common: argparse.ArgumentParser) -> None:
    # `outbox relay` needs the [outbox] extra: without it the command says so when used.
    try:
        from ..outbox.cli import add_parser
    except ImportError:
        outbox = commands.add_parser('outbox', help="the transactional outbox (pip install "
                                     "'microagent-mq[outbox]')")
        outbox.add_argument('rest', nargs=argparse.REMAINDER)
        return
    add_parser(commands, common)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        return _dispatch(args)
    except CLIError as exc:
        return _fail(str(exc), exc.exit_code)
    except QueueException as exc:
        return _fail(str(exc), EXIT_RUNTIME)
    except KeyboardInterrupt:
        return _fail('interrupted', EXIT_RUNTIME)
    except Exception as exc:  # a one-line report; the traceback at debug level
        log.debug('Unexpected failure', exc_info=True)
        return _fail(f'{type(exc).__name__}: {exc}', EXIT_RUNTIME)


def _fail(message: str, code: int) -> int:
    print(f'{PROG}: error: {message}', file=sys.stderr)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    load_queues(args.queues)
    broker = broker_from_dsn(args.broker)
    if args.command == 'run':
        return _run(args, broker)
    if args.command == 'outbox':
        if not hasattr(args, 'db'):
            raise CLIError("outbox commands need SQLAlchemy: pip install 'microagent-mq[outbox]'")
        from ..outbox.cli import run_relay

        asyncio.run(run_relay(broker, args))
        return EXIT_OK
    if args.broker.startswith('memory://'):
        log.warning('%s on %s: a memory broker lives in this process only; nothing outlives it',
                    args.command, args.broker)
    if args.command in admin.COMMANDS:
        return admin.dispatch(args, broker)
    if args.command in history.COMMANDS:
        return history.dispatch(args, broker)
    if args.command == 'send':
        options: dict[str, Any] = {'topic': args.topic, 'delay': args.delay}
        if args.priority is not None:
            options['priority'] = args.priority
        asyncio.run(send(broker, args.queue, args.message, **options))
    else:
        print(asyncio.run(length(broker, args.queue)))
    return EXIT_OK


def _run(args: argparse.Namespace, broker: AbstractQueueBroker) -> int:
    if os.environ.get('MQ_SUPERVISED'):
        catch_early_signals()
    agents = [load_agent(path) for path in args.agents]  # import errors show before any fork
    only = {q.strip() for q in args.only.split(',') if q.strip()} if args.only else None
    grace = None if args.grace is None else float(args.grace)
    workers = int(args.workers)
    if workers > 1 or args.reload:
        if args.reload:
            check_reload_available()
        dirs = args.reload_dir or [d for d in (env('RELOAD_DIR') or os.getcwd()).split(os.pathsep) if d]
        metrics_port = None if args.metrics_port is None else int(args.metrics_port)
        supervisor = Supervisor(_worker_args(args), workers, grace,
                                dirs if args.reload else (), args.health_port, metrics_port)
        with loop_runner(args.uvloop) as runner:
            return runner.run(supervisor.run())
    health_port = None if args.health_port is None else int(args.health_port)
    metrics_port = None if args.metrics_port is None else int(args.metrics_port)
    observers = Observers(broker, metrics_port, args.tracing)
    with loop_runner(args.uvloop) as runner:
        runner.run(run_agents(broker, agents, grace, only, health_port, observers))
    return EXIT_OK


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The command line of one worker: the same run, in one process, without health/reload."""
    worker = ['run', *args.agents, '--broker', args.broker, '--queues', args.queues,
              '--log-level', args.log_level, '--log-format', args.log_format, '--workers', '1',
              '--no-reload']
    if args.grace is not None:
        worker += ['--grace', str(args.grace)]
    if args.only:
        worker += ['--only', args.only]
    if args.uvloop is not None:
        worker.append('--uvloop' if args.uvloop else '--no-uvloop')
    worker.append('--tracing' if args.tracing else '--no-tracing')
    return worker


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
