"""Topic routing with AMQP rules: words split on dots, ``*`` one word, ``#`` zero or more."""

import re
from functools import lru_cache

_WORD = r'[A-Za-z0-9_\-]+'
TOPIC_RE = re.compile(rf'^(?:{_WORD}(?:\.{_WORD})*)?$')
PATTERN_RE = re.compile(rf'^(?:{_WORD}|\*|#)(?:\.(?:{_WORD}|\*|#))*$')


def is_valid_topic(topic: str) -> bool:
    """A routing key: dot-separated words, or empty."""
    return TOPIC_RE.match(topic) is not None


def is_valid_pattern(pattern: str) -> bool:
    """A binding pattern: dot-separated words, ``*`` or ``#``."""
    return PATTERN_RE.match(pattern) is not None


@lru_cache(maxsize=4096)
def topic_matches(pattern: str, topic: str) -> bool:
    """Whether ``topic`` matches the binding ``pattern``."""
    return _match(tuple(pattern.split('.')), tuple(topic.split('.')) if topic else ())


def _match(pattern: tuple[str, ...], words: tuple[str, ...]) -> bool:
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == '#':
        # '#' may swallow any number of words, including none.
        return any(_match(rest, words[skip:]) for skip in range(len(words) + 1))
    if not words:
        return False
    return (head == '*' or head == words[0]) and _match(rest, words[1:])
