"""docs/outbox.md runs as it stands: the seed's create_user, on SQLite and the memory broker."""

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).parent.parent / 'docs' / 'outbox.md'


def test_the_outbox_page_runs(tmp_path: Path) -> None:
    blocks = re.findall(r'```python\n(.*?)```', DOC.read_text(), re.DOTALL)
    assert len(blocks) == 1, 'the page lost its example'
    (tmp_path / 'example.py').write_text(blocks[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith('PYTEST_')}
    result = subprocess.run([sys.executable, 'example.py'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(result.stdout.splitlines()) == [  # the relay's timing decides their order
        'rolled back: IntegrityError; no event sent',
        'welcome mail to ada@example.com (user 1)',
    ]
