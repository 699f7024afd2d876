"""A consumer process for crash tests.

``python -m tests.crash_worker KIND NAMESPACE QUEUE MODE DIR OPTIONS_JSON``.

MODE ``hang``: note the message in DIR, then hang (the test kills the process).
MODE ``record``: append each handled ``n`` to DIR/handled-PID.
Prints ``ready`` once consuming; stops on SIGTERM.
"""

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from microagent_mq import MicroAgent, Queue, consumer

from .conftest import make_broker


async def main(kind: str, namespace: str, queue_name: str, mode: str, folder: str,
               options: dict[str, Any]) -> None:
    # Declaration options (max_priority, retention...) ride in OPTIONS_JSON under 'queue'.
    queue = Queue(queue_name, **options.pop('queue', {}))
    out = Path(folder)
    pid = os.getpid()

    class Worker(MicroAgent):
        @consumer(queue, **options)
        async def handle(self, n: int) -> None:
            if mode == 'hang':
                (out / f'started-{pid}-{n}').touch()
                await asyncio.sleep(3600)
            with (out / f'handled-{pid}').open('a') as file:
                file.write(f'{n}\n')

    agent = Worker(broker=make_broker(kind, namespace))
    await agent.start()
    print('ready', flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await agent.stop(grace=5)


if __name__ == '__main__':
    asyncio.run(main(*sys.argv[1:6], options=json.loads(sys.argv[6])))
