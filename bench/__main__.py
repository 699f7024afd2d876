"""``make bench``: every system, every scenario, each in a fresh process; medians of rounds.

Prints a table with the ratio of microagent_mq to the raw client doing the same work, and
writes ``bench/results.json``. Scenario ``publish`` compares microagent_mq with itself:
publishing a dataclass ``Message`` (``<broker>-typed``) against sending the same dict; so do
``retention`` and ``priority``: end to end on a queue with ``retention`` (or ``max_priority``,
sends with priorities 0-2) against the same on a plain queue.
Needs Redis (127.0.0.1:6379), RabbitMQ (127.0.0.1:5672) and NATS with JetStream (127.0.0.1:4222).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .peers import PEER_SYSTEMS, PEERS, installed
from .report import environment, write_docs

ROUNDS = 3
# (scenario, messages per run, figure) for each broker: sized so that make bench (3 rounds,
# every run a fresh process) stays under 5 minutes on a 2-core machine.
PLAN = {
    'memory': [('produce', 40_000, 'msg_per_s'), ('end_to_end', 40_000, 'msg_per_s'),
               ('drain', 40_000, 'msg_per_s'), ('round_trip', 1000, 'p50_us'),
               ('publish', 40_000, 'cpu_us'), ('retention', 40_000, 'msg_per_s'),
               ('priority', 40_000, 'msg_per_s')],
    'redis': [('produce', 2500, 'msg_per_s'), ('concurrent', 10_000, 'msg_per_s'),
              ('send_many', 10_000, 'msg_per_s'),
              ('end_to_end', 2500, 'msg_per_s'), ('drain', 100_000, 'msg_per_s'),
              ('round_trip', 1000, 'p50_us'), ('publish', 2500, 'cpu_us'),
              ('retention', 2500, 'msg_per_s'), ('priority', 2500, 'msg_per_s')],
    'amqp': [('produce', 1200, 'msg_per_s'), ('concurrent', 4000, 'msg_per_s'),
             ('send_many', 4000, 'msg_per_s'),
             ('end_to_end', 1200, 'msg_per_s'), ('drain', 4000, 'msg_per_s'),
             ('round_trip', 500, 'p50_us'), ('publish', 1200, 'cpu_us'),
             ('retention', 1200, 'msg_per_s'), ('priority', 1200, 'msg_per_s')],
    'nats': [('produce', 1500, 'msg_per_s'), ('send_many', 5000, 'msg_per_s'),
             ('end_to_end', 1500, 'msg_per_s'), ('drain', 5000, 'msg_per_s'),
             ('round_trip', 500, 'p50_us')],
}


# Scenarios the peers (--peers) run too: every one but those of microagent_mq's own API.
PEER_SCENARIOS = ('produce', 'concurrent', 'end_to_end', 'drain', 'round_trip')


def peer_systems(broker: str, scenario: str, wanted: bool) -> list[str]:
    """The peers' systems measured beside a scenario (installed ones only)."""
    if not wanted or scenario not in PEER_SCENARIOS:
        return []
    return [f'{broker}-{peer}' for peer in PEERS if f'{broker}-{peer}' in PEER_SYSTEMS
            and installed(peer)]


def compared(broker: str, scenario: str) -> tuple[str, str]:
    """The two systems a scenario compares: (ours, the baseline)."""
    if scenario == 'publish':  # a dataclass published vs the same dict sent, both ours
        return f'{broker}-typed', broker
    if scenario in ('retention', 'priority'):  # a queue with the option vs a plain one, both ours
        return f'{broker}-{scenario}', broker
    return broker, f'{broker}-raw'


