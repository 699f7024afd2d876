"""The ``microagent-mq`` command and the example, run as a user would."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from microagent_mq.cli import main

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, '-m', 'microagent_mq.cli', *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_unknown_scheme_is_one_line() -> None:
    result = cli('length', 'mailer', '--broker', 'kafka://localhost')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "microagent-mq: error: unsupported scheme 'kafka' in DSN 'kafka://localhost'; "
        "expected one of ('memory', 'redis', 'rediss', 'unix', 'redis+cluster', 'rediss+cluster', "
        "'amqp', 'amqps', 'nats')"]


def test_unimportable_module_is_one_line() -> None:
    result = cli('run', 'no_such_module:Agent', '--log-level', 'ERROR')
    assert result.returncode == 2
    assert result.stderr.strip() == ("microagent-mq: error: cannot import 'no_such_module': "
                                     "ModuleNotFoundError: No module named 'no_such_module'")
    result = cli('run', 'examples.service:Nope', '--log-level', 'ERROR')
    assert result.returncode == 2
    assert "'examples.service:Nope' is not a MicroAgent subclass" in result.stderr


def test_send_and_length_in_process(capsys: object) -> None:
    assert main(['send', 'mailer', '{"a": 1}', '--broker', 'memory://cli']) == 0
    assert main(['send', 'mailer', '{"a": 2}', '--broker', 'memory://cli']) == 0
    assert main(['length', 'mailer', '--broker', 'memory://cli']) == 0
    assert capsys.readouterr().out.strip() == '2'  # type: ignore[attr-defined]
    assert main(['send', 'mailer', '{bad', '--broker', 'memory://cli']) == 2
    assert main(['send', 'nope', '{}', '--broker', 'memory://cli']) == 1
    assert main(['length', 'mailer', '--queues', 'missing.json']) == 1


def test_run_until_sigterm_exits_zero() -> None:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'microagent_mq.cli', 'run', 'examples.service:Mailer',
         'examples.service:Signups', '--no-uvloop'],
        cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if 'Welcome mail sent to user3@example.com' in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 0, ''.join(lines) + rest
    assert 'Stopping' in rest


def test_example_runs() -> None:
    result = subprocess.run([sys.executable, 'examples/run_demo.py'], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        'welcomed: user1@example.com, user2@example.com, user3@example.com',
        'dead letter: user 4: rejected: address is blocked',
        "dead letter: user 5: poison message: Signup rejected the message: "
        "not an email address: 'not-an-address'",
        'waiting: 0',
    ]
