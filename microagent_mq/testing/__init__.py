"""Helpers for tests of services built on microagent_mq (the pytest plugin is ``.plugin``)."""

from .clock import VirtualClock
from .null import NullBroker, Published
from .polling import wait_until
from .virtual import ProcessReport, TestBroker

__all__ = ['NullBroker', 'ProcessReport', 'Published', 'TestBroker', 'VirtualClock', 'wait_until']
