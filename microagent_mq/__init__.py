"""microagent_mq: asyncio agents reading queues from Redis, RabbitMQ or memory."""

from .agent import MicroAgent, consumer, on
from .broker import AbstractQueueBroker, BoundQueue
from .consumer import Consumer
from .control import Reject, Retry
from .default_broker import get_default_broker, override_broker, set_default_broker
from .exceptions import (
    BrokerUnavailable,
    ConfigurationError,
    InvalidDSN,
    QueueException,
    QueueFull,
    QueueNotFound,
    QueueSourceError,
    SerializingError,
)
from .loader import load_queues
from .messages import Message, MessageInfo, publish, publish_many
from .middleware import Middleware
from .options import ConsumerOptions
from .queue import Queue
from .transport import DeadLetter, Retained

__version__ = '0.1.0'

__all__ = [
    'AbstractQueueBroker',
    'BoundQueue',
    'BrokerUnavailable',
    'ConfigurationError',
    'Consumer',
    'ConsumerOptions',
    'DeadLetter',
    'InvalidDSN',
    'Message',
    'MessageInfo',
    'MicroAgent',
    'Middleware',
    'Queue',
    'QueueException',
    'QueueFull',
    'QueueNotFound',
    'QueueSourceError',
    'Reject',
    'Retained',
    'Retry',
    'SerializingError',
    '__version__',
    'consumer',
    'get_default_broker',
    'load_queues',
    'on',
    'override_broker',
    'publish',
    'publish_many',
    'set_default_broker',
]
