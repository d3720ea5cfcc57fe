"""The container extract protocol, host side: write the request, read and check the response.

The contract is `schemas/extract_request.schema.json` and `schemas/extract_response.schema.json`: mono
float32 16 kHz WAVs and /input/request.json in; /output/response.json plus one ``[T, D]`` .npy per item
out. Everything the encoder wrote is untrusted: every check here fails with the item and the reason.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path, PurePosixPath

import numpy as np
import soundfile as sf

from evaluator.errors import SandboxError, first_line
from evaluator.fileio import UnsafeInput, parse_json, read_npy
from evaluator.resources import schema_errors
from evaluator.submission.manifest import SAMPLE_RATE, Manifest

RESPONSE_NAME = "response.json"
REQUEST_NAME = "request.json"
MAX_RESPONSE_BYTES = 16 << 20  # response.json larger than this is refused unread
HOP_TOLERANCE_FRAMES = 2.0  # |T - seconds*1000/hop| allowed, same rule as the probe ...
HOP_TOLERANCE_RATIO = 0.02  # ... or this fraction of the expected frames, whichever is larger
MAX_FIXED_FRAMES = 100_000  # frames one item of a "fixed" encoder may return (Whisper: 1500)
_SAFE_NAME = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9._-]{1,200}$")


def write_request(input_dir: Path, clips: list[np.ndarray]) -> list[dict]:
    (input_dir / "audio").mkdir(parents=True)
    items = []
    for i, wave in enumerate(clips):
        item_id = f"{i:06d}"
        rel = f"audio/{item_id}.wav"
        sf.write(input_dir / rel, wave, SAMPLE_RATE, subtype="FLOAT")
        items.append({"id": item_id, "path": rel, "num_samples": int(wave.size)})
    (input_dir / REQUEST_NAME).write_text(
        json.dumps({"schema_version": 1, "sample_rate": SAMPLE_RATE, "items": items})
    )
    # The encoder runs as nobody: it must read these, and nothing else of ours.
    for p in [input_dir, input_dir / "audio", *input_dir.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return items


def untar_output(tar_path: Path, out: Path) -> list[str]:
    """Extract /output's plain files (flat); refuse links, folders, devices and odd names."""
    names, problems = [], []
    with tarfile.open(tar_path) as tar:
        for m in tar:
            parts = PurePosixPath(m.name).parts
            rel = "/".join(parts[1:])  # the archive's top folder is "output"
            if not rel:
                continue
            if m.issym() or m.islnk():
                problems.append(f"/output/{rel} is a link (to {m.linkname!r}); write plain files only")
            elif m.isdir():
                problems.append(f"/output/{rel} is a folder; write features flat into /output")
            elif not m.isfile():
                problems.append(f"/output/{rel} is not a regular file")
            elif "/" in rel or not _SAFE_NAME.match(rel):
                problems.append(f"/output/{rel}: unexpected file name")
            else:
                with tar.extractfile(m) as src, open(out / rel, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                names.append(rel)
    if problems:
        raise SandboxError(f"/output breaks the contract: {problems[0]}", reasons=problems)
    return names


def read_response(out: Path, names: list[str], *, items: list[dict], manifest: Manifest) -> list[np.ndarray]:
    """Check /output against the request and the manifest, and load the features.

    Args:
        out: host folder holding the copied /output files.
        names: the file names found there.
        items: the request items (id, path, num_samples), in clip order.
        manifest: gives output_dim, output_dtype and frame_hop_ms.

    Returns:
        One float32 array [T, D] per item, in request order.

    Raises:
        SandboxError: listing every broken rule (missing, duplicate or extra items and files, wrong
        shape, dtype or frame count, non-finite values, per-item errors the encoder reported).
    """
    if RESPONSE_NAME not in names:
        raise SandboxError(f"the encoder exited cleanly but wrote no /output/{RESPONSE_NAME}")
    path = out / RESPONSE_NAME
    if path.stat().st_size > MAX_RESPONSE_BYTES:
        raise SandboxError(f"/output/{RESPONSE_NAME} is larger than {MAX_RESPONSE_BYTES >> 20} MiB")
    try:
        doc = parse_json(path.read_bytes())
    except UnsafeInput as e:
        raise SandboxError(f"/output/{RESPONSE_NAME} is not valid JSON: {first_line(e)}") from e
    problems = schema_errors(doc, "extract_response")
    if problems:
        raise SandboxError(f"/output/{RESPONSE_NAME} does not match extract_response.schema.json: {problems[0]}",
                           reasons=problems)
    by_id: dict[str, dict] = {}
    for entry in doc["items"]:
        if entry["id"] in by_id:
            problems.append(f"item {entry['id']}: listed twice in {RESPONSE_NAME}")
        by_id[entry["id"]] = entry
    wanted = [it["id"] for it in items]
    problems += [f"item {i}: missing from {RESPONSE_NAME}" for i in wanted if i not in by_id]
    problems += [f"item {i}: not in the request" for i in by_id if i not in set(wanted)]
    referenced = {RESPONSE_NAME} | {e["features"] for e in by_id.values() if e["status"] == "ok"}
    extra = sorted(set(names) - referenced)
    if extra:
        problems.append(f"unexpected file(s) in /output: {', '.join(extra[:10])}" + (" ..." if len(extra) > 10 else ""))
    features = []
    for it in items:
        entry = by_id.get(it["id"])
        if entry is None:
            continue
        if entry["status"] != "ok":
            problems.append(f"item {it['id']}: the encoder reported an error: {entry['error'][:300]}")
            continue
        arr, problem = _load_features(out, names, entry, it, manifest)
        if problem:
            problems.append(f"item {it['id']}: {problem}")
        features.append(arr)
    if problems:
        raise SandboxError(f"the encoder's output breaks the extract contract: {problems[0]}", reasons=problems)
    return features


def _load_features(out: Path, names: list[str], entry: dict, item: dict, manifest: Manifest):
    rel = entry["features"]
    if rel not in names:
        return None, f"features file {rel!r} is not in /output"
    if entry["dtype"] != manifest.output_dtype:
        return None, f"dtype {entry['dtype']} declared, manifest output_dtype is {manifest.output_dtype}"
    # the declared shape must obey the contract before the file is read: its bytes are bounded by it
    frames, dim = entry["shape"]
    if dim != manifest.output_dim:
        return None, f"shape {entry['shape']}, expected [T, {manifest.output_dim}] (manifest output_dim)"
    if frames < 1:
        return None, f"no frames for {item['num_samples'] / SAMPLE_RATE:g} s"
    if manifest.fixed_frames:  # the count itself is checked against the probe's by extraction
        if frames > MAX_FIXED_FRAMES:
            return None, f"{frames} frames; a fixed-frame encoder may return at most {MAX_FIXED_FRAMES}"
    else:
        expected = item["num_samples"] * 1000.0 / (SAMPLE_RATE * manifest.frame_hop_ms)
        tolerance = max(HOP_TOLERANCE_FRAMES, HOP_TOLERANCE_RATIO * expected)
        if abs(frames - expected) > tolerance:
            return None, (f"{frames} frames for {item['num_samples'] / SAMPLE_RATE:g} s, expected about "
                          f"{expected:.0f} at frame_hop_ms={manifest.frame_hop_ms:g}")
    dtype = np.dtype(manifest.output_dtype)
    try:
        arr = read_npy(out / rel, max_bytes=frames * dim * dtype.itemsize)
    except UnsafeInput as e:
        return None, f"{rel}: {first_line(e)}"
    except OSError as e:
        return None, f"{rel} cannot be read ({first_line(e)})"
    if arr.dtype != dtype:
        return None, f"{rel} holds {arr.dtype}, manifest output_dtype is {manifest.output_dtype}"
    if list(arr.shape) != [frames, dim]:
        return None, f"shape {list(arr.shape)} but {RESPONSE_NAME} declares {entry['shape']}"
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        return None, f"{bad} NaN or infinite value(s)"
    return arr.astype(np.float32, copy=False), None
