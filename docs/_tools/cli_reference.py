"""MkDocs hook: the CLI reference page, written from ``microagent_mq.cli.parser()`` at build time.

``docs/cli.md`` holds the prose and a ``<!-- cli-reference -->`` marker; the build replaces
the marker with every command's usage and arguments, so the page cannot drift from the parser.
"""

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from microagent_mq.cli import parser

MARKER = '<!-- cli-reference -->'
PAGE = 'cli.md'
# The parser reads MQ_* for its defaults; the docs show the built-in defaults, not the
# environment of whoever builds the site.
ENVIRONMENT = ('MQ_BROKER', 'MQ_QUEUES')
USAGE_WIDTH = '100'  # argparse wraps usage at $COLUMNS: fixed, so builds are reproducible


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace the marker of the CLI page with the generated reference."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f'{PAGE} lost its {MARKER} marker')
    return markdown.replace(MARKER, cli_reference())


def cli_reference() -> str:
    """The reference of every command of ``microagent-mq``, as Markdown."""
    with _clean_environment():
        return _reference(parser())


def _reference(root: argparse.ArgumentParser) -> str:
    return '\n\n'.join([_usage(root).strip(), *_commands(root, root.prog)]) + '\n'


def _commands(parent: argparse.ArgumentParser, prefix: str) -> Iterator[str]:
    """A section per command; a command with commands of its own (``dlq list``) nests."""
    commands = next((a for a in parent._actions if isinstance(a, argparse._SubParsersAction)), None)
    if commands is None:
        return
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    for name, sub in commands.choices.items():
        nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
        body = '' if nested else f'{_usage(sub)}{_arguments(sub)}'
        yield f'## `{prefix} {name}`\n\n{helps.get(name) or ""}\n\n{body}'
        yield from _commands(sub, f'{prefix} {name}')


def _usage(command: argparse.ArgumentParser) -> str:
    return f'```text\n{command.format_usage().strip()}\n```\n\n'


def _arguments(command: argparse.ArgumentParser) -> str:
    rows = ['| argument | meaning | default |', '|---|---|---|']
    formatter = command._get_formatter()
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flags = action.option_strings or [str(action.metavar or action.dest)]
        names = ', '.join(f'`{flag}`' for flag in flags)
        if action.option_strings and action.nargs != 0 and not isinstance(
                action, argparse.BooleanOptionalAction):
            names += f' *{formatter._metavar_formatter(action, action.dest.upper())(1)[0]}*'
        meaning = formatter._expand_help(action) if action.help else ''
        default = '' if action.default in (None, argparse.SUPPRESS) or not action.option_strings \
            else f'`{action.default!r}`' if action.default == '' else f'`{action.default}`'
        meaning = meaning.replace('|', r'\|')  # a table cell
        rows.append(f'| {names} | {meaning} | {default} |')
    return '\n'.join(rows) + '\n'


@contextmanager
def _clean_environment() -> Iterator[None]:
    mine = [name for name in os.environ if name.startswith('MQ_')]
    saved = {name: os.environ.pop(name) for name in (*ENVIRONMENT, *mine, 'COLUMNS') if name in os.environ}
    os.environ['COLUMNS'] = USAGE_WIDTH
    try:
        yield
    finally:
        del os.environ['COLUMNS']
        os.environ.update(saved)
