"""Retention commands: ``history QUEUE`` lists what a queue retained, ``replay QUEUE`` sends it again."""

import argparse
import asyncio
import datetime
from collections.abc import Callable
from typing import Any

import orjson

from ..broker import AbstractQueueBroker
from ..transport import Retained
from .errors import EXIT_OK

COMMANDS = frozenset({'history', 'replay'})


def add_commands(commands: Any, common: argparse.ArgumentParser,
                 positive_int: Callable[[str], int]) -> None:
    """Register ``history`` and ``replay`` on the ``commands`` subparsers of the main parser."""
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument('--json', action='store_true', help='print JSON instead of text')
    history = commands.add_parser('history', parents=[common, output],
                                  help='the oldest messages QUEUE retained (a queue with retention)')
    history.add_argument('queue')
    history.add_argument('--since', type=_time, default=None, metavar='TIME',
                         help='sent at TIME or later: ISO 8601 (2026-11-27T10:00) or epoch seconds')
    history.add_argument('--limit', type=positive_int, default=100, help='at most (default %(default)s)')
    replay = commands.add_parser('replay', parents=[common, output],
                                 help='send what QUEUE retained again, in order, as new messages')
    replay.add_argument('queue')
    replay.add_argument('--since', type=_time, default=None, metavar='TIME',
                        help='sent at TIME or later: ISO 8601 (2026-11-27T10:00) or epoch seconds')
    replay.add_argument('--until', type=_time, default=None, metavar='TIME',
                        help='sent at TIME or earlier (default: now)')
    replay.add_argument('--from-id', default=None, metavar='ID',
                        help='start at the message with this id (inclusive)')


def dispatch(args: argparse.Namespace, broker: AbstractQueueBroker) -> int:
    """Run ``history`` or ``replay``; print the result."""
    if args.command == 'history':
        entries = asyncio.run(_closing(broker, broker.history(args.queue, args.since, args.limit)))
        rows = [_entry(entry) for entry in entries]
        if args.json:
            print(orjson.dumps(rows).decode())
        else:
            print('\n'.join(f'{r["id"]}  sent_at={r["sent_at"]}  body={orjson.dumps(r["body"]).decode()}'
                            for r in rows) or '(no retained messages)')
        return EXIT_OK
    count = asyncio.run(_closing(broker, broker.replay(args.queue, args.since, args.from_id, args.until)))
    if args.json:
        print(orjson.dumps({'queue': args.queue, 'replayed': count}).decode())
    else:
        print(f'replayed {count} message(s) into {args.queue}')
    return EXIT_OK


async def _closing(broker: AbstractQueueBroker, action: Any) -> Any:
    try:
        return await action
    finally:
        await broker.close()


def _entry(entry: Retained) -> dict[str, Any]:
    sent = datetime.datetime.fromtimestamp(entry.sent_at, datetime.UTC).isoformat(timespec='milliseconds')
    return {'id': entry.message_id, 'sent_at': sent, 'body': entry.data}


def _time(text: str) -> float:
    """An ISO 8601 time (naive: local time) or epoch seconds, as epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is no time: ISO 8601 like 2026-11-27T10:00, '
                                         f'or epoch seconds') from None
