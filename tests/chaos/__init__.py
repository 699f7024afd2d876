"""The chaos run: many messages through worker processes while faults rain on them.

``python -m tests.chaos --broker redis`` (or ``make chaos``); see docs/reliability.md.
"""
