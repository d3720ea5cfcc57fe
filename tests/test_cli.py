"""The CLI boundary: user errors are one line + their exit code, our bugs are 'internal error' + 70."""

from __future__ import annotations

import click
from click.testing import CliRunner

from evaluator.cli import INTERNAL_ERROR_EXIT, LazyGroup, eval_cli, submit_cli
from evaluator.errors import ConfigError, SubmissionError


@click.command()
def fail_user():
    raise SubmissionError("model.onnx is missing", reasons=["expected model.onnx beside manifest.json"])


@click.command()
def fail_config():
    raise ConfigError("--max-steps must be positive, got -1")


@click.command()
def fail_bug():
    {}["oops"]


def _group():
    lazy = {name: f"{__name__}:{name}" for name in ("fail_user", "fail_config", "fail_bug")}
    lazy["missing"] = "evaluator.cli.no_such_module:cmd"

    @click.group(cls=LazyGroup, lazy=lazy)
    @click.option("--debug", is_flag=True)
    def g(debug):
        pass

    return g


def test_user_error_is_one_line_with_reasons_and_exit_1():
    result = CliRunner().invoke(_group(), ["fail_user"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "error: model.onnx is missing",
        "  - expected model.onnx beside manifest.json",
    ]
    assert "Traceback" not in result.output


def test_config_error_exits_2():
    result = CliRunner().invoke(_group(), ["fail_config"])
    assert result.exit_code == 2 and "--max-steps" in result.output


def test_internal_bug_is_reported_as_such():
    result = CliRunner().invoke(_group(), ["fail_bug"])
    assert result.exit_code == INTERNAL_ERROR_EXIT
    assert result.output.startswith("internal error: KeyError") and "--debug" in result.output


def test_debug_lets_the_traceback_through():
    result = CliRunner().invoke(_group(), ["--debug", "fail_bug"])
    assert isinstance(result.exception, KeyError)


def test_commands_whose_module_is_absent_are_not_listed():
    result = CliRunner().invoke(_group(), ["--help"])
    assert "fail_user" in result.output and "missing" not in result.output
    assert CliRunner().invoke(_group(), ["missing"]).exit_code == 2  # click: no such command


def test_top_level_help_works():
    for cli in (eval_cli, submit_cli):
        result = CliRunner().invoke(cli, ["--help"])
        assert result.exit_code == 0, result.output
