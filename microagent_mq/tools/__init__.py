"""Transports: ``memory``, ``redis`` and ``amqp``."""
