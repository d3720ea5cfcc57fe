"""Signed receipts: an organizer's ed25519 signature over what a run measured and how.

A results.json is a plain file anyone can edit. The receipt beside it (``receipt.json``) signs the
scores together with everything that produced them (submission digest, model image, data, decoder,
full configuration, evaluator version), so a published score can be checked against the organizer's
public key long after the run, and any later edit of either file is named by `verify`.

Example::

    generate_keypair(Path("organizer.key"), Path("organizer.pub"))
    receipt = sign(receipt_payload(results, submission_sha256=sha, model_digest=image, data_digests={},
                                   decoder={"name": "smoke"}, config=config, evaluator_version="0.1.0"),
                   load_private_key(Path("organizer.key")))
    write_receipt(run_dir / RECEIPT_FILE, receipt)
    report = verify_files(run_dir / "results.json", run_dir / RECEIPT_FILE, Path("organizer.pub"))
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from evaluator.errors import ConfigError, DataError, XaresError
from evaluator.fileio import UnsafeInput, atomic_write_text, parse_json

RECEIPT_FILE = "receipt.json"  # beside results.json
FORMAT = "xares-eval/receipt/1"
ALGORITHM = "ed25519"
KEY_ID_HEX = 16  # hex digits of sha256(raw public key) naming a key
MAX_FILE_BYTES = 16 << 20  # receipts and results are small; a huge file is not one
BAD_SIGNATURE = ("the signature does not match its contents (the receipt was changed after signing, "
                 "or another key signed it)")
# results.json fields a receipt signs besides the tasks, with how a difference is named
SIGNED_FIELDS = ("track", "machine", "run_key", "created", "evaluator_version")


class ReceiptError(XaresError):
    """A receipt that is unreadable, forged, or disagrees with its results.json."""

    exit_code = 1


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    key_id: str = ""  # the key id the receipt names
    payload: dict = field(default_factory=dict)  # what was signed (empty when the receipt is unusable)

    def summary(self) -> str:
        """One line naming what a valid receipt vouches for."""
        p = self.payload
        sub = p.get("submission") if isinstance(p.get("submission"), dict) else {}
        tasks = p.get("tasks") if isinstance(p.get("tasks"), list) else []
        return (f"receipt {self.key_id} signed {sub.get('name', '?')} {str(sub.get('sha256', '?'))[:12]} on "
                f"{p.get('track', '?')}: {len(tasks)} task score{'' if len(tasks) == 1 else 's'}, "
                f"evaluator {p.get('evaluator_version', '?')}")


# --- keys ------------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable name of a public key, so a receipt says which key to verify it with."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX]


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with exactly ``mode`` (umask aside); O_EXCL so an existing key is never replaced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
        raise


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new ed25519 key pair: the private key PEM (PKCS8, unencrypted, mode 0600) and the public
    key PEM (SubjectPublicKeyInfo, 0644).

    Raises:
        ConfigError: either file exists already (a signing key is never overwritten), or it cannot be written.
    """
    private_path, public_path = Path(private_path), Path(public_path)
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{path} exists already; refusing to overwrite a key (choose another --out, or "
                              "remove it if it is really unused)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        for path in (private_path, public_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        _write_new(private_path, private_pem, 0o600)
        try:
            _write_new(public_path, public_pem, 0o644)
        except BaseException:
            private_path.unlink(missing_ok=True)  # half a pair is useless
            raise
    except FileExistsError as e:
        raise ConfigError(f"{e.filename} appeared while writing the key pair; refusing to overwrite it") from e
    except OSError as e:
        raise ConfigError(f"cannot write the key pair ({e})") from e


def _read_small(path: Path, what: str, *, missing: str, too_large: type[XaresError] = ConfigError) -> bytes:
    """A key, receipt or results file's bytes, with one-line errors (keys and receipts are never large)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise too_large(f"{path}: {path.stat().st_size} bytes is too large for {what}")
        return path.read_bytes()
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: {missing}") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{path}: is a directory, not {what}") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from e


def _read_pem(path: Path, kind: str) -> bytes:
    return _read_small(path, f"an ed25519 {kind} key file",
                       missing=f"no such {kind} key file (create a pair with `xares-eval keygen`)")


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The signing key written by `generate_keypair`.

    Raises:
        ConfigError: missing, unreadable, encrypted, or not an ed25519 private key in PEM.
    """
    return _load_key(path, "private")


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The verifying key published by the organizer (the .pub of `generate_keypair`).

    Raises:
        ConfigError: missing, unreadable, or not an ed25519 public key in PEM.
    """
    return _load_key(path, "public")


# kind -> (loader, key class, the other kind's PEM marker, the hint when the other kind was given)
_KEY_KINDS = {
    "private": (lambda data: serialization.load_pem_private_key(data, password=None), Ed25519PrivateKey,
                b"PUBLIC KEY", "it holds a public key: sign with the .key file"),
    "public": (serialization.load_pem_public_key, Ed25519PublicKey,
               b"PRIVATE KEY", "it holds a private key: verify with the .pub file"),
}


def _load_key(path: Path, kind: str):
    load, wanted, other, hint = _KEY_KINDS[kind]
    data = _read_pem(path, kind)
    try:
        key = load(data)
    except TypeError as e:  # an encrypted private key
        raise ConfigError(f"{path}: the private key is password-protected; use an unencrypted PKCS8 PEM") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        said = f" ({hint})" if other in data else ""
        raise ConfigError(f"{path}: not an ed25519 {kind} key in PEM format{said}") from e
    if not isinstance(key, wanted):
        raise ConfigError(f"{path}: holds a {type(key).__name__.removeprefix('_')}, not an ed25519 {kind} key")
    return key


# --- signing ---------------------------------------------------------------------------------------


def canonical(payload) -> bytes:
    """The exact bytes signed: one spelling per JSON value, so a receipt re-read from disk verifies.

    Floats are written by repr (shortest round-trip form), so they survive the trip exactly.

    Raises:
        ValueError: NaN/Infinity, or a value JSON cannot hold.
    """
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _plain(value):
    """``value`` as JSON would give it back (tuples -> lists, ...): what is signed is what is read."""
    return json.loads(canonical(value))


def receipt_payload(results: dict, *, submission_sha256: str, model_digest: str | None,
                    data_digests: dict[str, str], decoder: dict, config: dict, evaluator_version: str) -> dict:
    """What a receipt signs: the scores of a results.json document and everything that produced them.

    Args:
        results: the results.json document (`evaluator.scoring.results_document`).
        submission_sha256: the submission archive's digest (must be the one ``results`` names).
        model_digest: the encoder's model/image digest, None when there is none.
        data_digests: {"<task>/<split>": sha256 or store key} of the data evaluated on.
        decoder: the decoder's identity: its name, or its path and file digests.
        config: the run's full configuration (config.json's content).
        evaluator_version: the evaluator that measured.

    Raises:
        ValueError: ``results`` names another submission, or a value is not JSON (a caller's bug).
    """
    sub = results.get("submission") or {}
    if sub.get("sha256") != submission_sha256:
        raise ValueError(f"results.json names submission {sub.get('sha256')!r}, not {submission_sha256!r}")
    payload = {
        "submission": {**sub, "sha256": submission_sha256},
        **{name: results.get(name) for name in SIGNED_FIELDS if name != "evaluator_version"},
        "evaluator_version": evaluator_version,
        "tasks": results.get("tasks", []),
        "results_config": results.get("config"),  # results.json's summary of the setup, checked as well
        "model_digest": model_digest,
        "data_digests": data_digests,
        "decoder": decoder,
        "config": config,
    }
    return _plain(payload)


def sign(payload: dict, private_key: Ed25519PrivateKey) -> dict:
    """The receipt document: ``payload`` with an ed25519 signature over ``canonical(payload)``."""
    payload = _plain(payload)
    signature = private_key.sign(canonical(payload))
    return {"format": FORMAT, "payload": payload, "signature": base64.b64encode(signature).decode("ascii"),
            "key_id": key_id(private_key.public_key()), "algorithm": ALGORITHM}


def write_receipt(path: Path, receipt: dict) -> None:
    """Write a receipt atomically (readable JSON; the signature covers the payload, not the layout)."""
    atomic_write_text(Path(path), json.dumps(receipt, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


# --- verifying -------------------------------------------------------------------------------------


_ABSENT = object()  # a field one document lacks


def _show(value) -> str:
    text = "(absent)" if value is _ABSENT else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _field(document: dict, name: str):
    """A field's value, or _ABSENT (a receipt signs an absent results.json field as null)."""
    value = document.get(name)
    return _ABSENT if value is None else value


def _same(a, b) -> bool:
    """Equal as JSON values: 1 == 1.0, but True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _differences(payload: dict, results: object) -> list[str]:
    """Each way results.json disagrees with what the receipt signed, in words."""
    if not isinstance(results, dict):
        return [f"results.json is not a JSON object (it holds a {type(results).__name__})"]
    problems = []

    def compare(label: str, signed, actual) -> None:
        if not _same(signed, actual):
            problems.append(f"{label}: receipt {_show(signed)}, results.json {_show(actual)}")

    signed_sub = payload.get("submission") if isinstance(payload.get("submission"), dict) else {}
    actual_sub = results.get("submission") if isinstance(results.get("submission"), dict) else {}
    for name in sorted(set(signed_sub) | set(actual_sub)):
        compare(f"submission {name}", signed_sub.get(name, _ABSENT), actual_sub.get(name, _ABSENT))
    for name in SIGNED_FIELDS:
        if name == "evaluator_version" and _field(results, name) is _ABSENT:
            continue  # optional in results.json; the receipt's own is the evaluator that signed
        compare(name, _field(payload, name), _field(results, name))
    signed_cfg, actual_cfg = _field(payload, "results_config"), _field(results, "config")
    if isinstance(signed_cfg, dict) and isinstance(actual_cfg, dict):
        for name in sorted(set(signed_cfg) | set(actual_cfg)):
            compare(f"config {name}", signed_cfg.get(name, _ABSENT), actual_cfg.get(name, _ABSENT))
    else:
        compare("config", signed_cfg, actual_cfg)

    def by_name(tasks, where: str) -> dict[str, dict]:
        if not isinstance(tasks, list):
            problems.append(f"{where}'s tasks are not a list")
            return {}
        rows: dict[str, dict] = {}
        for row in tasks:
            if not isinstance(row, dict) or not isinstance(row.get("task"), str):
                problems.append(f"{where} has a task entry without a name: {_show(row)}")
            elif row["task"] in rows:
                problems.append(f"{where} lists task {row['task']} twice")
            else:
                rows[row["task"]] = row
        return rows

    signed_tasks = by_name(payload.get("tasks"), "the receipt")
    actual_tasks = by_name(results.get("tasks"), "results.json")
    for name in sorted(set(signed_tasks) | set(actual_tasks)):
        if name not in actual_tasks:
            problems.append(f"task {name}: in the receipt, missing from results.json")
        elif name not in signed_tasks:
            problems.append(f"task {name}: in results.json, not in the receipt")
        else:
            s, a = signed_tasks[name], actual_tasks[name]
            for key in sorted(set(s) | set(a), key=lambda k: (k != "score", k)):
                compare(f"{key} of task {name}", s.get(key, _ABSENT), a.get(key, _ABSENT))
    return problems


def verify(receipt: dict, public_key: Ed25519PublicKey, results: dict | None = None) -> VerifyReport:
    """Check a receipt's signature with ``public_key`` and, given ``results``, that results.json says
    what the receipt signed. Every problem found is listed; none raises."""
    if not isinstance(receipt, dict):
        return VerifyReport(False, [f"not a receipt: a JSON object was expected, it holds a "
                                    f"{type(receipt).__name__}"])
    if receipt.get("format") != FORMAT:
        return VerifyReport(False, [f"not a receipt of format {FORMAT!r} (format: {_show(receipt.get('format'))})"])
    if receipt.get("algorithm") != ALGORITHM:
        return VerifyReport(False, [f"algorithm {_show(receipt.get('algorithm'))} is not supported (only "
                                    f"{ALGORITHM!r})"])
    payload = receipt.get("payload")
    if not isinstance(payload, dict):
        return VerifyReport(False, ["the receipt has no payload object"])
    problems = []
    named = receipt.get("key_id")
    given = key_id(public_key)
    if named != given:
        problems.append(f"key id: the receipt names key {_show(named)}, the public key given is {given!r} "
                        "(verify with the signer's .pub)")
    try:
        signature = base64.b64decode(str(receipt.get("signature", "")), validate=True)
        public_key.verify(signature, canonical(payload))
    except (binascii.Error, ValueError):
        problems.append("the signature is not valid base64, or the payload holds a non-JSON number")
    except InvalidSignature:
        problems.append(BAD_SIGNATURE)
    if results is not None:
        problems += _differences(payload, results)
    return VerifyReport(not problems, problems, named if isinstance(named, str) else "", payload)


def _read_json(path: Path, what: str, error: type[XaresError]):
    data = _read_small(path, f"a {what}", missing=f"no such file (the {what} was expected there)", too_large=error)
    try:
        return parse_json(data)
    except UnsafeInput as e:
        raise error(f"{path}: the {what} is not valid JSON ({e})") from e


def verify_files(results_path: Path, receipt_path: Path | None, public_key_path: Path) -> VerifyReport:
    """`verify` on files; ``receipt_path`` None: the receipt.json beside ``results_path``.

    Raises:
        ConfigError: a file is missing or unreadable, or the key file is not an ed25519 public key.
        ReceiptError: the receipt is not JSON. DataError: results.json is not JSON.
    """
    results_path = Path(results_path)
    receipt_path = results_path.parent / RECEIPT_FILE if receipt_path is None else Path(receipt_path)
    public_key = load_public_key(public_key_path)
    receipt = _read_json(receipt_path, "receipt", ReceiptError)
    results = _read_json(results_path, "results.json", DataError)
    return verify(receipt, public_key, results)
