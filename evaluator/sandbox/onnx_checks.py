"""Static checks of an ONNX submission: the host reads the graph as data before onnxruntime opens it.

Only operator domains that onnxruntime implements itself are allowed (no custom-op library is ever
registered), and every external-data file must lie inside the submission (relative, no ``..``, no link):
a model over protobuf's 2 GB limit may keep its weights beside the .onnx file, nothing else.
"""

from __future__ import annotations

import re
from pathlib import Path

from evaluator.errors import SubmissionError

# Operator domains onnxruntime implements with its own compiled kernels: the ONNX standard sets and
# Microsoft's contrib ops (what torch exports and the onnxruntime optimizers emit: FusedMatMul,
# Attention, ...). Anything else needs a custom-op library, which would be the participant's native code.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})


def _load_graph_only(model_path: Path):
    import onnx

    try:
        return onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, ... for garbage
        raise SubmissionError(f"{model_path.name} is not a readable ONNX model: {e}") from e


def external_data_files(model_path: Path) -> list[str]:
    """Locations (relative to the model's folder) of the external-data files the model reads.

    Models over protobuf's 2 GB limit keep their weights beside the .onnx file; `check_model` makes
    sure every such file lies inside the submission before anything opens it.
    """
    import onnx

    model = _load_graph_only(model_path)
    locations = {
        next((e.value for e in t.external_data if e.key == "location"), "")
        for t in _all_tensors(model)
        if t.data_location == onnx.TensorProto.EXTERNAL
    }
    return sorted(locations)


def check_model(root: Path, model_path: Path) -> None:
    """Everything that must hold before onnxruntime may open the file.

    Args:
        root: the unpacked submission folder (resolved).
        model_path: the .onnx file inside it.

    Raises:
        SubmissionError: not ONNX; an operator domain outside `ALLOWED_DOMAINS` (a custom operator);
            external data that points outside the submission, through a link, or at a missing file.
            ``reasons`` lists every offending node or tensor (the first few).
    """
    import onnx

    model = _load_graph_only(model_path)
    local = {(f.domain, f.name) for f in model.functions}  # model-local functions expand to their bodies
    local_domains = {d for d, _ in local}
    problems = []
    for imp in model.opset_import:
        if imp.domain not in ALLOWED_DOMAINS and imp.domain not in local_domains:
            problems.append(f"opset import of the custom operator domain {imp.domain!r}")
    graphs = [model.graph] + [f for f in model.functions]
    for node in (n for g in graphs for n in _all_nodes(g)):
        if node.domain not in ALLOWED_DOMAINS and (node.domain, node.op_type) not in local:
            problems.append(
                f"node {node.name or node.op_type!r} uses the custom operator {node.domain}::{node.op_type}"
            )
    if problems:
        raise SubmissionError(
            f"{model_path.name} needs operators onnxruntime does not ship (custom-op libraries are never "
            f"loaded); allowed domains: {sorted(ALLOWED_DOMAINS)}",
            reasons=_dedupe(problems),
        )
    external = [t for t in _all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    for t in external:
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        problem = _external_location_problem(root, model_path.parent, location)
        if problem:
            problems.append(f"tensor {t.name!r}: external data {location!r} {problem}")
    if problems:
        raise SubmissionError(
            f"{model_path.name} reads external data that is missing or outside the submission; refused before loading",
            reasons=_dedupe(problems),
        )


def _external_location_problem(root: Path, base: Path, location: str) -> str | None:
    if not location:
        return "has no location"
    if "\x00" in location or location.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", location):
        return "is an absolute path"
    parts = re.split(r"[\\/]", location)
    if ".." in parts:
        return "climbs out with '..'"
    path = base
    for part in parts:  # no link anywhere on the way, so the file really is inside the submission
        path = path / part
        if path.is_symlink():
            return "goes through a symbolic link"
    if not path.resolve().is_relative_to(root):
        return "resolves outside the submission"
    if not path.is_file():
        return "is not a file in the submission"
    return None


def _dedupe(lines: list[str], keep: int = 8) -> list[str]:
    unique = list(dict.fromkeys(lines))
    return unique[:keep] + ([f"... and {len(unique) - keep} more"] if len(unique) > keep else [])


def _walk_graphs(graph):
    """The graph and every subgraph below it (If/Loop/Scan bodies), iteratively: a hostile model may nest
    deeper than Python's recursion limit."""
    stack = [graph]
    while stack:
        g = stack.pop()
        yield g
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)


def _all_nodes(graph):
    for g in _walk_graphs(graph):
        yield from g.node


def _all_tensors(graph):
    """Every tensor that may carry data: initializers, sparse initializers (values and indices) and
    tensor attributes, in the graph, its subgraphs, and (given a ModelProto) its local functions."""
    roots = [graph]
    if hasattr(graph, "functions"):  # a ModelProto: the main graph and the model-local functions
        roots = [graph.graph, *graph.functions]
    for root in roots:
        for g in _walk_graphs(root):
            yield from getattr(g, "initializer", ())
            for sparse in getattr(g, "sparse_initializer", ()):
                yield sparse.values
                yield sparse.indices
            for node in g.node:
                for attr in node.attribute:
                    if attr.HasField("t"):
                        yield attr.t
                    yield from attr.tensors
                    if attr.HasField("sparse_tensor"):
                        yield attr.sparse_tensor.values
                        yield attr.sparse_tensor.indices
                    for sparse in attr.sparse_tensors:
                        yield sparse.values
                        yield sparse.indices
