"""The reference pages cannot drift: the CLI page is generated, the errors page covers every class."""

import argparse
import importlib.util
import inspect
import re
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from microagent_mq import Reject, Retry, exceptions
from microagent_mq.cli import parser

ROOT = Path(__file__).resolve().parent.parent


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location('cli_reference', ROOT / 'docs/_tools/cli_reference.py')
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _leaves(parent: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser]]:
    commands = next((a for a in parent._actions if isinstance(a, argparse._SubParsersAction)), None)
    if commands is None:
        return [(prefix, parent)]
    return [leaf for name, sub in commands.choices.items() for leaf in _leaves(sub, f'{prefix} {name}')]


def test_cli_reference_has_every_command_and_option_of_the_parser() -> None:
    reference = _hook().cli_reference()
    leaves = _leaves(parser(), 'microagent-mq')
    assert {'microagent-mq run', 'microagent-mq send', 'microagent-mq length'} <= {n for n, _ in leaves}
    for name, sub in leaves:
        assert f'## `{name}`' in reference
        for action in sub._actions:
            for flag in action.option_strings:
                if flag not in ('-h', '--help'):
                    assert f'`{flag}`' in reference, (name, flag)


def test_cli_reference_shows_built_in_defaults_not_the_builders_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('MQ_BROKER', 'redis://secret-host/3')
    reference = _hook().cli_reference()
    assert 'secret-host' not in reference
    assert '`memory://default`' in reference


def test_cli_page_keeps_its_marker_and_the_hook_fills_it() -> None:
    hook = _hook()
    page = (ROOT / 'docs/cli.md').read_text()

    mkdocs_page = SimpleNamespace(file=SimpleNamespace(src_uri='cli.md'))
    rendered = hook.on_page_markdown(page, page=mkdocs_page)
    assert hook.MARKER in page and hook.MARKER not in rendered
    assert '## `microagent-mq send`' in rendered


def test_errors_page_covers_every_exception_and_handler_control() -> None:
    page = (ROOT / 'docs/errors.md').read_text()
    headings = set(re.findall(r'^## `(\w+)`', page, flags=re.M))
    classes = {name for name, value in vars(exceptions).items()
               if inspect.isclass(value) and issubclass(value, Exception)}
    assert classes <= headings, classes - headings
    assert {Retry.__name__, Reject.__name__} <= set(re.findall(r'`(\w+)\(', page))


def test_readme_links_point_at_files_that_exist() -> None:
    # mkdocs --strict checks the site's links; the README lives outside it.
    readme = (ROOT / 'README.md').read_text()
    targets = re.findall(r'\]\(([^)#]+)(?:#[^)]*)?\)', readme)
    assert targets, 'the README lost its links'
    missing = [t for t in targets if '://' not in t and not (ROOT / t).exists()]
    assert not missing, missing
