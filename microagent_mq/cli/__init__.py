"""The ``microagent-mq`` command line."""

from .errors import CLIError
from .main import length, main, parser, send
from .run import load_agent, run_agents

__all__ = ['CLIError', 'length', 'load_agent', 'main', 'parser', 'run_agents', 'send']
