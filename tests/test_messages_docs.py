"""docs/messages.md runs: its ``python`` blocks in order, then ``main()``, which returns what it says."""

import ast
import re
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parent.parent / 'docs' / 'messages.md'


async def test_messages_page_examples_run_as_written() -> None:
    text = DOC.read_text()
    blocks = re.findall(r'^```python\n(.*?)^```', text, flags=re.S | re.M)
    assert len(blocks) >= 8
    namespace: dict[str, Any] = {'__name__': 'docs_messages'}
    exec(compile('\n'.join(blocks), str(DOC), 'exec'), namespace)
    promised = re.search(r'`main\(\)` returns `(\{.*?\})`', text, flags=re.S)
    assert promised is not None
    assert await namespace['main']() == ast.literal_eval(promised.group(1))
