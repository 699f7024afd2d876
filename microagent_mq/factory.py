"""Choose a broker by the scheme of its DSN."""

import importlib
from typing import Any

from .broker import AbstractQueueBroker
from .dsn import mask_dsn, parse_dsn

BROKERS = {
    'memory': ('microagent_mq.tools.memory', 'MemoryBroker'),
    'redis': ('microagent_mq.tools.redis', 'RedisBroker'),
    'rediss': ('microagent_mq.tools.redis', 'RedisBroker'),
    'unix': ('microagent_mq.tools.redis', 'RedisBroker'),
    'amqp': ('microagent_mq.tools.amqp', 'AMQPBroker'),
    'amqps': ('microagent_mq.tools.amqp', 'AMQPBroker'),
    'nats': ('microagent_mq.tools.nats', 'NATSBroker'),
    'tls': ('microagent_mq.tools.nats', 'NATSBroker'),
}


def broker_from_dsn(dsn: str, **options: Any) -> AbstractQueueBroker:
    """``memory://``, ``redis://``, ``rediss://``, ``amqp(s)://``, ``nats://`` or ``tls://``: the broker for it."""
    scheme = parse_dsn(dsn, tuple(BROKERS)).scheme
    module, name = BROKERS[scheme]
    broker_class = getattr(importlib.import_module(module), name)
    broker: AbstractQueueBroker = broker_class(dsn, **options)
    broker.log.debug('Broker for %s: %s', mask_dsn(dsn), name)
    return broker
