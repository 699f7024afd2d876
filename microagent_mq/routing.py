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
    # Dynamic programming over (pattern position, word position): linear in their product,
    # where the naive recursion is exponential in the number of '#'.
    # reachable[j]: the pattern so far can consume exactly the first j words.
    reachable = [True] + [False] * len(words)
    for head in pattern:
        if head == '#':  # zero or more words: every position from the first reachable on
            first = next((j for j, ok in enumerate(reachable) if ok), None)
            reachable = [first is not None and j >= first for j in range(len(words) + 1)]
        else:  # exactly one word, which must equal head unless head is '*'
            reachable = [False] + [reachable[j] and (head == '*' or head == words[j])
                                   for j in range(len(words))]
        if not any(reachable):
            return False
    return reachable[-1]
