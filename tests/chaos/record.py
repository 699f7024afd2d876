"""What happened, from the records the workers wrote outside the broker: the chaos report."""

import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A fault this long before a duplicate's first handling ended may still have caused it
# (an ack on its way when the connection was cut).
CAUSE_WINDOW_S = 1.0


@dataclass(frozen=True, slots=True)
class Line:
    """One handling start (``S``) or end (``E``) as a worker recorded it."""

    mark: str
    kind: str
    n: int
    pid: int
    at: float


@dataclass(frozen=True, slots=True)
class Fault:
    """A fault the run injected: ``kind`` at ``at`` (epoch s), on worker ``pid`` if any."""

    kind: str
    at: float
    pid: int = 0
    until: float = 0.0  # when it lasted (a broker restart): when it ended

    @property
    def end(self) -> float:
        return max(self.at, self.until)


@dataclass
class Outcome:
    """What the run knows besides the records: what was sent, what died, what it cost."""

    sent: set[int] = field(default_factory=set)
    retried_sends: set[int] = field(default_factory=set)  # a send that raised, then retried
    producer_errors: int = 0
    dead: dict[int, str] = field(default_factory=dict)  # n -> error of its dead letter
    faults: list[Fault] = field(default_factory=list)
    worker_deaths: int = 0  # workers that exited without being signalled
    drain_s: float | None = None  # None: not drained before the deadline


def read_lines(folder: Path) -> list[Line]:
    """Every line of every ``records-*.log`` in ``folder`` (a torn last line is skipped)."""
    lines = []
    for path in sorted(folder.glob('records-*.log')):
        for text in path.read_text().splitlines():
            parts = text.split()
            if len(parts) == 5:
                lines.append(Line(parts[0], parts[1], int(parts[2]), int(parts[3]), float(parts[4])))
    return lines


def ends(lines: Iterable[Line], kind: str = 'main') -> dict[int, list[Line]]:
    """Completed handlings of each message of ``kind``, in time order."""
    done: dict[int, list[Line]] = defaultdict(list)
    for line in sorted(lines, key=lambda x: x.at):
        if line.mark == 'E' and line.kind == kind:
            done[line.n].append(line)
    return done


def report(lines: list[Line], outcome: Outcome) -> dict[str, Any]:
    """The numbers of docs/reliability.md, as a JSON-able dict."""
    done = ends(lines)
    handled = set(done)
    duplicates = {n: handlings for n, handlings in done.items() if len(handlings) > 1}
    causes: dict[str, int] = defaultdict(int)
    for n, handlings in duplicates.items():
        causes[likely_cause(n, handlings, lines, outcome)] += 1
    lost = outcome.sent - handled - set(outcome.dead)
    faults: dict[str, int] = defaultdict(int)
    first = min((line.at for line in lines), default=0.0)
    for fault in outcome.faults:
        faults[fault.kind] += 1
    return {
        'sent': len(outcome.sent),
        'handled_once': sum(1 for n in handled if len(done[n]) == 1),
        'duplicates': len(duplicates),
        'extra_handlings': sum(len(h) - 1 for h in duplicates.values()),
        'duplicate_causes': dict(sorted(causes.items())),
        'dead_letters': len(outcome.dead),
        'dead_letter_errors': _error_counts(outcome.dead.values()),
        'lost': len(lost),
        'lost_sample': sorted(lost)[:20],
        'unexpected': len(handled - outcome.sent),  # handled but never sent: must be 0
        'producer_errors': outcome.producer_errors,
        'worker_deaths': outcome.worker_deaths,
        'drain_s': None if outcome.drain_s is None else round(outcome.drain_s, 1),
        'redelivery_after_sigkill_s': redelivery_after_sigkill(lines, outcome.faults),
        'faults': dict(sorted(faults.items())),
        'fault_log': [[round(f.at - first, 1), f.kind, f.pid] for f in outcome.faults],
    }


def likely_cause(n: int, handlings: list[Line], lines: list[Line], outcome: Outcome) -> str:
    """Why message ``n`` was handled again after its first handling ended (a best guess)."""
    if n in outcome.retried_sends:
        return 'producer retry (sent twice)'
    first_end = handlings[0]
    again = min((x.at for x in lines if x.mark == 'S' and x.kind == 'main' and x.n == n
                 and x.at > first_end.at), default=handlings[1].at)
    window = [f for f in outcome.faults if first_end.at - CAUSE_WINDOW_S <= f.end and f.at <= again]
    for fault in window:
        if fault.pid == first_end.pid and fault.kind in ('sigkill', 'sigterm') and fault.at >= first_end.at:
            return f'{fault.kind} of the worker after the handler ended, before its ack'
    if window:
        return f'{window[-1].kind} between the handling and its ack'
    return 'unknown (no fault near it)'


def redelivery_after_sigkill(lines: list[Line], faults: list[Fault]) -> dict[str, Any]:
    """For messages in a handler when their worker was SIGKILLed: seconds until handled again."""
    starts: dict[int, list[Line]] = defaultdict(list)
    for line in lines:
        if line.kind == 'main' and line.mark == 'S':
            starts[line.n].append(line)
    ended = {(x.n, x.pid) for x in lines if x.mark == 'E' and x.kind == 'main'}
    delays: list[float] = []
    never = 0
    for fault in (f for f in faults if f.kind == 'sigkill'):
        for n, begun in starts.items():
            if not any(x.pid == fault.pid and x.at <= fault.at for x in begun):
                continue
            if (n, fault.pid) in ended:
                continue
            later = [x.at for x in begun if x.at > fault.at]
            if later:
                delays.append(min(later) - fault.at)
            else:
                never += 1
    if not delays:
        return {'messages': 0, 'never_again': never}
    return {'messages': len(delays), 'never_again': never,
            'median': round(statistics.median(delays), 1), 'max': round(max(delays), 1)}


def _error_counts(errors: Iterable[str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for error in errors:
        counts[error.split(':')[0][:80]] += 1
    return dict(sorted(counts.items()))
