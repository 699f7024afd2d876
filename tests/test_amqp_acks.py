"""Plain acks travel as one ``multiple`` ack only over runs with nothing open among them."""

import asyncio
import random
from collections import Counter
from collections.abc import Iterator

import pytest

from microagent_mq import MicroAgent, Queue, Reject, Retry, consumer
from microagent_mq.tools.amqp import AMQPBroker
from microagent_mq.tools.amqp_acks import AckBook

from .conftest import unique, wait_until


def book_of(delivered: int) -> AckBook:
    book = AckBook()
    for tag in range(1, delivered + 1):
        book.delivered(tag)
    return book


def test_acks_in_order_go_as_one_multiple_ack() -> None:
    book = book_of(5)
    for tag in (1, 2, 3):
        book.ack(tag)
    assert list(book.take()) == [(3, True)]
    book.ack(4)
    assert list(book.take()) == [(4, False)]  # one ack: no need for multiple
    assert list(book.take()) == []


def test_an_open_delivery_ends_the_run() -> None:
    book = book_of(6)
    for tag in (5, 1, 2, 4):  # 3 is still being handled, 6 is in the buffer
        book.ack(tag)
    assert list(book.take()) == [(2, True), (4, False), (5, False)]
    book.ack(3)
    assert list(book.take()) == [(3, False)]  # 4 and 5 were acked: 6 stays open


def test_a_delivery_settled_by_a_move_no_longer_ends_the_run() -> None:
    book = book_of(4)
    book.settled(2)  # retried: its copy and ack were committed
    for tag in (1, 3, 4):
        book.ack(tag)
    assert list(book.take()) == [(4, True)]


def test_a_delivery_not_yet_noted_is_never_covered() -> None:
    book = book_of(2)
    book.ack(2)
    assert list(book.take()) == [(2, False)]  # 1 is open


def test_random_settling_never_covers_an_open_delivery() -> None:
    rng = random.Random(7)
    for _ in range(200):
        book, acked_at_rabbit, open_tags = AckBook(), set[int](), set[int]()
        delivered = 0
        for _ in range(60):
            if rng.random() < 0.4 or not open_tags:
                delivered += 1
                book.delivered(delivered)
                open_tags.add(delivered)
            else:
                tag = rng.choice(sorted(open_tags))
                open_tags.discard(tag)
                if rng.random() < 0.2:
                    book.settled(tag)
                    acked_at_rabbit.add(tag)
                else:
                    book.ack(tag)
            if rng.random() < 0.3:
                for tag, multiple in book.take():
                    # what RabbitMQ does: every unacknowledged delivery up to the tag
                    covered = ({t for t in range(1, tag + 1) if t not in acked_at_rabbit}
                               if multiple else {tag})
                    assert tag not in acked_at_rabbit  # never an ack of an unknown tag
                    assert not covered & open_tags  # never an ack of a message still open
                    acked_at_rabbit |= covered


@pytest.fixture
def broker_kind() -> str:
    """conftest's ``broker`` fixture, on RabbitMQ only: closed and cleaned up after."""
    return 'amqp'


@pytest.mark.amqp
async def test_acks_retries_and_dead_letters_mixed_out_of_order(
        broker: AMQPBroker, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, bool]] = []
    real_take = AckBook.take

    def take(self: AckBook) -> Iterator[tuple[int, bool]]:
        for ack in real_take(self):
            sent.append(ack)
            yield ack

    monkeypatch.setattr(AckBook, 'take', take)
    queue = Queue(unique())
    seen: Counter[int] = Counter()
    done: set[int] = set()

    class Agent(MicroAgent):
        @consumer(queue, concurrency=8, max_attempts=3)
        async def handle(self, n: int) -> None:
            seen[n] += 1
            await asyncio.sleep(random.random() / 200)  # finish out of order
            if n % 10 == 3 and seen[n] == 1:
                raise Retry(delay=0.01)
            if n % 10 == 7:
                raise Reject('no')
            done.add(n)

    async def empty() -> bool:
        return await broker.queue_length(queue.name) == 0

    await broker.send_many(queue.name, [{'n': n} for n in range(300)])
    agent = Agent(broker=broker)
    await agent.start()
    handled = {n for n in range(300) if n % 10 != 7}
    await wait_until(lambda: done == handled, 60)
    await wait_until(empty, 10)
    await agent.stop()
    assert all(seen[n] == (2 if n % 10 == 3 else 1) for n in range(300))  # no duplicates
    assert any(multiple for _, multiple in sent)  # runs did travel as one ack
    assert len(await broker.dead_letters(queue.name, 100)) == 30
