"""What every in-process broker does alike with its queues: dead letters, purges, requeues.

The memory broker and the testing kit's ``TestBroker`` keep their queues in this process;
only how time passes differs (the clock behind ``put``). The primitives below work on any
queue with ``ready``, ``delayed`` and ``dead`` and a ``put``.
"""

from typing import Any, Protocol

from .in_process_options import Journal
from .transport import DeadLetter, Delivery, Retained


class InProcessQueue(Protocol):
    """The part of an in-process queue these primitives use."""

    ready: Any  # deque[Delivery], or LeveledReady with priorities
    delayed: list[Any]
    dead: list[DeadLetter]
    journal: 'Journal | None'

    def put(self, delivery: Delivery, delay: float = 0.0) -> None: ...


class InProcessPrimitives:
    """Broker primitives over ``self._get(name)``; mixed in before ``AbstractQueueBroker``."""

    def _get(self, name: str) -> InProcessQueue:
        raise NotImplementedError

    async def _dead_letters(self, name: str, limit: int) -> list[DeadLetter]:
        return self._get(name).dead[:limit]

    async def _requeue_dead_letters(self, name: str) -> int:
        queue = self._get(name)
        dead, queue.dead = queue.dead, []
        for letter in dead:
            queue.put(requeued(letter))
        return len(dead)

    async def _disconnect(self) -> None:
        return None

    async def _purge(self, name: str) -> int:
        queue = self._get(name)
        count = len(queue.ready) + len(queue.delayed)
        queue.ready.clear()
        queue.delayed.clear()
        return count

    async def _retained(self, name: str, since: float | None, until: float | None,
                        after: Any, limit: int) -> tuple[list[Retained], Any]:
        journal = self._get(name).journal
        if journal is None:  # declared with retention after the queue was first used
            return [], None
        return journal.read(since, until, after, limit)

    async def _purge_dead_letters(self, name: str) -> int:
        queue = self._get(name)
        count, queue.dead = len(queue.dead), []
        return count

    async def _requeue_dead_letters_by_id(self, name: str, ids: frozenset[str]) -> int:
        queue = self._get(name)
        chosen = [letter for letter in queue.dead if letter.message_id in ids]
        queue.dead = [letter for letter in queue.dead if letter.message_id not in ids]
        for letter in chosen:
            queue.put(requeued(letter))
        return len(chosen)


def requeued(letter: DeadLetter) -> Delivery:
    """A dead letter as a first attempt again, with the sender's headers (its type) and stamp."""
    return Delivery(letter.body, letter.message_id, 1, None, letter.headers, letter.sent_at,
                    priority=letter.priority)