def run_one(system: str, scenario: str, n: int, uvloop: bool) -> dict[str, float]:
    command = [sys.executable, '-m', 'bench.scenarios', system, scenario, str(n)]
    if uvloop:
        command.append('--uvloop')
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def summarise(values: list[float]) -> dict[str, float]:
    return {'median': statistics.median(values), 'min': min(values), 'max': max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--brokers', nargs='*', default=list(PLAN))
    parser.add_argument('--rounds', type=int, default=ROUNDS)
    parser.add_argument('--uvloop', action='store_true', help='run every system on uvloop')
    parser.add_argument('--peers', action='store_true',
                        help="also faststream and microagent 1.x, where installed ('.[bench]')")
    parser.add_argument('--docs', action='store_true',
                        help='write the tables into docs/benchmarks.md (between its markers)')
    args = parser.parse_args()
    if args.peers:
        for peer, distribution in PEERS.items():
            if not installed(peer):
                print(f"--peers: {distribution} is not installed, skipped (pip install -e '.[bench]')")
    started = time.monotonic()
    results: dict[str, dict[str, dict[str, object]]] = {}
    rows = []
    for broker in args.brokers:
        for scenario, n, figure in PLAN[broker]:
            ours_system, base_system = compared(broker, scenario)
            runs: dict[str, list[dict[str, float]]] = {ours_system: [], base_system: []}
            peers = peer_systems(broker, scenario, args.peers)
            runs.update((system, []) for system in peers)
            for _ in range(args.rounds):  # alternate, so drift hits both alike
                for system in runs:
                    runs[system].append(run_one(system, scenario, n, args.uvloop))
            entry: dict[str, object] = {'n': n}
            for system, samples in runs.items():
                entry[system] = {key: summarise([s[key] for s in samples]) for key in samples[0]}
            ours = entry[ours_system][figure]['median']  # type: ignore[index]
            raw = entry[base_system][figure]['median']  # type: ignore[index]
            # A ratio above 1 is better for us: throughput ours/raw, latency and CPU raw/ours.
            ratio = ours / raw if figure == 'msg_per_s' else raw / ours
            entry['ratio'] = ratio
            results.setdefault(broker, {})[scenario] = entry
            extra = ''
            if scenario in ('end_to_end', 'drain'):
                extra = (f"cpu {entry[broker]['cpu_us']['median']:.0f} vs "  # type: ignore[index]
                         f"{entry[f'{broker}-raw']['cpu_us']['median']:.0f} µs/msg ")  # type: ignore[index]
            if scenario == 'drain':
                extra += f"rss {entry[broker]['rss_mb']['median']:.0f} MB"  # type: ignore[index]
            if scenario == 'publish':
                extra = f'dataclass vs dict: {ours / raw - 1:+.1%} CPU per message'
            if scenario == 'concurrent':  # issue #18: >= 5x one sequential sender
                alone = results[broker]['produce'][broker]['msg_per_s']['median']  # type: ignore[index]
                entry['vs_sequential'] = ours / alone
                extra = f'{ours / alone:.1f}x one sequential sender of this run'
            if scenario == 'round_trip':
                extra = (f"p99 {entry[broker]['p99_us']['median']:.0f} vs "  # type: ignore[index]
                         f"{entry[f'{broker}-raw']['p99_us']['median']:.0f} µs")  # type: ignore[index]
            for system in peers:
                theirs = entry[system][figure]['median']  # type: ignore[index]
                extra += f" {system.split('-', 1)[1]} {_number(theirs)}"
            rows.append((broker, scenario, n, figure, entry[ours_system][figure],  # type: ignore[index]
                         entry[base_system][figure], ratio, extra))  # type: ignore[index]
            print(_row(rows[-1]), flush=True)
    run = {'rounds': args.rounds, 'uvloop': args.uvloop, 'peers': args.peers,
           'command': 'python -m bench ' + ' '.join(sys.argv[1:]), 'seconds': time.monotonic() - started,
           'environment': environment(), 'results': results}
    Path(__file__).with_name('results.json').write_text(json.dumps(run, indent=2))
    if args.docs:
        write_docs(run, PLAN, compared)
    print(f'\n{"broker":7} {"scenario":11} {"n":>7} {"figure":9} {"ours (min-max)":>26} '
          f'{"raw (min-max)":>26} {"ratio":>6}')
    for row in rows:
        print(_row(row))
    print(f'\n{args.rounds} rounds, medians; ratio > 1 favours microagent_mq; '
          f'{time.monotonic() - started:.0f} s; written bench/results.json')


def _row(row: tuple[object, ...]) -> str:
    broker, scenario, n, figure, ours, raw, ratio, extra = row
    return (f'{broker:7} {scenario:11} {n:>7} {figure:9} {_fmt(ours):>26} {_fmt(raw):>26} '
            f'{ratio:6.2f} {extra}')


def _number(value: float) -> str:
    return f'{value:,.2f}' if value < 10 else f'{value:,.0f}'


def _fmt(summary: object) -> str:
    s = summary  # type: ignore[assignment]
    digits = 2 if s['median'] < 10 else 0  # type: ignore[index]
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"  # type: ignore[index]


if __name__ == '__main__':
    main()
