"""Run the example service on the in-memory broker, print what happened, exit."""

import asyncio
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.service import Mailer, Signups
from microagent_mq.testing import wait_until
from microagent_mq.tools.memory import MemoryBroker


async def main() -> dict[str, object]:
    broker = MemoryBroker('memory://demo')
    mailer, signups = Mailer(broker=broker), Signups(broker=broker)
    await mailer.start()
    await signups.start()

    async def all_handled() -> bool:
        return len(mailer.welcomed) == 3 and len(await broker.dead_letters('user_created')) == 2

    await wait_until(all_handled)
    dead = await broker.dead_letters('user_created')
    result = {
        'welcomed': mailer.welcomed,
        'dead_letters': [(letter.data['user_id'], letter.error) for letter in dead],
        'waiting': await broker.user_created.length(),
    }
    await mailer.stop()
    return result


if __name__ == '__main__':
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    # The agents tell what they do, so the engine's ERROR lines (the dead letters this demo
    # provokes) come with their explanation.
    logging.getLogger('microagent_mq.agent').setLevel(logging.INFO)
    outcome = asyncio.run(main())
    print('welcomed:', ', '.join(outcome['welcomed']))  # type: ignore[arg-type]
    for user_id, error in outcome['dead_letters']:  # type: ignore[attr-defined]
        print(f'dead letter: user {user_id}: {error}')
    print('waiting:', outcome['waiting'])
