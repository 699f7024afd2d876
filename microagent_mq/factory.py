"""Choose a broker by the scheme of its DSN."""

import importlib
from typing import Any

from .broker import AbstractQueueBroker
from .dsn import mask_dsn, parse_dsn
from .exceptions import ConfigurationError

BROKERS = {
    'memory': ('microagent_mq.tools.memory', 'MemoryBroker'),
    'redis': ('microagent_mq.tools.redis', 'RedisBroker'),
    'rediss': ('microagent_mq.tools.redis', 'RedisBroker'),
    'unix': ('microagent_mq.tools.redis', 'RedisBroker'),
    'redis+cluster': ('microagent_mq.tools.redis', 'RedisBroker'),
    'rediss+cluster': ('microagent_mq.tools.redis', 'RedisBroker'),
    'amqp': ('microagent_mq.tools.amqp', 'AMQPBroker'),
    'amqps': ('microagent_mq.tools.amqp', 'AMQPBroker'),
    'nats': ('microagent_mq.tools.nats', 'NATSBroker'),
}


def broker_from_dsn(dsn: str, **options: Any) -> AbstractQueueBroker:
    """The broker for a ``memory://``, ``redis(s)://``, ``redis(s)+cluster://``, ``unix://``,
    ``amqp(s)://`` or ``nats://`` DSN."""
    scheme = parse_dsn(dsn, tuple(BROKERS)).scheme
    module, name = BROKERS[scheme]
    try:
        broker_class = getattr(importlib.import_module(module), name)
    except ImportError as exc:  # a missing extra: its message names the install command
        raise ConfigurationError(f'{scheme}:// DSNs: {exc}') from exc
    broker: AbstractQueueBroker = broker_class(dsn, **options)
    broker.log.debug('Broker for %s: %s', mask_dsn(dsn), name)
    return broker
