"""``xares-submit init|build|validate`` in process (CliRunner): exit codes and one-line reasons."""

from __future__ import annotations

import io
import tarfile

import click
import pytest
from click.testing import CliRunner

from evaluator.cli import eval_cli, submit_cli
from evaluator.cli.submit import parse_size


@pytest.fixture
def runner():
    return CliRunner()


@pytest.mark.slow
def test_init_build_validate_baseline(runner, tmp_path):
    folder, tar = tmp_path / "e", tmp_path / "e.tar"
    r = runner.invoke(submit_cli, ["init", str(folder), "--kind", "onnx"])
    assert r.exit_code == 0, r.output
    assert (folder / "encoder.py").is_file() and (folder / "manifest.json").is_file()
    r = runner.invoke(submit_cli, ["build", str(folder), "-o", str(tar), "--team", "cli-test"])
    assert r.exit_code == 0, r.output
    assert "Wrote" in r.output and "by cli-test" in r.output and "50 frames/s" in r.output
    r = runner.invoke(submit_cli, ["validate", str(tar)])
    assert r.exit_code == 0, r.output
    assert "is valid" in r.output and "deterministic: two runs give the same output" in r.output
    r = runner.invoke(eval_cli, ["validate", str(tar)])  # the organizer's tool, same command
    assert r.exit_code == 0, r.output


def test_validate_hostile_tar_exit_1_one_line_per_reason(runner, tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        for name, kind in (("../up", tarfile.REGTYPE), ("ln", tarfile.SYMTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tar.addfile(info, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
    r = runner.invoke(submit_cli, ["validate", str(bad)])
    assert r.exit_code == 1
    lines = r.stderr.strip().splitlines()
    start = lines.index("error: bad.tar holds members that are not allowed")
    reasons = lines[start + 1 :]
    assert len(reasons) == 2 and all(ln.startswith("  - ") for ln in reasons)
    assert "'..'" in reasons[0] and "symbolic link" in reasons[1]
    assert "Traceback" not in r.output


def test_validate_not_a_tar(runner, tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_text("hello")
    r = runner.invoke(submit_cli, ["validate", str(junk)])
    assert r.exit_code == 1 and "not a readable tar archive" in r.output


def test_usage_errors_exit_2(runner, tmp_path):
    assert runner.invoke(submit_cli, ["validate", str(tmp_path / "missing.tar")]).exit_code == 2
    assert runner.invoke(submit_cli, ["build", str(tmp_path / "missing")]).exit_code == 2
    assert runner.invoke(submit_cli, ["init", str(tmp_path), "--kind", "wasm"]).exit_code == 2
    (tmp_path / "x").write_text("occupied")
    r = runner.invoke(submit_cli, ["init", str(tmp_path)])
    assert r.exit_code == 2 and "--force" in r.output


def test_build_empty_folder_exit_1(runner, tmp_path):
    r = runner.invoke(submit_cli, ["build", str(tmp_path), "-o", str(tmp_path / "s.tar")])
    assert r.exit_code == 1 and "nothing to build" in r.output
    assert not (tmp_path / "s.tar").exists()


def test_init_container_copies_the_template(runner, tmp_path):
    from evaluator.resources import template_dir

    if not (template_dir() / "container").is_dir():
        r = runner.invoke(submit_cli, ["init", str(tmp_path / "c"), "--kind", "container"])
        assert r.exit_code == 1 and "template is missing" in r.output
        return
    r = runner.invoke(submit_cli, ["init", str(tmp_path / "c"), "--kind", "container"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "c" / "Dockerfile").is_file()


def test_help_texts(runner):
    for cmd in ("init", "build", "validate"):
        r = runner.invoke(submit_cli, [cmd, "--help"])
        assert r.exit_code == 0 and "Examples:" in r.output


def test_parse_size():
    assert parse_size("2G") == 2 << 30 and parse_size("500M") == 500 << 20 and parse_size("123") == 123
    with pytest.raises(click.BadParameter):
        parse_size("lots")
