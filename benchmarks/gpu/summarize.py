"""Gather the figures of benchmarks/gpu/check.sh into one JSON document (printed to stdout).

    python benchmarks/gpu/summarize.py WORK_DIR [DEMO_DIR] > gpu-check.json

WORK_DIR holds phases.jsonl, tests.xml, engine.json, train.json and pack.json; DEMO_DIR (.gpu-demo) the
GPU's demo results and the CPU's (cpu-results.json), compared task by task. Whether packed training met
issue 12's target (8 jobs packed >= 5x 8 solo runs in sequence) is also printed to stderr.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tests(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s
              if case.find("failure") is not None or case.find("error") is not None]
    return {**count, "passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
            "failed": failed}


def demo(folder: Path) -> dict | None:
    cpu = _json(folder / "cpu-results.json")
    gpu = [_json(p) for p in sorted(folder.glob("runs/*/demo-*/results.json"))]
    gpu = [d for d in gpu if d and d.get("machine", "").endswith("cuda")]
    if not cpu or not gpu:
        return None
    cpu_scores = {(d["track"], t["task"]): t["score"] for d in cpu for t in d["tasks"]}
    rows = []
    for d in gpu:
        for t in d["tasks"]:
            ref = cpu_scores.get((d["track"], t["task"]))
            rows.append({"track": d["track"], "task": t["task"], "metric": t["metric"],
                         "precision": d.get("config", {}).get("precision"), "gpu": t["score"], "cpu_fp32": ref,
                         "abs_diff": None if ref is None else abs(t["score"] - ref)})
    return {"tasks": rows, "device": gpu[0].get("config", {}).get("device")}


def pack(path: Path) -> dict | None:
    """bench_pack.py's figures, with issue 12's target per precision (None where K=8 or a solo run is missing)."""
    figures = _json(path)
    if not figures:
        return None
    target = {precision: s.get("target") for precision, s in (figures.get("summary") or {}).items()}
    for precision, t in target.items():
        line = ("not measured" if not t else
                f"{t['speedup']:.2f}x ({'met' if t['met'] else 'NOT met'})")
        print(f"issue 12, {precision}: 8 jobs packed vs 8 solo runs in sequence (target >= 5x): {line}",
              file=sys.stderr)
    return {**figures, "target_8_jobs_5x": target}


def main(argv: list[str]) -> int:
    work = Path(argv[1])
    demo_dir = Path(argv[2]) if len(argv) > 2 else None
    phases = []
    if (work / "phases.jsonl").exists():
        phases = [json.loads(line) for line in (work / "phases.jsonl").read_text().splitlines() if line.strip()]
    report = {
        "phases": phases,
        "tests": tests(work / "tests.xml"),
        "engine": _json(work / "engine.json"),
        "train_track_a": _json(work / "train.json"),
        "pack": pack(work / "pack.json"),
        "demo": demo(demo_dir) if demo_dir and demo_dir.is_dir() else None,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
