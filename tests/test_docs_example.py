"""``make example`` explains its ERROR lines before they appear (issue 17 §3)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_says_its_dead_letters_are_on_purpose_before_they_are_logged() -> None:
    result = subprocess.run([sys.executable, 'examples/run_demo.py'], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith('ERROR')]
    explained = [i for i, line in enumerate(lines) if 'The 2 ERROR lines that follow' in line]
    assert len(errors) == 2, result.stderr  # as many as the explanation announces
    assert explained and explained[0] < errors[0], result.stderr
    assert 'dead-lettering them: the behaviour this demo shows' in lines[explained[0]]
