"""An outbox relay process for crash tests: ``python -m tests.outbox_relay_worker DB TABLE NS QUEUE``.

Publishes to the test Redis under namespace NS, printing ``sent`` after each message it
published, and waits 2 ms after each, which widens the window between publishing a pass
and marking it (the test SIGKILLs the process inside it). Stops on SIGTERM.
"""

import asyncio
import signal
import sys
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import create_async_engine

from microagent_mq import Queue
from microagent_mq.outbox import Outbox, OutboxRelay
from microagent_mq.tools.redis import RedisBroker
from microagent_mq.transport import Outgoing

from .conftest import REDIS_DSN


class SlowRedisBroker(RedisBroker):
    async def _publish(self, batch: Sequence[Outgoing]) -> None:
        await super()._publish(batch)
        sys.stdout.write('sent\n' * len(batch))
        sys.stdout.flush()
        await asyncio.sleep(0.002)


async def main(db: str, table: str, namespace: str, queue: str) -> None:
    Queue(queue)
    engine = create_async_engine(db)
    broker = SlowRedisBroker(REDIS_DSN, prefix=f'test:{namespace}:')
    relay = OutboxRelay(Outbox(engine, table), broker, poll_interval=0.05, batch_size=50)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await relay.start()
    print('ready', flush=True)
    await stop.wait()
    await relay.stop()
    await broker.close()
    await engine.dispose()


if __name__ == '__main__':
    asyncio.run(main(*sys.argv[1:5]))
