"""The entry scripts' flags as documented: --help ends with example commands that parse, the older
spellings still work, and every `python main_*.py` command in README.md and docs/ names flags that exist."""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex

import pytest

from tests.conftest import REPO

SCRIPTS = ('main_train', 'main_evaluate', 'main_visualize', 'main_export', 'main_predict', 'main_serve', 'main_demo')


def parse(script: str, argv: list[str]):
    module = importlib.import_module(script)
    if script == 'main_demo':            # its parser is built inside main(); --help is checked below
        return None
    return module.parse_args(argv)


def help_text(script: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        importlib.import_module(script).main(['--help'])
    return out.getvalue()


@pytest.mark.parametrize('script', SCRIPTS)
def test_help_ends_with_examples_that_parse(script):
    text = help_text(script)
    tail = text[text.rindex('examples:\n') + len('examples:\n'):].splitlines()
    commands = [line.split('  #')[0].strip() for line in tail if line.strip()]
    assert 2 <= len(commands) <= 3 and all(f'{script}.py' in c for c in commands)
    for command in commands:
        words = shlex.split(command)
        argv = words[words.index(f'{script}.py') + 1:]     # what comes before: VAR=value, torchrun's flags
        parse(script, argv)


def test_old_spellings_are_aliases():
    import main_evaluate
    import main_export
    assert main_evaluate.parse_args(['--results_dir=r']).results_dir == 'r'
    assert main_evaluate.parse_args(['--out_dir=r']).results_dir == 'r'
    assert main_evaluate.parse_args([]).results_dir == 'results'
    assert main_export.parse_args(['--out=m.safetensors']).out == 'm.safetensors'
    assert main_export.parse_args(['--model=m.safetensors']).out == 'm.safetensors'
    assert '--results_dir' not in help_text('main_evaluate') and '--out ' not in help_text('main_export')


def code_blocks(text: str):
    """The shell code blocks (``` or ```bash) of a Markdown text, each as one string."""
    block, kind = None, None
    for line in text.splitlines():
        if line.startswith('```'):
            if block is None:
                block, kind = [], line[3:].strip()
            else:
                if kind in ('', 'bash', 'sh'):
                    yield '\n'.join(block)
                block = None
        elif block is not None:
            block.append(line)


def documented_commands():
    """Every `python main_*.py ...` line of README.md's and docs/*.md's code blocks (continuations joined)."""
    for path in [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]:
        for block in code_blocks(path.read_text()):
            for line in block.replace('\\\n', ' ').splitlines():
                line = line.split(' #')[0].strip()
                match = re.search(r'\bpython (main_\w+)\.py(.*)', line)
                if match:
                    yield pytest.param(match.group(1), match.group(2), id=f'{path.name}:{line[:60]}')


@pytest.mark.parametrize('script,rest', list(documented_commands()))
def test_documented_commands_use_flags_that_exist(script, rest):
    argv = shlex.split(rest)
    if script == 'main_demo':
        return
    try:
        parse(script, argv)
    except SystemExit as e:
        pytest.fail(f'{script}.py {rest}: exit {e.code}')
