"""``python -m microagent_mq.cli``."""

import sys

from .main import main

sys.exit(main())
