"""The tables of docs/benchmarks.md, written from one run (``python -m bench --docs``).

One table per broker between the markers below, with the command, the date, the machine and
every client's version, so a reader knows what produced them.
"""

import asyncio
import os
import platform
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .systems import AMQP_DSN, NATS_DSN, REDIS_DSN

DOCS = Path(__file__).resolve().parent.parent / 'docs' / 'benchmarks.md'
START, END = '<!-- bench:tables:start -->', '<!-- bench:tables:end -->'
COLUMNS = {'faststream': 'faststream', 'microagent1': 'microagent 1.x'}
DISTRIBUTIONS = ('microagent-mq', 'redis', 'hiredis', 'aio-pika', 'aiormq', 'nats-py', 'orjson',
                 'faststream', 'microagent')
DASH = '\N{EN DASH}'
UNITS = {'msg_per_s': 'msg/s', 'p50_us': 'p50 µs', 'cpu_us': 'CPU µs/msg'}


def environment() -> dict[str, Any]:
    """The machine, the date, the versions of the clients and of the servers."""
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return {'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
            'machine': f'{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, '
                       f'{_cpu_model()}, Python {platform.python_version()}',
            'load_before': ' '.join(f'{x:.2f}' for x in os.getloadavg()),
            'versions': versions, 'servers': asyncio.run(_servers())}


def _cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


async def _servers() -> dict[str, str]:
    """Each server's version, where it answers."""
    found: dict[str, str] = {}
    try:
        import redis.asyncio as aioredis
        client = aioredis.Redis.from_url(REDIS_DSN)
        found['Redis'] = str((await client.info('server'))['redis_version'])
        await client.aclose()
    except Exception:
        pass
    try:
        import aio_pika
        connection = await aio_pika.connect(AMQP_DSN)
        async with connection:
            properties = connection.transport.connection.server_properties  # type: ignore[union-attr]
            found['RabbitMQ'] = str(properties.get('version', '?'))
    except Exception:
        pass
    try:
        import nats
        client = await nats.connect(NATS_DSN)
        found['NATS'] = str(client._server_info.get('version', '?'))
        await client.close()
    except Exception:
        pass
    return found


Plan = dict[str, list[tuple[str, int, str]]]
Compared = Callable[[str, str], tuple[str, str]]


def tables(run: dict[str, Any], plan: Plan, compared: Compared) -> str:
    """Markdown: the run's header, then a table per broker (``compared``: a scenario's two
    systems, ours and its baseline)."""
    env = run['environment']
    versions = ', '.join(f'{name} {v}' for name, v in env['versions'].items())
    servers = ', '.join(f'{name} {v}' for name, v in env['servers'].items())
    lines = [f"`{run['command']}`, {env['date']}, {run['rounds']} rounds (medians, min{DASH}max), "
             f"{run['seconds']:.0f} s{', uvloop' if run['uvloop'] else ''}.",
             '',
             f"Machine: {env['machine']}; load average {env['load_before']} when it started "
             '(other work ran on it meanwhile: compare ratios within a table, not across runs).',
             f'Clients: {versions}. Servers: {servers}.', '']
    for broker, scenarios in plan.items():
        entries = run['results'].get(broker)
        if not entries:
            continue
        peers = sorted({system.split('-', 1)[1] for entry in entries.values() for system in entry
                        if system.split('-', 1)[-1] in COLUMNS})
        lines += [f'### {broker}', '',
                  '| scenario | n | figure | microagent_mq | baseline | ratio | '
                  + ''.join(f'{COLUMNS[p]} | ' for p in peers),
                  '|---|---:|---|---:|---:|---:|' + '---:|' * len(peers)]
        for scenario, _, figure in scenarios:
            entry = entries.get(scenario)
            if entry is None:
                continue
            ours, base = compared(broker, scenario)
            cells = [scenario, f"{entry['n']:,}", UNITS[figure], _cell(entry[ours][figure]),
                     _cell(entry[base][figure]), f"{entry['ratio']:.2f}"]
            cells += [_cell(entry[f'{broker}-{p}'][figure]) if f'{broker}-{p}' in entry else '—'
                      for p in peers]
            lines.append('| ' + ' | '.join(cells) + ' |')
        lines.append('')
    return '\n'.join(lines)


def _cell(summary: dict[str, float]) -> str:
    digits = 2 if summary['median'] < 10 else 0
    return (f"{summary['median']:,.{digits}f} ({summary['min']:,.{digits}f}{DASH}"
            f"{summary['max']:,.{digits}f})")


def write_docs(run: dict[str, Any], plan: Plan, compared: Compared) -> None:
    """Replace the tables between the markers of docs/benchmarks.md."""
    text = DOCS.read_text()
    head, _, rest = text.partition(START)
    _, found, tail = rest.partition(END)
    if not found:
        raise SystemExit(f'{DOCS} has no {START} ... {END} section to write into')
    DOCS.write_text(f'{head}{START}\n{tables(run, plan, compared)}\n{END}{tail}')
    print(f'written {DOCS}')
