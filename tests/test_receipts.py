"""Signed receipts: keygen, signing a realistic results document, and each tampering named by `verify`."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from evaluator.cli import eval_cli
from evaluator.errors import ConfigError
from evaluator.receipts import (
    BAD_SIGNATURE,
    RECEIPT_FILE,
    canonical,
    generate_keypair,
    key_id,
    load_private_key,
    load_public_key,
    receipt_payload,
    sign,
    verify,
    write_receipt,
)
from evaluator.scoring import TaskResult, results_document

SHA = "ab12cd34ef56" + "0" * 52
CONFIG_JSON = {"run_key": "k-123", "submission": {"name": "enc", "sha256": SHA}, "track": "demo-a",
               "options": {"precision": "bf16", "max_steps": 200, "seed": 0}}


def invoke(*args):
    return CliRunner().invoke(eval_cli, list(args))


def results_doc() -> dict:
    tasks = [
        TaskResult("demo-voices", hidden=False, metric="accuracy", score=0.625, n_samples=16),
        TaskResult("demo-words", hidden=False, metric="1-WER", score=0.1 + 0.2, n_samples=16),  # 0.30000000000000004
        TaskResult("demo-hidden", hidden=True, metric="accuracy", score=0.0, n_samples=8, failed=True,
                   error="decoding failed: CUDA out of memory"),
    ]
    return results_document(submission="enc", sha256=SHA, machine="host1/cuda:0", track="demo-a", tasks=tasks,
                            created="2026-03-01T12:00:00Z", evaluator_version="0.1.0", run_key="k-123",
                            config={"train_dir": "t1", "decoder": "smoke", "max_steps": 200, "precision": "bf16",
                                    "device": "cuda:0"})


@pytest.fixture
def keys(tmp_path):
    result = invoke("keygen", "--out", str(tmp_path / "keys" / "org"))
    assert result.exit_code == 0, result.output
    return tmp_path / "keys" / "org.key", tmp_path / "keys" / "org.pub"


@pytest.fixture
def run_dir(tmp_path, keys):
    """A run folder with results.json and the receipt signed over it."""
    run = tmp_path / "run"
    run.mkdir()
    doc = results_doc()
    (run / "results.json").write_text(json.dumps(doc, indent=2))
    payload = receipt_payload(doc, submission_sha256=SHA, model_digest="sha256:" + "9" * 64,
                              data_digests={"demo-voices/test": "1" * 64, "demo-words/test": "store:abc"},
                              decoder={"name": "smoke", "files": {"model.safetensors": "2" * 64}},
                              config=CONFIG_JSON, evaluator_version="0.1.0")
    write_receipt(run / RECEIPT_FILE, sign(payload, load_private_key(keys[0])))
    return run


def check(run: Path, pub: Path, *extra: str):
    return invoke("verify", str(run / "results.json"), "--key", str(pub), *extra)


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))


def assert_one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], result.output


class TestKeygen:
    def test_writes_the_pair_with_modes_and_prints_paths_and_key_id(self, tmp_path):
        prefix = tmp_path / "org"
        result = invoke("keygen", "--out", str(prefix))
        assert result.exit_code == 0, result.output
        key, pub = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert stat.S_IMODE(pub.stat().st_mode) == 0o644
        assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
        assert pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")
        kid = key_id(load_public_key(pub))
        assert kid == key_id(load_private_key(key).public_key()) and len(kid) == 16
        assert f"wrote {key}" in result.output and "secret" in result.output
        assert f"wrote {pub}" in result.output and "publish" in result.output
        assert f"key id: {kid}" in result.output

    def test_refuses_to_overwrite_either_file(self, tmp_path):
        prefix = tmp_path / "org"
        assert invoke("keygen", "--out", str(prefix)).exit_code == 0
        before = Path(f"{prefix}.key").read_bytes()
        assert_one_line_error(invoke("keygen", "--out", str(prefix)), 2, "exists already", "org.key")
        assert Path(f"{prefix}.key").read_bytes() == before
        Path(f"{prefix}.key").unlink()  # only the .pub left: still refused, and no half pair written
        assert_one_line_error(invoke("keygen", "--out", str(prefix)), 2, "exists already", "org.pub")
        assert not Path(f"{prefix}.key").exists()

    def test_key_loaders_name_the_wrong_kind(self, keys, tmp_path):
        key, pub = keys
        with pytest.raises(ConfigError, match="holds a private key"):
            load_public_key(key)
        with pytest.raises(ConfigError, match="holds a public key"):
            load_private_key(pub)
        with pytest.raises(ConfigError, match="no such public key file"):
            load_public_key(tmp_path / "nope.pub")
        garbage = tmp_path / "garbage.pub"
        garbage.write_text("not a key\n")
        with pytest.raises(ConfigError, match="not an ed25519 public key"):
            load_public_key(garbage)


class TestSigning:
    def test_receipt_format_and_payload(self, run_dir, keys):
        receipt = json.loads((run_dir / RECEIPT_FILE).read_text())
        assert set(receipt) == {"format", "payload", "signature", "key_id", "algorithm"}
        assert receipt["format"] == "xares-eval/receipt/1" and receipt["algorithm"] == "ed25519"
        assert receipt["key_id"] == key_id(load_public_key(keys[1]))
        assert len(base64.b64decode(receipt["signature"])) == 64
        p = receipt["payload"]
        assert p["submission"] == {"name": "enc", "sha256": SHA}
        assert (p["track"], p["machine"], p["run_key"], p["created"], p["evaluator_version"]) == (
            "demo-a", "host1/cuda:0", "k-123", "2026-03-01T12:00:00Z", "0.1.0")
        assert p["config"] == CONFIG_JSON and p["decoder"]["name"] == "smoke"
        assert p["data_digests"]["demo-words/test"] == "store:abc" and p["model_digest"].startswith("sha256:")
        assert p["tasks"] == results_doc()["tasks"]
        assert p["tasks"][1]["score"] == 0.1 + 0.2  # floats survive the file exactly

    def test_canonical_is_key_order_and_layout_independent(self):
        assert canonical({"b": 1, "a": [1.5, "é"]}) == canonical({"a": [1.5, "é"], "b": 1})
        assert canonical({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()
        with pytest.raises(ValueError):
            canonical({"score": float("nan")})

    def test_payload_refuses_another_submissions_results(self):
        with pytest.raises(ValueError, match="names submission"):
            receipt_payload(results_doc(), submission_sha256="f" * 64, model_digest=None, data_digests={},
                            decoder={}, config={}, evaluator_version="0.1.0")


class TestVerify:
    def test_valid_receipt_verifies(self, run_dir, keys):
        result = check(run_dir, keys[1])
        assert result.exit_code == 0, result.output
        kid = key_id(load_public_key(keys[1]))
        assert result.output == f"ok: receipt {kid} signed enc ab12cd34ef56 on demo-a: 3 task scores, evaluator 0.1.0\n"

    def test_receipt_elsewhere_via_option(self, run_dir, keys, tmp_path):
        moved = tmp_path / "elsewhere.json"
        (run_dir / RECEIPT_FILE).rename(moved)
        assert check(run_dir, keys[1], "--receipt", str(moved)).exit_code == 0
        assert_one_line_error(check(run_dir, keys[1]), 2, "receipt.json: no such file")

    def test_one_changed_signature_byte(self, run_dir, keys):
        def flip(doc):
            sig = bytearray(base64.b64decode(doc["signature"]))
            sig[10] ^= 0x01
            doc["signature"] = base64.b64encode(bytes(sig)).decode()

        edit_json(run_dir / RECEIPT_FILE, flip)
        result = check(run_dir, keys[1])
        assert result.exit_code == 1, result.output
        assert "does not vouch for" in result.output and "1 problem" in result.output
        assert f"  - {BAD_SIGNATURE}" in result.output

    def test_changed_score_in_results(self, run_dir, keys):
        edit_json(run_dir / "results.json", lambda d: d["tasks"][0].update(score=0.6875))
        result = check(run_dir, keys[1])
        assert result.exit_code == 1, result.output
        assert "  - score of task demo-voices: receipt 0.625, results.json 0.6875" in result.output
        assert BAD_SIGNATURE not in result.output  # the receipt itself is intact

    def test_changed_setting_in_receipt_config(self, run_dir, keys):
        edit_json(run_dir / RECEIPT_FILE, lambda d: d["payload"]["config"]["options"].update(max_steps=20))
        result = check(run_dir, keys[1])
        assert result.exit_code == 1, result.output
        assert f"  - {BAD_SIGNATURE}" in result.output

    def test_changed_track(self, run_dir, keys):
        edit_json(run_dir / "results.json", lambda d: d.update(track="A"))
        result = check(run_dir, keys[1])
        assert result.exit_code == 1, result.output
        assert "  - track: receipt 'demo-a', results.json 'A'" in result.output

    def test_changed_score_in_both_files(self, run_dir, keys):
        edit_json(run_dir / "results.json", lambda d: d["tasks"][0].update(score=0.9))
        edit_json(run_dir / RECEIPT_FILE, lambda d: d["payload"]["tasks"][0].update(score=0.9))
        result = check(run_dir, keys[1])
        assert result.exit_code == 1 and f"  - {BAD_SIGNATURE}" in result.output, result.output

    def test_task_removed(self, run_dir, keys):
        edit_json(run_dir / "results.json", lambda d: d["tasks"].pop(2))
        result = check(run_dir, keys[1])
        assert result.exit_code == 1, result.output
        assert "  - task demo-hidden: in the receipt, missing from results.json" in result.output

    def test_task_added_and_run_key_changed(self, run_dir, keys):
        def change(d):
            d["tasks"].append({**d["tasks"][0], "task": "extra"})
            d["run_key"] = "k-999"

        edit_json(run_dir / "results.json", change)
        result = check(run_dir, keys[1])
        assert result.exit_code == 1 and "2 problems" in result.output, result.output
        assert "  - run_key: receipt 'k-123', results.json 'k-999'" in result.output
        assert "  - task extra: in results.json, not in the receipt" in result.output

    def test_changed_evaluator_version_and_created(self, run_dir, keys):
        edit_json(run_dir / "results.json", lambda d: d.update(evaluator_version="0.2.0", created="2027-01-01"))
        result = check(run_dir, keys[1])
        assert result.exit_code == 1 and "2 problems" in result.output, result.output
        assert "  - evaluator_version: receipt '0.1.0', results.json '0.2.0'" in result.output
        assert "  - created: receipt '2026-03-01T12:00:00Z', results.json '2027-01-01'" in result.output

    def test_another_key_pair(self, run_dir, keys, tmp_path):
        assert invoke("keygen", "--out", str(tmp_path / "other")).exit_code == 0
        other = tmp_path / "other.pub"
        result = check(run_dir, other)
        assert result.exit_code == 1, result.output
        signer, given = key_id(load_public_key(keys[1])), key_id(load_public_key(other))
        assert f"  - key id: the receipt names key '{signer}', the public key given is '{given}'" in result.output
        assert f"  - {BAD_SIGNATURE}" in result.output

    @pytest.mark.parametrize("content", ["", '{"format": "xares-eval/receipt/1", "payl', "not json at all"])
    def test_truncated_or_non_json_receipt(self, run_dir, keys, content):
        (run_dir / RECEIPT_FILE).write_text(content)
        assert_one_line_error(check(run_dir, keys[1]), 1, "receipt.json: the receipt is not valid JSON")

    def test_wrong_key_file_and_missing_results(self, run_dir, keys, tmp_path):
        assert_one_line_error(check(run_dir, keys[0]), 2, "not an ed25519 public key", "private key")
        assert_one_line_error(invoke("verify", str(tmp_path / "none" / "results.json"), "--key", str(keys[1])), 2,
                              "no such file")

    def test_not_a_receipt(self, keys):
        pub = load_public_key(keys[1])
        assert verify([], pub).problems == ["not a receipt: a JSON object was expected, it holds a list"]
        report = verify({"format": "other/1"}, pub)
        assert not report.ok and "not a receipt of format 'xares-eval/receipt/1'" in report.problems[0]

    def test_api_verify_without_results_checks_only_the_signature(self, run_dir, keys):
        receipt = json.loads((run_dir / RECEIPT_FILE).read_text())
        pub = load_public_key(keys[1])
        assert verify(receipt, pub).ok
        receipt["key_id"] = "0" * 16  # not signed, but named
        report = verify(receipt, pub)
        assert not report.ok and report.problems == [
            f"key id: the receipt names key '{'0' * 16}', the public key given is '{key_id(pub)}' "
            "(verify with the signer's .pub)"]


def test_generate_keypair_api_refuses_existing(tmp_path):
    (tmp_path / "a.pub").write_text("x")
    with pytest.raises(ConfigError, match="exists already"):
        generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    assert not (tmp_path / "a.key").exists()
