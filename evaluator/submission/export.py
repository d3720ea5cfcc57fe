"""Turn an XARES-LLM-style torch ``*Encoder`` into the ONNX file of the contract, and inspect ONNX files.

The encoder style (the reference framework's): a ``torch.nn.Module`` subclass whose name ends in
``Encoder``, constructible without arguments, with an ``output_dim`` attribute and
``forward(audio [B, S] float32, audio_attention_mask [B, S] int64 or None) -> (features [B, T, D],
frame mask [B, T] or None)``.

Export runs in eval mode with dynamic batch and time axes, first with torch's dynamo exporter, then
with the TorchScript exporter if that fails (an encoder holding TorchScript modules goes straight to
``torch.jit.script`` + the TorchScript exporter, the only path that can read them). The ONNX outputs are
then compared with torch's on the same audio. A model whose float32 weights pass `EXTERNAL_DATA_BYTES`
keeps them in ``<model>.data`` beside the ``.onnx`` file (protobuf caps one file at 2 GB); on request
the weights are stored as float16, each followed by a Cast so the computation stays float32.

Memory, for W bytes of float32 weights: the torch model and the exporter's folded copies (up to 2W)
while exporting; the torch weights are then freed before onnxruntime loads the model for the check
(about 1.5W plus activations): about 1.9W at the peak, e.g. 4.4 GiB for a Whisper-large-shaped encoder
(W = 2.37 GiB), 6.8 GiB with the probe's worker (docs/benchmarks.md).

Example::

    result = export_encoder(Path("my_encoder/encoder.py"), Path("out/model.onnx"), weights_dtype="float16")
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import importlib.util
import inspect
import io
import itertools
import logging
import os
import re
import sys
import sysconfig
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluator.errors import SubmissionError, first_line
from evaluator.sandbox.onnx_runtime import error_line
from evaluator.submission.manifest import SAMPLE_RATE, OnnxSpec
from evaluator.submission.provenance import imported_files, record_reads, used_files

log = logging.getLogger(__name__)

OPSET = 18
AUDIO_INPUT, MASK_INPUT = "audio", "audio_attention_mask"
FEATURES_OUTPUT, MASK_OUTPUT = "features", "feature_attention_mask"
CHECK_SECONDS = (1.0, 0.7)  # the torch-vs-ONNX check batch (padded)
EXPORT_RTOL = 1e-3  # ONNX vs torch, relative to the largest |feature|
# weights
WEIGHTS_DTYPES = ("float32", "float16")
EXTERNAL_DATA_BYTES = 3 << 29  # 1.5 GiB of initializers (torch's own threshold): more go to <model>.data
FP16_MIN_ELEMENTS = 1024  # float32 weights at least this big are stored as float16 on request
FP16_MAX = 65504.0  # largest finite float16; a weight beyond it stays float32
WAYS_OUT = (
    "ways out: rewrite that part in plain torch operations (no numpy, no Python branches on tensor values, "
    "no TorchScript), or export the ONNX yourself and build it with `--source onnx` (model.onnx + "
    "manifest.json), or package the encoder as a container (`xares-submit init DIR --kind container`)"
)


@dataclass(frozen=True)
class ExportResult:
    class_name: str
    output_dim: int
    onnx: OnnxSpec  # I/O names of the written model
    exporter: str  # "dynamo" | "torchscript" | "torchscript-script" (torch.jit.script first)
    max_rel_diff: float | None  # ONNX vs torch on the check batch (None: not comparable)
    reasons: tuple[str, ...]  # problems found; the build refuses when there are any
    weights_dtype: str = "float32"  # how the weights are stored in the file
    weights_bytes: int = 0  # initializer bytes as written
    external_data: tuple[str, ...] = ()  # files beside the model holding its weights
    rounding_rel_diff: float | None = None  # float16 weights: torch features, rounded vs float32 weights
    source_files: tuple[str, ...] = ()  # files of the folder the export imported or read (relative)


def load_encoder(path: Path):
    """Import ``encoder.py`` and instantiate its single ``*Encoder`` class in eval mode, frozen.

    Raises:
        SubmissionError: import fails, zero or several ``*Encoder`` classes, the constructor fails,
            or ``output_dim`` is missing or not a positive int.
    """
    import torch

    path = Path(path).resolve()
    name = f"xares_submission_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SubmissionError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # let encoder.py import its sibling modules
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise SubmissionError(f"importing {path.name} failed: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(str(path.parent))
        sys.modules.pop(name, None)
    classes = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, torch.nn.Module)
        and obj.__name__.endswith("Encoder")
        and obj.__module__ == name
    ]
    if len(classes) != 1:
        found = ", ".join(c.__name__ for c in classes) or "none"
        raise SubmissionError(
            f"{path.name} must define exactly one torch.nn.Module subclass named '*Encoder' (found: {found})"
        )
    cls = classes[0]
    try:
        encoder = cls()
    except Exception as e:
        raise SubmissionError(
            f"{cls.__name__}() failed (it must be constructible without arguments): {e}"
        ) from e
    dim = getattr(encoder, "output_dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise SubmissionError(f"{cls.__name__}.output_dim must be a positive int (got {dim!r})")
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def check_batch(seconds=CHECK_SECONDS, seed: int = 1):
    """A padded batch of noise clips: (audio [B, S] float32, mask [B, S] int64)."""
    lengths = [int(s * SAMPLE_RATE) for s in seconds]
    rng = np.random.default_rng(seed)
    audio = np.zeros((len(lengths), max(lengths)), np.float32)
    for i, n in enumerate(lengths):
        audio[i, :n] = 0.1 * rng.standard_normal(n)
    mask = (np.arange(audio.shape[1])[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return audio, mask


def _call(encoder, audio: np.ndarray, mask: np.ndarray):
    """Run the torch encoder; returns (features ndarray, mask ndarray or None)."""
    import torch

    name = type(encoder).__name__
    try:
        with torch.no_grad():
            result = encoder(torch.from_numpy(audio), torch.from_numpy(mask))
    except Exception as e:
        raise SubmissionError(f"{name}.forward raised {type(e).__name__}: {e}") from e
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise SubmissionError(
            f"{name}.forward must return (features, mask or None); got {type(result).__name__}"
        )
    feats, fmask = result
    if not isinstance(feats, torch.Tensor) or (fmask is not None and not isinstance(fmask, torch.Tensor)):
        raise SubmissionError(f"{name}.forward must return tensors (features, mask or None)")
    return feats.float().numpy(), (None if fmask is None else fmask.numpy())


def _wrap(encoder, with_mask: bool):
    """The module torch.onnx sees: fixed input names and only the non-None outputs."""
    import torch

    class ContractWrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, audio, audio_attention_mask):
            feats, fmask = self.encoder(audio, audio_attention_mask)
            return (feats, fmask) if with_mask else (feats,)

    return ContractWrapper().eval()


def _scripted(encoder, with_mask: bool):
    """``torch.jit.script`` of the contract wrapper: the one way the TorchScript exporter reads
    modules that are already TorchScript (tracing refuses to call them)."""
    import torch

    class FeaturesAndMask(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, audio, audio_attention_mask):
            feats, fmask = self.encoder(audio, audio_attention_mask)
            assert fmask is not None
            return feats, fmask

    class FeaturesOnly(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, audio, audio_attention_mask):
            feats, _ = self.encoder(audio, audio_attention_mask)
            return feats

    return torch.jit.script((FeaturesAndMask if with_mask else FeaturesOnly)(encoder).eval())


def script_modules(encoder) -> list[str]:
    """The TorchScript parts of ``encoder`` (``torch.jit.load``/``script`` modules and functions), as
    "attribute (type)" lines; torch.export cannot trace into any of them."""
    import torch

    found: list[str] = []
    for name, module in encoder.named_modules():
        if any(name.startswith(f.split(" ")[0] + ".") for f in found):
            continue  # inside a TorchScript module already listed
        if isinstance(module, torch.jit.ScriptModule):
            found.append(f"{name} ({getattr(module, 'original_name', type(module).__name__)})")
            continue
        for attr, value in vars(module).items():
            if isinstance(value, torch.jit.ScriptFunction):
                found.append(f"{name + '.' if name else ''}{attr} (a scripted function)")
    return found


# -- exporting ---------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PREAMBLES = (  # torch.onnx's wrappers: what failed is in the exception they chain or summarise
    "Failed to export the model with torch.export",
    "Failed to convert the exported program",
    "Failed to decompose the FX graph",
    "Failed to serialize",
)


def root_cause(e: BaseException, limit: int = 300) -> str:
    """The innermost informative line of an exception chain, with its type: "Type: message".

    torch.onnx wraps the real error in a multi-line preamble ("Failed to export the model with
    torch.export. This is step 1/3 ..."); the cause is the chained exception or the preamble's
    "Exception summary".
    """
    chain: list[BaseException] = []
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    for exc in reversed(chain):
        text = _ANSI.sub("", str(exc))
        kind = type(exc).__name__
        if "## Exception summary" in text:
            text = text.split("## Exception summary", 1)[1]
            m = re.match(r"\s*<class '(?:[\w.]+\.)?(\w+)'>:\s*", text)
            if m:
                kind, text = m.group(1), text[m.end() :]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines and not lines[0].startswith(_PREAMBLES):
            line = f"{kind}: " + re.split(r"\s+\[Caused by ", lines[0])[0]  # not the graph dump after it
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return first_line(chain[0], limit)


def _export(encoder, with_mask, audio, mask, output_names, scripts: list[str]):
    """Export with the exporters that can read this encoder.

    Returns:
        (exporter, onnx_ir Model, temporary folder to keep until the model is saved).

    Raises:
        SubmissionError: every exporter failed; one root-cause line each, then the ways out.
    """
    attempts = (
        [("torchscript-script", _export_scripted)]
        if scripts
        else [
            ("dynamo", _export_dynamo),
            ("torchscript", _export_traced),
        ]
    )
    labels = {
        "dynamo": "dynamo exporter",
        "torchscript": "TorchScript exporter",
        "torchscript-script": "torch.jit.script + TorchScript exporter",
    }
    errors = []
    for exporter, attempt in attempts:
        tmp = tempfile.TemporaryDirectory(prefix="xares-export-")
        try:
            with _quiet():
                model = attempt(encoder, with_mask, audio, mask, output_names, Path(tmp.name))
        except Exception as e:  # the exporters raise many unrelated types
            tmp.cleanup()
            errors.append(f"{labels[exporter]}: {root_cause(e)}")
            log.info("%s failed", labels[exporter], exc_info=True)
            continue
        fixed = _fixed_input_axes(model) if exporter == "dynamo" else {}
        if not fixed:
            return exporter, model, tmp
        # A Python int taken from a shape (len(audio), .item()) silently specialises the graph.
        tmp.cleanup()
        errors.append(
            f"{labels[exporter]}: fixed input shapes {fixed} (len(), .item() or .tolist() on a shape?)"
        )
        log.info("dynamo export fixed the input shapes %s, trying the TorchScript exporter", fixed)
    if scripts:
        errors.insert(
            0,
            "TorchScript modules (torch.jit.load/script) cannot be exported by torch.export: "
            f"{', '.join(scripts)}; build them from their Python source instead (e.g. load the weights "
            "into the original nn.Module class)",
        )
    raise SubmissionError(
        f"torch.onnx could not export {type(encoder).__name__}", reasons=[*errors, WAYS_OUT]
    )


def _export_dynamo(encoder, with_mask, audio, mask, output_names, tmp: Path):
    import torch

    batch = torch.export.Dim("batch")
    samples = torch.export.Dim("samples", min=2, max=3600 * SAMPLE_RATE)
    program = torch.onnx.export(
        _wrap(encoder, with_mask),
        (torch.from_numpy(audio), torch.from_numpy(mask)),
        None,  # kept in memory: the weights are written once, by _save
        dynamo=True,
        opset_version=OPSET,
        input_names=[AUDIO_INPUT, MASK_INPUT],
        output_names=output_names,
        dynamic_shapes={
            "audio": {0: batch, 1: samples},
            "audio_attention_mask": {0: batch, 1: samples},
        },
    )
    return program.model


def _export_traced(encoder, with_mask, audio, mask, output_names, tmp: Path):
    return _export_torchscript(_wrap(encoder, with_mask), audio, mask, output_names, tmp)


def _export_scripted(encoder, with_mask, audio, mask, output_names, tmp: Path):
    return _export_torchscript(_scripted(encoder, with_mask), audio, mask, output_names, tmp)


def _export_torchscript(module, audio, mask, output_names, tmp: Path):
    import onnx_ir as ir
    import torch

    axes = {AUDIO_INPUT: {0: "batch", 1: "samples"}, MASK_INPUT: {0: "batch", 1: "samples"}}
    axes.update({n: {0: "batch", 1: "frames"} for n in output_names})
    path = tmp / "model.onnx"  # over 2 GB, torch writes the weights as files beside it
    with _native_stdout_silenced():  # the TorchScript exporter logs whole graphs from C++
        torch.onnx.export(
            module,
            (torch.from_numpy(audio), torch.from_numpy(mask)),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=[AUDIO_INPUT, MASK_INPUT],
            output_names=output_names,
            dynamic_axes=axes,
        )
    return ir.load(path)


@contextlib.contextmanager
def _native_stdout_silenced():
    """Point file descriptor 1 at /dev/null: torch's ONNX log (always on in torch 2.13, see
    ``setup_onnx_logging``) prints through C++ std::cout, which ``redirect_stdout`` cannot reach."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _fixed_input_axes(model) -> dict[str, list]:
    """Inputs whose batch or time axis came out as a fixed number instead of a symbol."""
    fixed = {}
    for value in model.graph.inputs:
        dims = list(value.shape) if value.shape is not None else []
        if any(isinstance(d, int) for d in dims):
            fixed[value.name] = [d if isinstance(d, int) else str(d) for d in dims]
    return fixed


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' chatter (progress prints, warnings about unrelated packages)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- weights -----------------------------------------------------------------------------------------


