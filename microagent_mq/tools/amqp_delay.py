"""Delayed delivery on RabbitMQ: a binary ladder of TTL queues, shared by every queue of a vhost.

The design is NServiceBus's (its RabbitMQ transport's "delayed delivery"), in milliseconds.
Level ``N`` (``N`` = 31 .. 0) is a durable topic exchange and a durable queue, both named
``microagent_mq.delay.N``; every message in that queue lives exactly ``2**N`` ms
(``x-message-ttl``), then RabbitMQ dead-letters it to the exchange of level ``N - 1`` (level 0:
to the exchange ``microagent_mq.delay.deliver``). A delayed message's routing key is its delay in
ms as 32 binary digits, most significant first (``0.0.....1.0.1.0``): the exchange of level ``N``
routes a message whose digit ``N`` is 1 into its queue (it waits ``2**N`` ms there) and one whose
digit is 0 straight on to the exchange below (no wait). Dead-lettering keeps the routing key, so
a message walks down the ladder and waits the sum of its 1 digits: its delay. The deliver
exchange (a headers exchange) hands it to its destination queue by the ``mq-delay-to`` header;
each queue is bound there (by that header) before its first delayed message is published.

Why this design: each level queue has one TTL, so it is FIFO and its head always expires first
(a message waits only behind messages that entered that level earlier and expire earlier): a
60 s delay never holds up a 0.2 s one. It is bounded: 32 queues and 33 exchanges for the whole
vhost, whatever the delays and however many queues; nothing expires, nothing is per delay.
Precision: milliseconds, rounded up, so a message never arrives early; each 1 digit costs one
dead-letter hop inside RabbitMQ (well under a millisecond each), the only lateness it adds.
Longest delay: ``MAX_DELAY_S`` (2**32 - 1 ms, about 49.7 days). The earlier design's queues
(``<queue>.delay.<ms>``, one per delay value) are no longer declared: each one still delivers
what it holds into its queue, then deletes itself by its own ``x-expires`` a minute later.
Risk kept from before: RabbitMQ dead-letters between classic queues at most once, so a crash of
RabbitMQ at the instant of a hop can lose that delayed message (a clean restart loses nothing).
"""

import math

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

LEVELS = 32
MAX_DELAY_MS = 2 ** LEVELS - 1
MAX_DELAY_S = MAX_DELAY_MS / 1000
PREFIX = 'microagent_mq.delay'
DELIVER = f'{PREFIX}.deliver'
DESTINATION_HEADER = 'mq-delay-to'  # not x-: a headers exchange ignores x- keys when matching


def level_name(level: int) -> str:
    """The exchange and the queue of one level."""
    return f'{PREFIX}.{level}'


def ladder_queue_names() -> list[str]:
    """Every queue the ladder has: all delayed messages of a vhost wait in these."""
    return [level_name(level) for level in range(LEVELS)]


def delay_ms(delay: float) -> int:
    """``delay`` seconds in whole milliseconds, rounded up (at least 1): never early."""
    return max(1, math.ceil(round(delay * 1000, 3)))


def routing_key(ms: int) -> str:
    """The delay as LEVELS binary digits, most significant first: the path down the ladder."""
    return '.'.join(format(ms, f'0{LEVELS}b'))


def entry_exchange(ms: int) -> str:
    """The level of the highest 1 digit: the levels above it would only pass the message on."""
    return level_name(ms.bit_length() - 1)


def _digit_pattern(level: int, digit: str) -> str:
    return '*.' * (LEVELS - 1 - level) + digit + '.#'


async def declare_ladder(channel: AbstractChannel) -> dict[str, AbstractExchange]:
    """Declare every level and the deliver exchange (idempotent; the same for everyone).

    Returns the level exchanges by name, to publish into.
    """
    below: AbstractExchange = await channel.declare_exchange(
        DELIVER, aio_pika.ExchangeType.HEADERS, durable=True)
    levels: dict[str, AbstractExchange] = {}
    for level in range(LEVELS):
        name = level_name(level)
        exchange = await channel.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(name, durable=True, arguments={
            'x-message-ttl': 2 ** level,
            'x-dead-letter-exchange': below.name,
        })
        await queue.bind(exchange, routing_key=_digit_pattern(level, '1'))
        await below.bind(exchange, routing_key=_digit_pattern(level, '0'))
        below = levels[name] = exchange
    return levels


async def bind_destination(queue: AbstractQueue) -> None:
    """Let the deliver exchange hand ``queue`` the delayed messages addressed to it."""
    await queue.bind(DELIVER, arguments={'x-match': 'all', DESTINATION_HEADER: queue.name})
