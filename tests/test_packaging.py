"""The installed package (a wheel, not the editable checkout) carries its schemas, template and tracks."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_finds_schemas_template_and_tracks(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    (wheel,) = (tmp_path / "dist").glob("xares_eval-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("submission", "extract_request", "extract_response", "results"):
        assert f"evaluator/_schemas/{name}.schema.json" in names
    assert "evaluator/_template/onnx/encoder.py" in names
    assert "evaluator/_template/container/Dockerfile" in names
    assert any(n.startswith("evaluator/data/tracks/") and n.endswith(".yaml") for n in names)

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True)
    probe = ("import evaluator, evaluator.resources as r; "
             "print(evaluator.__file__); print(r.schemas_dir()); print(r.load_schema('results')['$id'])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))
    assert out[2].endswith("/results/1")