def _round_to_float16(encoder) -> int:
    """Round the encoder's big float32 weights to float16 values in place (they stay float32), so
    torch computes with exactly the weights the ONNX file will hold; returns how many tensors."""
    import torch

    count = 0
    with torch.no_grad():
        for t in itertools.chain(encoder.parameters(), encoder.buffers()):
            if t.dtype == torch.float32 and t.numel() >= FP16_MIN_ELEMENTS and t.abs().max() <= FP16_MAX:
                t.copy_(t.half().float())
                count += 1
    return count


def _store_float16(model) -> int:
    """Store every float32 initializer of `FP16_MIN_ELEMENTS` or more whose values float16 holds
    exactly as float16, followed by a Cast to float32: the file halves, the computation does not
    change (onnxruntime's CPU provider has few float16 kernels). Returns how many were converted."""
    import onnx_ir as ir

    graph = model.graph
    first = next(iter(graph), None)
    casts = []
    owners = collections.Counter(id(_torch_raw(v.const_value)) for v in graph.initializers.values())
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size < FP16_MIN_ELEMENTS:
            continue
        array = tensor.numpy()
        half = array.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), array):
            continue  # not representable (or NaN): keep float32
        raw = _torch_raw(tensor)
        if raw is not None and owners[id(raw)] == 1:  # the torch copy goes now: peak W + W/2, not 2W
            del array
            _empty(raw)
        stored = ir.Value(
            name=f"{name}.float16",
            shape=ir.Shape(half.shape),
            type=ir.TensorType(ir.DataType.FLOAT16),
            const_value=ir.tensor(half, name=f"{name}.float16"),
        )
        graph.register_initializer(stored)
        cast = ir.Node("", "Cast", [stored], [ir.AttrInt64("to", ir.DataType.FLOAT)], name=f"{name}.cast")
        out = cast.outputs[0]
        out.shape, out.type = value.shape, value.type
        graph.initializers.pop(name)
        ir.convenience.replace_all_uses_with(value, out)
        if value in graph.outputs:
            graph.outputs[graph.outputs.index(value)] = out
        out.name = name
        casts.append(cast)
    if casts:
        if first is not None:
            graph.insert_before(first, casts)
        else:
            graph.extend(casts)
    return len(casts)


