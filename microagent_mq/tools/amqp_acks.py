"""Which plain acks of one channel can travel as one ``basic.ack(multiple=True)``.

Acks on a transactional consumer channel take effect at the commit (``amqp_tx``), so they
are held until then and sent just before it: where they settle a run of deliveries with
nothing unsettled among them (a consumer handling in order does nothing else), one frame
settles the run. RabbitMQ's ``multiple`` acks every delivery of the channel still
unacknowledged up to the tag, so the run ends before the first delivery this book still
knows as open: handed out or buffered, or settled by other means whose commit has not
succeeded (a copy and its ack, ``amqp_tx.atomically``: a rolled-back one is open again).
Acks above it are sent one by one, as before.

Deliveries are noted as they arrive, in the channel's tag order (the client calls the
consumer back in that order), so an open delivery is never missing from the book; a
delivery the book never hears settled only makes later acks go one by one.
"""

from collections.abc import Iterator


class AckBook:
    """Delivery tags of one channel: open ones, and plain acks waiting for the commit."""

    __slots__ = ('_acked', '_open')

    def __init__(self) -> None:
        self._open: set[int] = set()  # delivered, no ack or nack sent for it (or rolled back)
        self._acked: list[int] = []  # plain acks to send before the next commit

    def delivered(self, tag: int) -> None:
        self._open.add(tag)

    def settled(self, tag: int) -> None:
        """Settled by a frame of its own, committed (a copy and its ack, or a nack)."""
        self._open.discard(tag)

    def ack(self, tag: int) -> None:
        """A plain ack, sent by ``take`` before the next commit."""
        self._acked.append(tag)

    @property
    def waiting(self) -> int:
        """Plain acks not yet sent."""
        return len(self._acked)

    def take(self) -> Iterator[tuple[int, bool]]:
        """The acks to send now, as (delivery tag, multiple); they are no longer open."""
        if not self._acked:
            return
        acked = sorted(self._acked)
        self._acked = []
        still_open = self._open.difference(acked)
        first_open = min(still_open) if still_open else acked[-1] + 1
        self._open = still_open
        run = 0  # the acks below first_open: one frame settles them all
        while run < len(acked) and acked[run] < first_open:
            run += 1
        if run:
            yield acked[run - 1], run > 1
        for tag in acked[run:]:
            yield tag, False
