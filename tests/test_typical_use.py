"""The "Typical use" blocks of `xares-submit --help` and `xares-eval --help`, executed as shown, in order,
in an empty folder, with the one prerequisite they name (a decoder folder for DIR): what a new user types
first must work. Every other example is parse-checked in test_cli_examples.py."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_examples import examples_in_help

from evaluator.cli import eval_cli, submit_cli

pytestmark = pytest.mark.slow


def _run(example: str, cwd, **subs) -> subprocess.CompletedProcess:
    """The example through the installed console script, as a user types it (placeholders substituted)."""
    words = []
    for word in (subs.get(w, w) for w in shlex.split(example, comments=True)):
        matches = sorted(str(m.relative_to(cwd)) for m in Path(cwd).glob(word)) if any(c in word for c in "*?[") else []
        words += matches or [word]  # a shell expands a glob that matches, and keeps one that does not
    script = Path(sys.executable).parent / words[0]
    return subprocess.run([str(script), *words[1:]], cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


def test_the_typical_use_of_both_commands_runs_as_shown(tmp_path):
    from evaluator.smoke_decoder import build_smoke_decoder

    submit = examples_in_help(submit_cli.help)
    evaluate = examples_in_help(eval_cli.help)
    assert [e.split()[1] for e in submit] == ["init", "build", "validate"], submit
    assert [e.split()[1] for e in evaluate] == ["tasks", "demo-data", "run", "leaderboard"], evaluate
    for example in submit:
        done = _run(example, tmp_path)
        assert done.returncode == 0, (example, done.stdout, done.stderr)
    assert (tmp_path / "submission.tar").is_file()
    # the one prerequisite the help names for DIR: a decoder folder (offline: the project's smoke decoder)
    decoder = build_smoke_decoder(["yes", "no", "up", "down", "left", "right", "a dog barks"], tmp_path / "decoder",
                                  steps=20)
    for example in evaluate:
        done = _run(example, tmp_path, DIR=str(decoder))
        assert done.returncode == 0, (example, done.stdout[-3000:], done.stderr[-3000:])
        assert "Traceback" not in done.stderr
    assert "| 1 | logmel-baseline |" in done.stdout, done.stdout  # the leaderboard of the run (init names it so)
    assert (tmp_path / "out" / "site" / "index.html").is_file()
