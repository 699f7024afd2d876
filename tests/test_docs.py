"""Every Python block of README.md and docs/ runs, each in a fresh interpreter.

A block runs on the memory broker unless the line before its fence says otherwise:

    <!-- run: redis -->              needs the Redis server; keys go under a unique prefix
    <!-- run: redis_cluster -->      on the run's Redis Cluster (any redis+cluster:// DSN)
    <!-- run: amqp -->               needs RabbitMQ; runs in a vhost of its own, deleted after
    <!-- run: redis group=NAME -->   blocks of one group (one page) run in order, sharing
                                     the namespace: a producer script, then its consumer
    <!-- run: no (why) -->           deliberately not runnable; keep these few

A page whose blocks are one test module of a user's project (pytest tests, not programs)
says so once, anywhere in it, and is run by the test file it names instead:

    <!-- run: page by tests/test_x_docs.py -->

A ``text`` block right after a Python block is its expected output (stdout, exactly).
The examples name ordinary servers and prefixes (``redis://localhost:6379/0``, ``mq:``); the
runner moves them into the test's own namespace by wrapping the brokers' ``__post_init__``,
so the text a reader copies is the text that ran.
"""

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .conftest import AMQP_DSN, CLUSTER_DSN_VAR, rabbitmqctl, require_server

ROOT = Path(__file__).resolve().parent.parent
PAGE_RUNNER = re.compile(r'<!--\s*run:\s*page by (?P<test>tests/\S+\.py)\s*-->')


def _run_here(page: Path) -> bool:
    found = PAGE_RUNNER.search(page.read_text())
    if found is None:
        return True
    assert (ROOT / found['test']).exists(), f'{page}: {found["test"]} does not exist'
    return False


SOURCES = [page for page in [ROOT / 'README.md', *sorted((ROOT / 'docs').rglob('*.md'))]
           if _run_here(page)]
FENCE = re.compile(r'^(?P<fence>```+|~~~+)\s*(?P<info>.*)$')
MARK = re.compile(r'^<!--\s*run:\s*(?P<spec>.*?)\s*-->$')
KINDS = ('memory', 'redis', 'redis_cluster', 'amqp')
MAX_NOT_RUNNABLE = 3
BLOCK_TIMEOUT_S = 60
# Signs of a program that does not clean up after itself (an unclosed broker, a lost task).
UNTIDY = ('ResourceWarning', 'Exception ignored', 'Task was destroyed', 'was never awaited',
          'Unclosed')

# Runs in the child: isolate the brokers, then run the block as __main__.
RUNNER = '''
import runpy, sys
from urllib.parse import urlsplit
kind, namespace, path = sys.argv[1:4]
if kind == 'redis':
    from microagent_mq.tools.redis import RedisBroker
    init = RedisBroker.__post_init__
    def __post_init__(self):
        self.prefix = namespace + ':' + self.prefix
        init(self)
    RedisBroker.__post_init__ = __post_init__
elif kind == 'redis_cluster':
    import os
    from microagent_mq.tools.redis import RedisBroker
    init = RedisBroker.__post_init__
    def __post_init__(self):
        self.dsn = os.environ['TEST_REDIS_CLUSTER_DSN']
        self.prefix = namespace + ':' + self.prefix
        init(self)
    RedisBroker.__post_init__ = __post_init__
elif kind == 'amqp':
    from microagent_mq.tools.amqp import AMQPBroker
    init = AMQPBroker.__post_init__
    def __post_init__(self):
        self.dsn = urlsplit(self.dsn)._replace(path='/' + namespace).geturl()
        init(self)
    AMQPBroker.__post_init__ = __post_init__
sys.argv = [path]
runpy.run_path(path, run_name='__main__')
'''


@dataclass
class Block:
    """One Python block of a page, with what it should print."""

    source: Path
    line: int
    code: str
    kind: str = 'memory'
    group: str = ''
    skip: str = ''
    output: str | None = None

    @property
    def where(self) -> str:
        return f'{self.source.relative_to(ROOT)}:{self.line}'


