"""Operators' commands: ``queues``, ``dlq list|requeue|purge``, ``purge``; all with ``--json``."""

import argparse
import asyncio
import datetime
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from ..broker import AbstractQueueBroker
from ..queue import Queue
from ..transport import DeadLetter
from .errors import EXIT_OK, EXIT_USAGE, CLIError

COMMANDS = frozenset({'queues', 'dlq', 'purge'})


def add_commands(commands: Any, common: argparse.ArgumentParser,
                 positive_int: Callable[[str], int]) -> None:
    """Register the admin commands on the ``commands`` subparsers of the main parser."""
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument('--json', action='store_true', help='print JSON instead of text')
    parents = [common, output]
    commands.add_parser('queues', parents=parents,
                        help='every declared queue: ready, delayed, in-flight and dead-letter counts')
    dlq = commands.add_parser('dlq', help='look at or repair dead letters')
    actions = dlq.add_subparsers(dest='action', required=True, parser_class=type(dlq))
    listing = actions.add_parser('list', parents=parents, help='the oldest dead letters of QUEUE')
    listing.add_argument('queue')
    listing.add_argument('--limit', type=positive_int, default=100, help='at most (default %(default)s)')
    requeue = actions.add_parser('requeue', parents=parents,
                                 help='move dead letters back into QUEUE as first attempts')
    requeue.add_argument('queue')
    requeue.add_argument('--id', dest='ids', action='append', metavar='ID',
                         help='only this message id (repeatable; default: every dead letter)')
    dead_purge = actions.add_parser('purge', parents=parents, help='delete every dead letter of QUEUE')
    dead_purge.add_argument('queue')
    dead_purge.add_argument('--yes', action='store_true', help='really delete them')
    purge = commands.add_parser('purge', parents=parents,
                                help='delete the messages waiting in QUEUE (not those being handled)')
    purge.add_argument('queue')
    purge.add_argument('--yes', action='store_true', help='really delete them')


def dispatch(args: argparse.Namespace, broker: AbstractQueueBroker) -> int:
    """Run the admin command ``args`` asks for; print its result."""
    command = args.command if args.command != 'dlq' else f'dlq {args.action}'
    if command in ('purge', 'dlq purge') and not args.yes:
        raise CLIError(f'{command} {args.queue} deletes messages for good: add --yes', EXIT_USAGE)
    action: Callable[[], Awaitable[Any]] = {
        'queues': lambda: queues(broker),
        'dlq list': lambda: dead_letters(broker, args.queue, args.limit),
        'dlq requeue': lambda: requeue(broker, args.queue, args.ids),
        'dlq purge': lambda: purged(broker.purge_dead_letters(args.queue), args.queue),
        'purge': lambda: purged(broker.purge(args.queue), args.queue),
    }[command]
    result = asyncio.run(_closing(broker, action))
    print(orjson.dumps(result).decode() if args.json else _text(command, result))
    return EXIT_OK


async def _closing(broker: AbstractQueueBroker, action: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await action()
    finally:
        await broker.close()


async def queues(broker: AbstractQueueBroker) -> list[dict[str, Any]]:
    """Counts of every declared queue (exchanges are not queues), by name."""
    names = sorted(name for name, queue in Queue.get_all().items() if not queue.is_exchange)
    stats = [await broker.queue_stats(name) for name in names]
    return [{'queue': s.queue, 'ready': s.ready, 'delayed': s.delayed, 'in_flight': s.in_flight,
             'dead': s.dead} for s in stats]


async def dead_letters(broker: AbstractQueueBroker, queue: str, limit: int) -> list[dict[str, Any]]:
    """The oldest ``limit`` dead letters of ``queue``, left where they are."""
    return [_letter(letter) for letter in await broker.dead_letters(queue, limit)]


async def requeue(broker: AbstractQueueBroker, queue: str, ids: list[str] | None) -> dict[str, Any]:
    """Dead letters of ``queue`` (those of ``ids`` only, when given) back into it."""
    return {'queue': queue, 'requeued': await broker.requeue_dead_letters(queue, ids)}


async def purged(count: Awaitable[int], queue: str) -> dict[str, Any]:
    """``{'queue': ..., 'deleted': N}`` once the purge ``count`` is done."""
    return {'queue': queue, 'deleted': await count}


def _letter(letter: DeadLetter) -> dict[str, Any]:
    return {'id': letter.message_id, 'attempts': letter.attempts, 'error': letter.error,
            'failed_at': _iso(letter.failed_at), 'body': letter.data}


def _iso(epoch_s: float) -> str | None:
    if not epoch_s:
        return None
    return datetime.datetime.fromtimestamp(epoch_s, datetime.UTC).isoformat(timespec='seconds')


def _text(command: str, result: Any) -> str:
    if command == 'queues':
        rows = [('QUEUE', 'READY', 'DELAYED', 'IN_FLIGHT', 'DEAD')] + [
            tuple('-' if r[k] is None else str(r[k]) for k in ('queue', 'ready', 'delayed', 'in_flight',
                                                                'dead')) for r in result]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        return '\n'.join('  '.join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                         for row in rows)
    if command == 'dlq list':
        return '\n'.join(f'{r["id"]}  attempts={r["attempts"]}  failed_at={r["failed_at"]}  '
                         f'error={r["error"]!r}  body={orjson.dumps(r["body"]).decode()}'
                         for r in result) or '(no dead letters)'
    if command == 'dlq requeue':
        return f'requeued {result["requeued"]} dead letter(s) into {result["queue"]}'
    return f'deleted {result["deleted"]} message(s) from {result["queue"]}' + (
        ' dead letters' if command == 'dlq purge' else '')