def _empty(t) -> None:
    """Free a torch tensor's memory in place, for every tensor sharing it (parameters, their views)."""
    import torch

    try:
        t.untyped_storage().resize_(0)
    except RuntimeError:  # storage borrowed from numpy cannot be resized
        t.data = torch.empty(0, dtype=t.dtype)


def _torch_raw(tensor):
    """The torch tensor behind a dynamo-exported initializer, or None."""
    import torch

    raw = getattr(tensor, "raw", None)
    return raw if isinstance(raw, torch.Tensor) else None


def _weights_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _save(model, out: Path, external: bool) -> tuple[int, tuple[str, ...]]:
    """Write ``model`` to ``out``, with the weights in ``<out>.data`` when ``external``.

    Returns:
        (initializer bytes, external data files relative to ``out``'s folder).
    """
    import onnx_ir as ir

    size = _weights_bytes(model)
    data = out.with_name(out.name + ".data")
    out.unlink(missing_ok=True)
    data.unlink(missing_ok=True)
    if external:
        ir.save(model, out, external_data=data.name)  # a relative location: check_model's rule
        return size, (data.name,)
    ir.save(model, out)
    return size, ()


def _release(model) -> None:
    """Drop the written model's weights (the exporter's graph wraps the torch parameters)."""
    for value in model.graph.initializers.values():
        value.const_value = None
    model.graph.initializers.clear()