@dataclass
class Unit:
    """What one test runs: a block, or the blocks of a group in order."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.blocks[0].kind

    @property
    def name(self) -> str:
        first = self.blocks[0]
        return first.where + (f'[{first.group}]' if first.group else '')


def parse(source: Path) -> list[Block]:
    """The Python blocks of a Markdown page, with their marks and expected outputs."""
    lines = source.read_text().splitlines()
    blocks: list[Block] = []
    mark, index, last = '', 0, None
    while index < len(lines):
        stripped = lines[index].strip()
        fence = FENCE.match(stripped)
        if not fence:
            if stripped:
                found = MARK.match(stripped)
                mark, last = (found.group('spec') if found else ''), None
            index += 1
            continue
        end = next((i for i in range(index + 1, len(lines))
                    if lines[i].strip() == fence.group('fence')), None)
        if end is None:
            raise ValueError(f'{source}:{index + 1}: unclosed code fence')
        language = (fence.group('info').split() or [''])[0]
        body = '\n'.join(lines[index + 1:end]) + '\n'
        if language in ('python', 'py'):
            last = _block(source, index + 1, body, mark)
            blocks.append(last)
        elif language == 'text' and last is not None and last.output is None:
            last.output = body
            last = None
        else:
            last = None
        mark, index = '', end + 1
    return blocks


def _block(source: Path, line: int, code: str, mark: str) -> Block:
    block = Block(source, line, code)
    if not mark:
        return block
    if mark.startswith('no'):
        block.skip = mark[2:].strip(' ()') or 'not runnable'
        return block
    words = mark.split()
    if words[0] not in KINDS:
        raise ValueError(f'{block.where}: unknown run mark {mark!r}; expected one of {KINDS} or no')
    block.kind = words[0]
    for word in words[1:]:
        key, _, value = word.partition('=')
        if key != 'group' or not value:
            raise ValueError(f'{block.where}: unknown run option {word!r}')
        block.group = value
    return block


def units() -> list[Unit]:
    """Every runnable block as a unit; the blocks of a group of a page as one unit."""
    found: list[Unit] = []
    groups: dict[tuple[Path, str], Unit] = {}
    for source in SOURCES:
        for block in parse(source):
            if block.skip:
                continue
            if not block.group:
                found.append(Unit([block]))
                continue
            unit = groups.get((source, block.group))
            if unit is None:
                unit = groups[(source, block.group)] = Unit()
                found.append(unit)
            elif unit.kind != block.kind:
                raise ValueError(f'{block.where}: group {block.group} mixes brokers')
            unit.blocks.append(block)
    return found


ALL_BLOCKS = [block for source in SOURCES for block in parse(source)]
UNITS = units()
RAN: Counter[str] = Counter()


class _Summary:
    """Prints, at the end of the run, how many blocks ran on which broker."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not RAN and not ALL_BLOCKS:
            return
        kinds = ', '.join(f'{RAN[kind]} {kind}' for kind in KINDS)
        skipped = sum(1 for block in ALL_BLOCKS if block.skip)
        terminalreporter.write_line(
            f'docs examples: {sum(RAN.values())} of {len(ALL_BLOCKS)} Python blocks ran '
            f'({kinds}); {skipped} marked not runnable')


@pytest.fixture(scope='module', autouse=True)
def _summary(request: pytest.FixtureRequest) -> None:
    manager = request.config.pluginmanager
    if not manager.has_plugin('docs-examples-summary'):
        manager.register(_Summary(), 'docs-examples-summary')


@pytest.fixture(scope='module')
def amqp_vhost() -> Iterator[str]:
    """A RabbitMQ vhost of this run's own: the examples' queues never meet anyone else's."""
    require_server('amqp')
    vhost = f'docs_{uuid.uuid4().hex[:12]}'
    user = AMQP_DSN.split('://', 1)[1].split(':', 1)[0]
    rabbitmqctl('add_vhost', vhost)
    try:
        rabbitmqctl('set_permissions', '-p', vhost, user, '.*', '.*', '.*')
        yield vhost
    finally:
        rabbitmqctl('delete_vhost', vhost)


