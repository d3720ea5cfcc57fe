"""Every example the help and the README show must at least parse: a renamed option or a wrong syntax
fails here.

The examples are the ``xares-...`` lines under "Examples:" / "Typical use:" in the groups' and commands'
help and epilogs, and the indented ``xares-...`` lines of the command modules' docstrings and of the
README's code blocks. Each is split
like a shell would (comments dropped, ``\\`` continuations joined) and parsed by click exactly as the
command line would be, up to calling the command: unknown options, bad choices, bad numbers, missing
arguments all fail. Only "this path does not exist" is let through (examples name files the reader has).
Importing the command modules loads no torch; nothing here runs a command (test_docs_examples.py runs them).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import click
import pytest

from evaluator.cli import eval_cli, submit_cli

GROUPS = {"xares-eval": eval_cli, "xares-submit": submit_cli}
ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md"]  # their indented code blocks
HEADING = re.compile(r"^\s*(examples?|typical use)\b[^:]*:+\s*$", re.IGNORECASE)


def _commands(group: click.Group) -> dict[str, click.Command]:
    ctx = click.Context(group)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def _join_continuations(lines: list[str]) -> list[str]:
    joined: list[str] = []
    pending = ""
    for line in lines:
        text = line.strip()
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        joined.append(pending + text)
        pending = ""
    if pending:
        joined.append(pending)
    return joined


def examples_in_help(text: str | None) -> list[str]:
    """The ``xares-`` lines of each "Examples:"/"Typical use:" block (a block ends at a blank line)."""
    found: list[str] = []
    block: list[str] | None = None
    for line in (text or "").splitlines() + [""]:
        if HEADING.match(line):
            block = []
        elif block is not None and (not line.strip() or line.strip() == "\b"):
            found += [e for e in _join_continuations(block) if e.startswith("xares-")]
            block = None
        elif block is not None:
            block.append(line)
    return found


def examples_in_module_doc(text: str | None) -> list[str]:
    """Indented ``xares-`` lines of a module docstring (its literal example blocks)."""
    lines = [line for line in (text or "").splitlines() if line.startswith("    ")]
    return [e for e in _join_continuations(lines) if e.startswith("xares-")]


def collect() -> dict[str, str]:
    """example (as the shell splits it, comment dropped) -> where it is shown, for the failure message."""
    return {key: where for key, (_, where) in collect_shown().items()}


def collect_shown() -> dict[str, tuple[str, str]]:
    """example (as the shell splits it) -> (its text as shown, for a shell to run; where it is shown)."""
    found: dict[str, tuple[str, str]] = {}

    def add(examples: list[str], where: str) -> None:
        for example in examples:
            found.setdefault(shlex.join(shlex.split(example, comments=True)), (example, where))

    for prog, group in GROUPS.items():
        add(examples_in_help(group.help), f"{prog} --help")
        for name, cmd in _commands(group).items():
            add(examples_in_help(cmd.help) + examples_in_help(cmd.epilog), f"{prog} {name} --help")
            module = sys.modules.get(getattr(cmd.callback, "__module__", ""))
            add(examples_in_module_doc(getattr(module, "__doc__", None)), f"the docstring of {module.__name__}")
    for doc in DOCS:
        add(examples_in_module_doc(doc.read_text()), str(doc.relative_to(ROOT)))
    return found


EXAMPLES = collect()


def parse(example: str, monkeypatch: pytest.MonkeyPatch) -> click.Context:
    """Parse ``example`` as the shell and click would, without running it.

    Raises:
        click.UsageError (and its subclasses, BadParameter among them): the example does not parse.
    """
    words = shlex.split(example, comments=True)
    prog, args = words[0], words[1:]
    if prog not in GROUPS:
        raise click.UsageError(f"{prog!r} is not one of {sorted(GROUPS)}")
    group = GROUPS[prog]
    commands = _commands(group)
    at = next((i for i, w in enumerate(args) if not w.startswith("-")), None)
    if at is None or args[at] not in commands:
        raise click.UsageError(f"no command of {prog} in {args}")
    group.make_context(prog, args[: at + 1])  # the group's own options (-v, --debug) before the command
    cmd = commands[args[at]]
    for param in cmd.params:  # examples name files the reader has: only their existence is not checked
        if isinstance(param.type, click.Path) and param.type.exists:
            monkeypatch.setattr(param.type, "exists", False)
    return cmd.make_context(f"{prog} {args[at]}", args[at + 1 :], resilient_parsing=False)


def test_the_examples_are_found():
    assert len(EXAMPLES) >= 20, EXAMPLES
    assert any(e.startswith("xares-submit ") for e in EXAMPLES)
    # a continuation line is joined into its example, and comments are no part of it
    assert any("--train-config" in e and "--max-steps" in e for e in EXAMPLES), EXAMPLES


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_command_shows_an_example(group):
    shown = {shlex.split(e, comments=True)[1] for e in EXAMPLES if e.startswith(group + " ")}
    assert set(_commands(GROUPS[group])) <= shown


@pytest.mark.parametrize("example", sorted(EXAMPLES), ids=lambda e: e[:80])
def test_example_parses(example, monkeypatch):
    try:
        parse(example, monkeypatch)
    except click.UsageError as e:  # BadParameter, NoSuchOption, MissingParameter are all UsageErrors
        pytest.fail(f"example shown by `{EXAMPLES[example]}` does not parse: {example}\n  {e.format_message()}")


@pytest.mark.parametrize("example", [
    "xares-eval run submission.tar --trak A",  # a misspelled option
    "xares-eval leaderboard a.json --format xlsx",  # a choice that does not exist
    "xares-eval run submission.tar --track A --max-steps many",  # not a number
    "xares-eval lederboard a.json",  # no such command
    "xares-submit build",  # a missing argument
    "xares-eval demo-data --out",  # an option without its value
])
def test_a_broken_example_would_fail(example, monkeypatch):
    with pytest.raises(click.UsageError):
        parse(example, monkeypatch)


def test_a_missing_file_is_not_a_parse_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ctx = parse("xares-eval run no-such.tar --track demo-a --hidden-config /no/such.yaml", monkeypatch)
    assert ctx.params["track"] == "demo-a" and str(ctx.params["submissions"][0]) == "no-such.tar"