def _free_weights(encoder) -> None:
    """Empty every parameter and buffer in place. Deleting the encoder is not enough: onnxscript's
    rewrite rules keep the last graph they matched alive at module level (onnxscript 0.7), and with
    it every parameter, which would hold W bytes through the probe."""
    import torch

    with torch.no_grad():
        for t in itertools.chain(encoder.parameters(), encoder.buffers()):
            _empty(t)


# -- the whole export --------------------------------------------------------------------------------


@contextlib.contextmanager
def _submission_imports(folder: Path):
    """Let the folder's modules be imported for the whole export, and forget them afterwards, so
    the next build's sibling of the same name (``model.py``, ``utils.py``) is imported afresh.

    A module of the same name loaded from another folder is set aside meanwhile; installed packages
    and xares-eval's own modules never are (a ``torch.py`` beside encoder.py cannot unload torch).
    """
    folder = Path(folder).resolve()
    local = {p.stem for p in folder.glob("*.py")} | {p.parent.name for p in folder.glob("*/__init__.py")}
    before = set(sys.modules)
    shadowed = {
        n: m for n, m in list(sys.modules.items()) if n.split(".")[0] in local and _foreign(m, folder)
    }
    for name in shadowed:
        del sys.modules[name]
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        new = [n for n in set(sys.modules) - before if n.split(".")[0] in local]  # also half-imported ones
        for name in [*imported_files(folder), *new]:
            sys.modules.pop(name, None)
        sys.modules.update(shadowed)


