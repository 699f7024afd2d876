"""``python -m tests.chaos [--broker redis|amqp|nats|all] [--messages N] ...``: see docs/reliability.md.

Prints a table per broker and writes the JSON report. With ``--check`` the exit status is 1
when a message was lost or a worker died by itself (CI); duplicates are reported only.
"""

import argparse
import asyncio
import datetime
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from .run import Settings, chaos

ROWS = [
    ('sent', 'messages the producer sent (a send that raised was retried)'),
    ('handled_once', 'handled exactly once'),
    ('duplicates', 'handled more than once'),
    ('dead_letters', 'in the dead-letter queue'),
    ('lost', 'sent - handled - dead-lettered'),
    ('producer_errors', 'sends that raised (then retried)'),
    ('worker_deaths', 'workers that exited by themselves'),
    ('drain_s', 's from the end of the faults to all accounted for'),
]


def parser() -> argparse.ArgumentParser:
    default = Settings()
    args = argparse.ArgumentParser(prog='python -m tests.chaos', description=__doc__)
    args.add_argument('--broker', choices=['redis', 'amqp', 'nats', 'all'], default='all')
    args.add_argument('--messages', type=int, default=default.messages)
    args.add_argument('--workers', type=int, default=default.workers)
    args.add_argument('--concurrency', type=int, default=default.concurrency)
    args.add_argument('--duration', type=float, default=default.duration_s,
                      help='seconds of faults (default %(default)s)')
    args.add_argument('--restarts', type=int, default=default.restarts)
    args.add_argument('--seed', type=int, default=None)
    args.add_argument('--json', type=Path, default=None, help='write the reports here')
    args.add_argument('--keep', type=Path, default=None,
                      help='a folder for records and logs (default: a temporary one, removed)')
    args.add_argument('--markdown', action='store_true',
                      help="print docs/reliability.md's tables, not the plain ones")
    args.add_argument('--check', action='store_true',
                      help='exit 1 on a lost message or a worker that died by itself')
    return args


def table(result: dict[str, Any]) -> str:
    lines = [f'{result["broker"]}: {result["settings"]}']
    for key, meaning in ROWS:
        lines.append(f'  {key:<16} {result[key]!s:>8}   {meaning}')
    for key in ('duplicate_causes', 'dead_letter_errors', 'redelivery_after_sigkill_s', 'faults',
                'poison', 'foreign', 'sub_run_worker_deaths', 'server_start_s'):
        lines.append(f'  {key}: {json.dumps(result[key])}')
    if result['lost']:
        lines.append(f'  lost_sample: {result["lost_sample"]}')
    return '\n'.join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The table of docs/reliability.md for one broker."""
    settings = result['settings']
    lines = [f'**{result["broker"]}**, {result["date"]}: {settings["messages"]} messages, '
             f'{settings["workers"]} workers x {settings["concurrency"]}, '
             f'{settings["duration_s"]:g} s of faults', '', '| number | value |', '|---|---|']
    for key, _ in ROWS:
        lines.append(f'| {key} | {result[key]} |')
    for key in ('duplicate_causes', 'redelivery_after_sigkill_s', 'faults', 'foreign',
                'sub_run_worker_deaths', 'server_start_s'):
        lines.append(f'| {key} | `{json.dumps(result[key])}` |')
    poison = result['poison']
    dead = sum(outcome.startswith('dead-lettered') for outcome in poison.values())
    lines.append(f'| poison | {dead} of {len(poison)} dead-lettered at once |')
    return '\n'.join(lines)


async def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    brokers = ['redis', 'amqp', 'nats'] if args.broker == 'all' else [args.broker]
    results = []
    with tempfile.TemporaryDirectory(prefix='chaos-') as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        # The producer's reconnect warnings go to a file: the table is the output.
        logging.basicConfig(filename=folder / 'producer.log', level=logging.WARNING)
        for broker in brokers:
            settings = Settings(broker=broker, messages=args.messages, workers=args.workers,
                                concurrency=args.concurrency, duration_s=args.duration,
                                restarts=args.restarts, seed=args.seed)
            result = await chaos(settings, folder / broker)
            result['date'] = datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')
            results.append(result)
            print(markdown(result) if args.markdown else table(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    failed = [r['broker'] for r in results if r['lost'] or r['worker_deaths'] or r['unexpected']]
    if args.check and failed:
        print(f'chaos: FAILED on {", ".join(failed)} (lost messages or dead workers)',
              file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(asyncio.run(main()))
