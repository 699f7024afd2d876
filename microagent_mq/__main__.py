"""``python -m microagent_mq``: the ``microagent-mq`` command."""

import os
import signal
import sys

if os.environ.get('MQ_SUPERVISED'):  # before the imports: a supervisor may stop us any time
    _early: list[int] = []
    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, lambda number, frame: _early.append(number))

from .cli.main import main
from .cli.run import remember_early_signals

if os.environ.get('MQ_SUPERVISED'):
    remember_early_signals(_early)
sys.exit(main())
