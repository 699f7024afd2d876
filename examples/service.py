"""A small service: ``Signups`` produces sign-ups, ``Mailer`` welcomes each one.

Run it with no server at all:

    microagent-mq run examples.service:Mailer examples.service:Signups

or on Redis / RabbitMQ with ``--broker redis://localhost/0`` / ``--broker amqp://guest:guest@localhost/``.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microagent_mq import MicroAgent, Reject, consumer, load_queues, on

queues: Any = load_queues(str(Path(__file__).resolve().parent.parent / 'queues.json'))


@dataclass
class Signup:
    """What a sign-up message must carry; a message without an email is dead-lettered."""

    user_id: int
    email: str

    def __post_init__(self) -> None:
        if '@' not in self.email:
            raise ValueError(f'not an email address: {self.email!r}')


class Mailer(MicroAgent):
    """Consumes ``user_created``: one welcome mail per new user."""

    welcomed: list[str]

    @on('pre_start')
    async def prepare(self) -> None:
        self.welcomed = []

    @consumer(queues.user_created, timeout=10, dto_class=Signup, dto_name='signup',
              max_attempts=3, retry_delay=0.1)
    async def welcome(self, signup: Signup, **_: Any) -> None:
        if signup.email.endswith('@blocked.example'):
            raise Reject('address is blocked')
        self.welcomed.append(signup.email)
        self.log.info('Welcome mail sent to %s', signup.email)


class Signups(MicroAgent):
    """Produces a few sign-ups when it starts (a stand-in for a web form)."""

    @on('post_start')
    async def produce(self) -> None:
        assert self.broker is not None
        for user_id in range(1, 4):
            await self.broker.user_created.send({'user_id': user_id,
                                                 'email': f'user{user_id}@example.com'})
        # Said before the engine's ERROR lines, so a newcomer reads them as the point of the demo.
        self.log.info('Now 2 bad sign-ups, on purpose: a blocked address (the handler rejects it) '
                      'and a malformed one (the Signup DTO refuses it). The 2 ERROR lines that '
                      'follow are the engine dead-lettering them: the behaviour this demo shows.')
        await self.broker.user_created.send({'user_id': 4, 'email': 'spam@blocked.example'})
        await self.broker.user_created.send({'user_id': 5, 'email': 'not-an-address'})
