"""Every CLI command and option has help text, and every command is in the docs.

Like sqlite-utils' tests/test_docs.py: the command tree of ``exchange`` is
walked (including the commands that register lazily: audit, archive, usb, ui),
and each command's full name (``exchange peer add``) must appear in README.md
or a page in docs/. A new command or option without help, or a command no
guide mentions, fails here rather than surprising an operator.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from exchange.cli.main import main

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _walk(cmd: click.Command, path: tuple[str, ...], ctx: click.Context) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command under ``cmd`` with its path of names, loading lazy command modules on the way."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in cmd.list_commands(ctx):
            sub = cmd.get_command(ctx, name)
            assert sub is not None, f"{' '.join(path)} lists {name} but cannot load it"
            yield from _walk(sub, (*path, name), click.Context(sub, parent=ctx, info_name=name))


COMMANDS = dict(_walk(main, ("exchange",), click.Context(main, info_name="exchange")))
NAMES = sorted(" ".join(p) for p in COMMANDS)


def _docs_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in DOC_FILES)


def test_the_walk_finds_the_lazily_registered_commands() -> None:
    """The walk itself works: commands from exchange/cli/audit.py, usb.py and ui.py are found."""
    for name in ("exchange peer add", "exchange audit verify", "exchange archive prune",
                 "exchange usb prepare", "exchange ui", "exchange status"):
        assert name in NAMES
    assert len(NAMES) > 30


@pytest.mark.parametrize("name", NAMES)
def test_command_has_help(name: str) -> None:
    cmd = COMMANDS[tuple(name.split())]
    assert (cmd.help or "").strip(), f"`{name}` has no help text (its docstring)"


@pytest.mark.parametrize("name", NAMES)
def test_every_option_has_help(name: str) -> None:
    cmd = COMMANDS[tuple(name.split())]
    missing = [p.opts[0] for p in cmd.params
               if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert not missing, f"`{name}`: options without help: {', '.join(missing)}"


@pytest.mark.parametrize("name", NAMES)
def test_command_appears_in_docs(name: str) -> None:
    """The full command name appears as words (``exchange usb sync``, not inside ``exchange usb syncing``)."""
    pattern = re.compile(r"(?<![\w-])" + re.escape(name).replace(r"\ ", r"\s+") + r"(?![\w-])")
    assert pattern.search(_docs_text()), (
        f"`{name}` appears in none of README.md, docs/*.md: document it in the guide for its job")


@pytest.mark.parametrize("name", NAMES)
def test_help_renders(name: str) -> None:
    """``--help`` runs through the real CLI and shows the command's help and every option."""
    res = CliRunner().invoke(main, [*name.split()[1:], "--help"], env={"EXCHANGE_HOME": ""})
    assert res.exit_code == 0, res.output
    cmd = COMMANDS[tuple(name.split())]
    first_line = (cmd.help or "").strip().splitlines()[0]
    assert first_line.split()[0] in res.output
    for p in cmd.params:
        if isinstance(p, click.Option) and not p.hidden:
            assert p.opts[0] in res.output, f"`{name} --help` does not show {p.opts[0]}"


@pytest.mark.parametrize("name", NAMES)
def test_help_has_an_example(name: str) -> None:
    """Every command's ``--help`` ends with an example to copy: a line that starts ``exchange <its name>``
    (for a group: one of its commands), kept as written (click's ``\\b``), under "Example"."""
    res = CliRunner().invoke(main, [*name.split()[1:], "--help"], env={"EXCHANGE_HOME": "", "COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    after = res.output.split("Example", 1)
    assert len(after) == 2, f"`{name} --help` shows no example: add an `Example:` block to its docstring"
    examples = [line.strip() for line in after[1].splitlines() if line.strip().startswith("exchange ")]
    assert any(e == name or e.startswith(name + " ") for e in examples), (
        f"`{name} --help`: no example line starts with `{name}`: {examples}")