async def _redis_cluster_cleanup(namespace: str) -> None:
    from microagent_mq.tools.redis import RedisBroker

    admin = RedisBroker(os.environ[CLUSTER_DSN_VAR])
    client: Any = admin.client
    keys = [k async for k in client.scan_iter(match=f'{namespace}:*', count=1000)]
    if keys:
        await client.delete(*keys)
    await admin.close()


def _redis_cleanup(namespace: str) -> int:
    import redis

    from .conftest import REDIS_DSN

    # The examples name db 0 of localhost; the namespace prefix keeps their keys apart.
    client = redis.Redis.from_url(REDIS_DSN.rsplit('/', 1)[0] + '/0')
    try:
        keys = list(client.scan_iter(match=f'{namespace}:*', count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def run_block(block: Block, namespace: str, tmp_path: Path) -> None:
    """Run one block in a fresh interpreter; fail with its output if it misbehaves."""
    script = tmp_path / f'{block.source.stem}_line{block.line}.py'
    script.write_text(block.code)
    env = {**os.environ, 'PYTHONPATH': str(ROOT), 'PYTHONDEVMODE': '', 'COLUMNS': '100'}
    env.pop('MQ_BROKER', None)
    env.pop('MQ_QUEUES', None)
    result = subprocess.run(
        [sys.executable, '-W', 'default', '-c', RUNNER, block.kind, namespace, str(script)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    report = f'{block.where} ({block.kind})\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}'
    assert result.returncode == 0, f'exit status {result.returncode}: {report}'
    untidy = [sign for sign in UNTIDY if sign in result.stderr]
    assert not untidy, f'{untidy} on stderr: {report}'
    if block.output is not None:
        assert result.stdout == block.output, f'unexpected output: {report}'
    RAN[block.kind] += 1


@pytest.mark.parametrize('unit', [
    pytest.param(unit, id=unit.name, marks=[getattr(pytest.mark, unit.kind)]
                 if unit.kind != 'memory' else [])
    for unit in UNITS
])
def test_block_runs(unit: Unit, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    namespace = f'docs_{uuid.uuid4().hex[:12]}'
    if unit.kind == 'redis':
        require_server('redis')
    elif unit.kind == 'redis_cluster':
        request.getfixturevalue('redis_cluster_dsn')  # its DSN reaches the block by env
    elif unit.kind == 'amqp':
        namespace = request.getfixturevalue('amqp_vhost')
    try:
        for block in unit.blocks:
            run_block(block, namespace, tmp_path)
    finally:
        if unit.kind == 'redis':
            _redis_cleanup(namespace)
        elif unit.kind == 'redis_cluster':
            asyncio.run(_redis_cluster_cleanup(namespace))


def test_every_python_fence_is_collected() -> None:
    # A parser bug must not quietly leave blocks out: count the fences the plain way.
    for source in SOURCES:
        fences = re.findall(r'^\s*```(?:python|py)\b', source.read_text(), flags=re.M)
        assert len(fences) == len(parse(source)), source


def test_marks_are_few_and_explained() -> None:
    skipped = [block for block in ALL_BLOCKS if block.skip]
    assert len(skipped) <= MAX_NOT_RUNNABLE, [block.where for block in skipped]
    assert len(UNITS) >= 10, 'the docs lost their examples'


def test_parse_reads_marks_groups_and_outputs(tmp_path: Path) -> None:
    page = tmp_path / 'page.md'
    page.write_text(
        'Text\n\n<!-- run: redis group=g -->\n```python\nprint(1)\n```\n\n```text\n1\n```\n\n'
        '<!-- run: no (needs a mail server) -->\n```python\nsend()\n```\n\n'
        '```python title="x"\nprint(2)\n```\nprose\n\n```text\nnot an output\n```\n')
    first, second, third = parse(page)
    assert (first.kind, first.group, first.output, first.line) == ('redis', 'g', '1\n', 4)
    assert second.skip == 'needs a mail server'
    assert (third.kind, third.output, third.code) == ('memory', None, 'print(2)\n')
