"""The chaos report's arithmetic, on records written by hand (the run itself: make chaos)."""

from pathlib import Path

from .chaos.record import Fault, Line, Outcome, read_lines, report


def handling(n: int, pid: int, start: float, end: float | None = None) -> list[Line]:
    lines = [Line('S', 'main', n, pid, start)]
    if end is not None:
        lines.append(Line('E', 'main', n, pid, end))
    return lines


def test_lost_is_sent_minus_handled_minus_dead() -> None:
    lines = handling(1, 10, 1.0, 1.1) + handling(2, 10, 1.2)  # 2 started, never ended
    outcome = Outcome(sent={1, 2, 3, 4}, dead={4: 'max_attempts'})
    result = report(lines, outcome)
    assert (result['sent'], result['handled_once'], result['dead_letters']) == (4, 1, 1)
    assert result['lost'] == 2
    assert result['lost_sample'] == [2, 3]
    assert result['unexpected'] == 0


def test_duplicates_and_their_likely_causes() -> None:
    lines = (handling(1, 10, 1.0, 1.1) + handling(1, 11, 9.0, 9.1)  # pid 10 killed after it
             + handling(2, 12, 2.0, 2.1) + handling(2, 11, 3.0, 3.1)  # a cut in between
             + handling(3, 11, 4.0, 4.1) + handling(3, 11, 4.2, 4.3)  # sent twice
             + handling(5, 11, 40.0, 40.1) + handling(5, 11, 50.0, 50.1)  # nothing near
             + handling(6, 11, 63.0, 63.1) + handling(6, 11, 66.0, 66.1))  # the broker was down
    outcome = Outcome(sent={1, 2, 3, 5, 6}, retried_sends={3},
                      faults=[Fault('sigkill', 1.5, pid=10), Fault('cut', 2.5),
                              Fault('broker_restart', 60.0, until=65.0)])
    result = report(lines, outcome)
    assert result['duplicates'] == 5
    assert result['handled_once'] == 0
    assert result['duplicate_causes'] == {
        'broker_restart between the handling and its ack': 1,
        'cut between the handling and its ack': 1,
        'producer retry (sent twice)': 1,
        'sigkill of the worker after the handler ended, before its ack': 1,
        'unknown (no fault near it)': 1,
    }


def test_redelivery_latency_after_sigkill() -> None:
    lines = (handling(1, 10, 1.0) + handling(1, 11, 13.0, 13.1)  # in the handler at the kill
             + handling(2, 10, 1.0, 1.5)  # finished before the kill: not counted
             + handling(3, 10, 1.9))  # never handled again (dead-lettered, say)
    result = report(lines, Outcome(sent={1, 2, 3}, dead={3: 'x'},
                                   faults=[Fault('sigkill', 2.0, pid=10)]))
    assert result['redelivery_after_sigkill_s'] == {'messages': 1, 'never_again': 1,
                                                   'median': 11.0, 'max': 11.0}


def test_read_lines_skips_a_torn_line(tmp_path: Path) -> None:
    (tmp_path / 'records-1.log').write_text('S main 1 1 1.0\nE main 1 1 1.1\nS main 2 1')
    assert read_lines(tmp_path) == [Line('S', 'main', 1, 1, 1.0), Line('E', 'main', 1, 1, 1.1)]
