"""Locate files shipped beside the package: the JSON schemas and the submission template.

A wheel carries them inside the package (``evaluator/_schemas``, ``evaluator/_template``); an editable
checkout reads them from the repository's top-level ``schemas/`` and ``submission_template/``.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import jsonschema

from evaluator.errors import XaresError

_PKG = Path(__file__).resolve().parent


def _find(packaged: str, in_repo: str) -> Path:
    for candidate in (_PKG / packaged, _PKG.parent / in_repo):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"cannot find {in_repo}/ beside the package: the installation is incomplete")


def schemas_dir() -> Path:
    return _find("_schemas", "schemas")


def template_dir() -> Path:
    return _find("_template", "submission_template")


@cache
def load_schema(name: str) -> dict:
    """Load ``schemas/<name>.schema.json`` (e.g. ``load_schema("submission")``)."""
    return json.loads((schemas_dir() / f"{name}.schema.json").read_text())


def schema_errors(document: object, name: str) -> list[str]:
    """Every violation of schema ``name`` as 'path: message' lines (empty when valid)."""
    validator = jsonschema.Draft202012Validator(load_schema(name))
    lines = []
    for err in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        lines.append(f"{where}: {err.message}")
    return lines


def validate_document(document: object, name: str, *, what: str, error: type[XaresError]) -> None:
    """Raise ``error`` listing every schema violation of ``document`` (described as ``what``)."""
    problems = schema_errors(document, name)
    if problems:
        raise error(f"{what} does not match {name}.schema.json", reasons=problems)
