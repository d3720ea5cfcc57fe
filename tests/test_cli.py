"""The CLI boundary: user errors are one line + their exit code, our bugs are 'internal error' + 70."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from evaluator.cli import (
    INTERNAL_ERROR_EXIT,
    INTERRUPTED_EXIT,
    INTERRUPTED_MESSAGE,
    LazyGroup,
    eval_cli,
    submit_cli,
)
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


@click.command()
def interrupted():
    raise KeyboardInterrupt


def _group():
    lazy = {name: f"{__name__}:{name}" for name in ("fail_user", "fail_config", "fail_bug", "interrupted")}
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


# -- Ctrl-C: not "Aborted!" and exit 1 (which means "invalid submission") ---------------------------


def test_an_interrupt_is_one_line_and_exit_130():
    result = CliRunner().invoke(_group(), ["interrupted"])
    assert result.exit_code == INTERRUPTED_EXIT == 130
    assert result.output.splitlines() == [INTERRUPTED_MESSAGE]


@pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("sox")), reason="demo-data needs espeak-ng and sox")
def test_ctrl_c_on_a_real_command_exits_130_without_a_traceback(tmp_path):
    """SIGINT to `python -m evaluator demo-data` while it renders audio (seconds, no network, no Docker)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "evaluator", "demo-data", "--out", str(tmp_path / "data"), "--track", "demo-a"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # a shell's background job (CI, nohup) ignores SIGINT, and an ignored signal stays ignored across exec
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout.readline().startswith("Generating demo-a"), proc.stderr.read()
        time.sleep(0.3)  # inside the generation, which takes seconds
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, (out, err)
    assert err.strip().splitlines()[-1] == "interrupted; rerun the same command to resume", err
    assert "Traceback" not in err and "Aborted" not in err, err


# -- --decoder FOLDER without a model: a configuration error (exit 2) naming what is missing ----------


def _decoder_folder(root: Path, *names: str) -> Path:
    root.mkdir()
    for name in names:
        (root / name).write_text("{}")
    return root


@pytest.mark.parametrize(("names", "missing", "present"), [
    ((), ["no config.json", "no weights", "no tokenizer files"], []),
    (("config.json",), ["no weights", "no tokenizer files"], ["no config.json"]),
    (("config.json", "model.safetensors"), ["no tokenizer files"], ["no config.json", "no weights"]),
    (("config.json", "model.safetensors.index.json", "vocab.json"), ["no tokenizer files"], ["no weights"]),
])
def test_a_decoder_folder_without_a_model_is_a_config_error_naming_what_is_missing(tmp_path, names, missing,
                                                                                   present):
    from evaluator.hub import check_decoder

    folder = _decoder_folder(tmp_path / "decoder", *names)
    with pytest.raises(ConfigError) as e:
        check_decoder(str(folder))
    message = str(e.value)
    assert e.value.exit_code == 2 and str(folder) in message and ".;" not in message
    assert all(m in message for m in missing) and not any(p in message for p in present), message
    if "no weights" in missing:
        assert "model.safetensors" in message and "pytorch_model.bin" in message


def test_a_decoder_folder_with_a_broken_config_is_a_config_error(tmp_path):
    from evaluator.hub import check_decoder

    folder = _decoder_folder(tmp_path / "decoder", "model.safetensors", "tokenizer.json")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json") as e:
        check_decoder(str(folder))
    assert ".;" not in str(e.value)


@pytest.mark.slow
def test_run_with_a_decoder_folder_without_a_model_exits_2_before_any_extraction(tmp_path):
    import json

    from evaluator.resources import template_dir
    from evaluator.submission.archive import pack
    from evaluator.submission.manifest import Manifest

    stage = tmp_path / "stage"
    stage.mkdir()
    shutil.copy(template_dir() / "onnx_model" / "model.onnx", stage / "model.onnx")
    doc = json.loads((template_dir() / "onnx_model" / "manifest.json").read_text())
    doc.update(schema_version=1, kind="onnx", sample_rate=16000, output_dim=80, frame_hop_ms=20.0, files=[])
    pack(stage, Manifest.from_dict(doc), tmp_path / "submission.tar")
    folder = _decoder_folder(tmp_path / "decoder", "config.json")
    result = CliRunner().invoke(eval_cli, [
        "run", str(tmp_path / "submission.tar"), "--track", "demo-a", "--data-home", str(tmp_path / "data"),
        "--decoder", str(folder), "--offline", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no weights" in errors[0] and "no tokenizer files" in errors[0], result.output
    assert "Extracting" not in result.output and not (tmp_path / "out").exists()