_OWN = (str(Path(__file__).resolve().parents[1]) + os.sep,)  # the evaluator package
_INSTALLED = tuple(
    {
        os.path.abspath(sysconfig.get_paths()[k]) + os.sep
        for k in ("stdlib", "platstdlib", "purelib", "platlib")
    }
)


def _foreign(module, folder: Path) -> bool:
    """A module loaded from a file that is neither installed, nor ours, nor in ``folder``."""
    file = getattr(module, "__file__", None)
    if not isinstance(file, str):
        return False
    file = os.path.abspath(file)
    return not file.startswith((*_INSTALLED, *_OWN, str(folder) + os.sep))


def export_encoder(
    encoder_py: Path,
    out: Path,
    *,
    weights_dtype: str = "float32",
    external_data_bytes: int | None = None,
) -> ExportResult:
    """Export ``encoder_py``'s ``*Encoder`` to ``out`` and check it against torch.

    Args:
        encoder_py: the participant's ``encoder.py``.
        out: where to write the ``.onnx`` file (weights past the threshold go to ``<out>.data``).
        weights_dtype: "float32", or "float16" to store the weights as float16 (computation stays
            float32; torch is compared with the same rounded weights).
        external_data_bytes: float32 weight bytes above which the weights go to external data (also when stored as float16)
            (default `EXTERNAL_DATA_BYTES`).

    Returns:
        An `ExportResult`; non-fatal problems (non-determinism, ONNX differing from torch) are in
        ``reasons`` so the build can report them together with the probe's.

    Raises:
        SubmissionError: the encoder cannot be imported, built, run or exported (with the root cause
            of each exporter's failure and the ways out), or ``weights_dtype`` is unknown.
    """
    if weights_dtype not in WEIGHTS_DTYPES:
        raise SubmissionError(f"weights_dtype must be one of {list(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    limit = EXTERNAL_DATA_BYTES if external_data_bytes is None else external_data_bytes
    encoder_py, out = Path(encoder_py).resolve(), Path(out)
    folder = encoder_py.parent
    with record_reads(folder) as reads, _submission_imports(folder):
        try:
            traced = _export_checked(encoder_py, out, weights_dtype, limit)
        finally:
            sources = used_files(folder, reads, main=encoder_py.name)
    try:
        return _compare(traced, out, source_files=tuple(sources))
    finally:
        _return_freed_memory()  # onnxruntime's session, before the probe starts its own


def _return_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system: glibc keeps what the exporter and
    onnxruntime freed (about 1.5x the weights) in the process, where it would sit through the probe."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc only; elsewhere nothing to do


@dataclass
class _Exported:
    """What the export hands to the comparison once the torch model is freed."""

    name: str
    output_dim: int
    exporter: str
    inputs: set
    feats: np.ndarray  # torch's features on the check batch
    fmask: np.ndarray | None
    audio: np.ndarray
    mask: np.ndarray
    reasons: list
    deterministic: bool
    weights_dtype: str
    weights_bytes: int
    external: tuple
    rounding: float | None


def _export_checked(encoder_py: Path, out: Path, weights_dtype: str, limit: int) -> _Exported:
    encoder = load_encoder(encoder_py)
    name = type(encoder).__name__
    audio, mask = check_batch()
    rounding = None
    if weights_dtype == "float16":
        reference, _ = _call(encoder, audio, mask)
        _round_to_float16(encoder)
    feats1, fmask1 = _call(encoder, audio, mask)
    feats2, _ = _call(encoder, audio, mask)
    if weights_dtype == "float16" and reference.shape == feats1.shape:
        rounding = _rel_diff(feats1, reference)
    reasons = []
    deterministic = feats1.shape == feats2.shape and np.array_equal(feats1, feats2, equal_nan=True)
    if not deterministic:
        reasons.append(
            f"deterministic: two forward passes of {name} on the same audio differ: remove randomness "
            "(random ops, dropout) from the encoder"
        )
    with_mask = fmask1 is not None
    output_names = [FEATURES_OUTPUT] + ([MASK_OUTPUT] if with_mask else [])
    exporter, model, tmp = _export(encoder, with_mask, audio, mask, output_names, script_modules(encoder))
    try:
        # Decided on the float32 size: a big model keeps its weights beside the graph even as float16,
        # so onnxruntime maps them from the file instead of holding a parsed copy of a 1 GB protobuf.
        big = _weights_bytes(model) > limit
        if weights_dtype == "float16":
            _store_float16(model)
        size, external = _save(model, out, big)
        inputs = {v.name for v in model.graph.inputs}
    finally:
        _release(model)
        del model
        tmp.cleanup()
    dim = int(encoder.output_dim)
    _free_weights(encoder)  # before onnxruntime loads its own copy
    del encoder
    _return_freed_memory()
    return _Exported(
        name,
        dim,
        exporter,
        inputs,
        feats1,
        fmask1,
        audio,
        mask,
        reasons,
        deterministic,
        weights_dtype,
        size,
        external,
        rounding,
    )


def _rel_diff(a: np.ndarray, reference: np.ndarray) -> float:
    """Largest |a - reference| relative to the largest |reference|."""
    if not reference.size:
        return 0.0
    scale = max(float(np.nanmax(np.abs(reference))), 1e-6)
    return float(np.nanmax(np.abs(a.astype(np.float64) - reference))) / scale


def _compare(x: _Exported, out: Path, *, source_files: tuple[str, ...]) -> ExportResult:
    reasons = list(x.reasons)
    if AUDIO_INPUT not in x.inputs:  # the exporter drops inputs the graph never reads
        raise SubmissionError(
            f"{x.name}'s exported graph does not read the audio (only its shape, as a constant?)",
            reasons=[*reasons, "export: the ONNX model has no audio input"],
        )
    with_mask = x.fmask is not None
    spec = OnnxSpec(
        model=out.name,
        audio_input=AUDIO_INPUT,
        features_output=FEATURES_OUTPUT,
        mask_input=MASK_INPUT if MASK_INPUT in x.inputs else None,
        mask_output=MASK_OUTPUT if with_mask else None,
    )
    diff = None
    if x.deterministic:
        onnx_feats, onnx_mask = run_onnx(out, spec, x.audio, x.mask)
        if onnx_feats.shape != x.feats.shape:
            reasons.append(f"export: ONNX features have shape {onnx_feats.shape}, torch gave {x.feats.shape}")
        else:
            diff = _rel_diff(onnx_feats, x.feats)
            if diff > EXPORT_RTOL:
                reasons.append(
                    f"export: ONNX features differ from torch by {diff:.2g} (relative): an operation is not "
                    "exported faithfully; simplify it or export the ONNX yourself"
                )
            if (
                with_mask
                and onnx_mask is not None
                and not np.array_equal(onnx_mask.astype(bool), x.fmask.astype(bool))
            ):
                reasons.append("export: the ONNX frame mask differs from torch's")
    return ExportResult(
        class_name=x.name,
        output_dim=x.output_dim,
        onnx=spec,
        exporter=x.exporter,
        max_rel_diff=diff,
        reasons=tuple(reasons),
        weights_dtype=x.weights_dtype,
        weights_bytes=x.weights_bytes,
        external_data=x.external,
        rounding_rel_diff=x.rounding,
        source_files=source_files,
    )


# -- ONNX inspection ---------------------------------------------------------------------------------


def _session(model: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # fatal only: failures come back as exceptions
    try:
        return ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise SubmissionError(f"onnxruntime cannot load {model.name}: {error_line(e)}") from e


def inspect_onnx(model: Path, declared: dict | None = None) -> OnnxSpec:
    """The model's I/O names, taking what ``declared`` (the manifest's ``onnx`` object) names and
    guessing the rest: first input audio, second input the sample mask; first output features,
    second output the frame mask.

    Raises:
        SubmissionError: the model cannot be loaded or has more than two inputs or outputs.
    """
    declared = dict(declared or {})
    sess = _session(model)
    inputs = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    odd = not 1 <= len(inputs) <= 2 or not 1 <= len(outputs) <= 2
    if odd and not {"audio_input", "features_output"} <= set(declared):
        raise SubmissionError(
            f"{model.name} has inputs {inputs} and outputs {outputs}; the contract is audio [+ mask] in, "
            "features [+ mask] out: name them in manifest.json's onnx object"
        )
    guess = {
        "audio_input": inputs[0],
        "mask_input": inputs[1] if len(inputs) > 1 else None,
        "features_output": outputs[0],
        "mask_output": outputs[1] if len(outputs) > 1 else None,
    }
    guess.update({k: v for k, v in declared.items() if k != "model"})
    return OnnxSpec(model=declared.get("model", model.name), **guess)


def run_onnx(model: Path, spec: OnnxSpec, audio: np.ndarray, mask: np.ndarray, *, session=None):
    """Run a model once outside any sandbox (build-time only): (features, frame mask or None).

    ``session``: an onnxruntime session of ``model`` to reuse (loading a big model takes seconds).
    """
    sess = session or _session(model)
    feed = {spec.audio_input: audio}
    if spec.mask_input:
        mtype = next(i.type for i in sess.get_inputs() if i.name == spec.mask_input)
        feed[spec.mask_input] = (
            mask.astype(bool)
            if mtype == "tensor(bool)"
            else mask.astype(np.float32 if "float" in mtype else np.int64)
        )
    names = [spec.features_output] + ([spec.mask_output] if spec.mask_output else [])
    try:
        out = sess.run(names, feed)
    except Exception as e:
        raise SubmissionError(f"{model.name} failed on a padded batch: {error_line(e)}") from e
    return out[0], (out[1] if spec.mask_output else None)


def measure_output(model: Path, spec: OnnxSpec, seconds=(2.0, 6.0)) -> tuple[float | None, int, str]:
    """Measure (frame hop in ms, output_dim, output dtype) from two single-clip runs.

    The hop is the slope of frames against samples, so fixed offsets (edge frames) cancel out;
    it is None when the frame count does not grow with the audio.

    Raises:
        SubmissionError: the model fails or its features are not [1, T, D].
    """
    counts, dim, dtype = [], 0, "float32"
    session = _session(model)
    for s in seconds:
        audio, mask = check_batch((s,), seed=2)
        feats, fmask = run_onnx(model, spec, audio, mask, session=session)
        if feats.ndim != 3:
            raise SubmissionError(f"features have shape {feats.shape}; the contract is [B, T, D]")
        counts.append(
            int(fmask.astype(bool).sum())
            if fmask is not None and fmask.shape == feats.shape[:2]
            else feats.shape[1]
        )
        dim, dtype = int(feats.shape[2]), str(feats.dtype)
    if counts[1] <= counts[0]:
        return None, dim, dtype
    hop = (seconds[1] - seconds[0]) * 1000.0 / (counts[1] - counts[0])
    return round(hop, 3), dim, dtype
