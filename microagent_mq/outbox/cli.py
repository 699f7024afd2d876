"""``microagent-mq outbox relay``: run an ``OutboxRelay`` until SIGINT or SIGTERM."""

import argparse
import asyncio
import logging
import signal

from sqlalchemy.ext.asyncio import create_async_engine

from ..broker import AbstractQueueBroker
from .relay import OutboxRelay
from .store import Outbox

log = logging.getLogger('microagent_mq.outbox')


def add_parser(commands: 'argparse._SubParsersAction[argparse.ArgumentParser]',
               common: argparse.ArgumentParser) -> None:
    """``outbox relay --db URL`` (the broker and queues come from the common options)."""
    outbox = commands.add_parser('outbox', help='the transactional outbox')
    actions = outbox.add_subparsers(dest='outbox_command', required=True)
    relay = actions.add_parser('relay', parents=[common], help='publish committed outbox rows '
                               'until SIGINT/SIGTERM')
    relay.add_argument('--db', required=True, help='SQLAlchemy async URL, e.g. '
                       'postgresql+asyncpg://user@host/db or sqlite+aiosqlite:///path.db')
    relay.add_argument('--table', default='mq_outbox', help='outbox table (default %(default)s)')
    relay.add_argument('--poll-interval', type=float, default=1.0,
                       help='seconds between polls without a NOTIFY (default %(default)s)')
    relay.add_argument('--batch-size', type=int, default=100, help='rows per pass (default %(default)s)')


async def run_relay(broker: AbstractQueueBroker, args: argparse.Namespace) -> None:
    """Publish until SIGINT or SIGTERM; the pass in progress finishes (publish, then mark)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    engine = create_async_engine(args.db)
    relay = OutboxRelay(Outbox(engine, args.table), broker, poll_interval=args.poll_interval,
                        batch_size=args.batch_size)
    try:
        await relay.start()
        log.info('Outbox relay running on table %s to %r; SIGINT or SIGTERM stops', args.table, broker)
        await stop.wait()
        log.info('Stopping the outbox relay')
        await relay.stop()
        log.info('Outbox relay stopped after publishing %d message(s)', relay.published)
    finally:
        await broker.close()
        await engine.dispose()
