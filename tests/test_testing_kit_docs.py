"""docs/testing.md runs as it stands: its Python blocks are one test module of a user's project."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).parent.parent / 'docs' / 'testing.md'


@pytest.mark.parametrize('mode', ['auto', 'strict'])
def test_the_testing_page_runs(tmp_path: Path, mode: str) -> None:
    blocks = re.findall(r'```python\n(.*?)```', DOC.read_text(), re.DOTALL)
    module = '\n\n'.join(blocks)
    tests = len(re.findall(r'^async def test_|^def test_', module, re.MULTILINE))
    assert tests >= 4, 'the page lost its examples'
    (tmp_path / 'test_page.py').write_text(module)
    (tmp_path / 'pytest.ini').write_text(
        f'[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n'
        'filterwarnings = error\naddopts = --strict-markers -p no:cacheprovider\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith('PYTEST_')}
    result = subprocess.run([sys.executable, '-m', 'pytest', '-q'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f'{tests} passed' in result.stdout, result.stdout
