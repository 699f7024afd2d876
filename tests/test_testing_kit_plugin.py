"""The pytest plugin, as a fresh project that installed the package sees it: pytest in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_TESTS = '''
import pytest

from microagent_mq import ConfigurationError, MicroAgent, Queue, consumer, get_default_broker

queue = Queue('signups')
handled = []
used = []


class Welcome(MicroAgent):
    @consumer(queue)
    async def welcome(self, email: str) -> None:
        handled.append(email)


async def register_user(email):  # the code under test sends through the default broker
    await get_default_broker().send('signups', {'email': email})


async def test_null_broker(mq_null_broker):
    assert get_default_broker() is mq_null_broker
    await register_user('a@example.com')
    assert [p.data for p in mq_null_broker.published_to('signups')] == [{'email': 'a@example.com'}]


async def test_full_flow(mq_test_broker):
    assert get_default_broker() is mq_test_broker
    await Welcome(broker=mq_test_broker).start()  # left running: the fixture stops it
    used.append(mq_test_broker)
    await register_user('b@example.com')
    report = await mq_test_broker.process_messages()
    assert (report.handled, handled) == (1, ['b@example.com'])


def test_sync_test_gets_a_fresh_broker(mq_null_broker):
    assert get_default_broker() is mq_null_broker and mq_null_broker.published == []


def test_after_the_fixtures():
    assert used[0].info()['consuming'] == []  # closed by the fixture
    with pytest.raises(ConfigurationError, match='no default broker'):
        get_default_broker()
'''


@pytest.mark.parametrize('mode', ['auto', 'strict'])
def test_fixtures_in_a_fresh_project(tmp_path: Path, mode: str) -> None:
    (tmp_path / 'pytest.ini').write_text(
        f'[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n'
        'filterwarnings = error\naddopts = --strict-markers -p no:cacheprovider\n')
    (tmp_path / 'test_service.py').write_text(PROJECT_TESTS)
    env = {k: v for k, v in os.environ.items() if not k.startswith('PYTEST_')}
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-rA'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert '4 passed' in result.stdout, result.stdout
    assert 'Task was destroyed' not in result.stdout + result.stderr


def test_importing_the_kit_does_not_import_pytest() -> None:
    code = 'import sys, microagent_mq.testing; print("pytest" in sys.modules)'
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == 'False'
