"""Turn an XARES-LLM-style torch ``*Encoder`` into the ONNX file of the contract, and inspect ONNX files.

The encoder style (the reference framework's): a ``torch.nn.Module`` subclass whose name ends in
``Encoder``, constructible without arguments, with an ``output_dim`` attribute and
``forward(audio [B, S] float32, audio_attention_mask [B, S] int64 or None) -> (features [B, T, D],
frame mask [B, T] or None)``.

Export runs in eval mode with dynamic batch and time axes into one self-contained file, first with
torch's dynamo exporter, then with the TorchScript exporter if that fails, and the ONNX outputs are
compared with torch's on the same audio.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import sys
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluator.errors import SubmissionError, first_line
from evaluator.sandbox.onnx_runtime import error_line
from evaluator.submission.manifest import SAMPLE_RATE, OnnxSpec

log = logging.getLogger(__name__)

OPSET = 18
AUDIO_INPUT, MASK_INPUT = "audio", "audio_attention_mask"
FEATURES_OUTPUT, MASK_OUTPUT = "features", "feature_attention_mask"
CHECK_SECONDS = (1.0, 0.7)  # the torch-vs-ONNX check batch (padded)
EXPORT_RTOL = 1e-3  # ONNX vs torch, relative to the largest |feature|


@dataclass(frozen=True)
class ExportResult:
    class_name: str
    output_dim: int
    onnx: OnnxSpec  # I/O names of the written model
    exporter: str  # "dynamo" | "torchscript"
    max_rel_diff: float | None  # ONNX vs torch on the check batch (None: not comparable)
    reasons: tuple[str, ...]  # problems found; the build refuses when there are any


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


def _export(wrapper, audio, mask, out: Path, output_names: list[str]) -> str:
    import torch

    args = (torch.from_numpy(audio), torch.from_numpy(mask))
    errors = []
    with _quiet():
        try:
            batch, samples = (
                torch.export.Dim("batch"),
                torch.export.Dim("samples", min=2, max=3600 * SAMPLE_RATE),
            )
            torch.onnx.export(
                wrapper,
                args,
                str(out),
                dynamo=True,
                external_data=False,
                opset_version=OPSET,
                input_names=[AUDIO_INPUT, MASK_INPUT],
                output_names=output_names,
                dynamic_shapes={
                    "audio": {0: batch, 1: samples},
                    "audio_attention_mask": {0: batch, 1: samples},
                },
            )
            fixed = _fixed_input_axes(out)
            if not fixed:
                return "dynamo"
            # A Python int taken from a shape (len(audio), .item()) silently specialises the graph.
            errors.append(f"dynamo exporter: fixed input shapes {fixed}")
            log.info("dynamo export fixed the input shapes %s, trying the TorchScript exporter", fixed)
        except Exception as e:  # the exporters raise many unrelated types
            errors.append(f"dynamo exporter: {first_line(e, 300)}")
            log.info("dynamo export failed, trying the TorchScript exporter", exc_info=True)
        axes = {AUDIO_INPUT: {0: "batch", 1: "samples"}, MASK_INPUT: {0: "batch", 1: "samples"}}
        axes.update({n: {0: "batch", 1: "frames"} for n in output_names})
        try:
            out.unlink(missing_ok=True)
            torch.onnx.export(
                wrapper,
                args,
                str(out),
                dynamo=False,
                opset_version=17,
                input_names=[AUDIO_INPUT, MASK_INPUT],
                output_names=output_names,
                dynamic_axes=axes,
            )
            return "torchscript"
        except Exception as e:  # noqa: BLE001 - as above
            errors.append(f"TorchScript exporter: {first_line(e, 300)}")
    raise SubmissionError("torch.onnx could not export the encoder", reasons=errors)


def _fixed_input_axes(model: Path) -> dict[str, list]:
    """Inputs whose batch or time axis came out as a fixed number instead of a symbol."""
    sess = _session(model)
    return {i.name: list(i.shape) for i in sess.get_inputs() if any(isinstance(d, int) for d in i.shape)}


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



def export_encoder(encoder_py: Path, out: Path) -> ExportResult:
    """Export ``encoder_py``'s ``*Encoder`` to ``out`` (single-file ONNX) and check it against torch.

    Args:
        encoder_py: the participant's ``encoder.py``.
        out: where to write the ``.onnx`` file.

    Returns:
        An `ExportResult`; non-fatal problems (non-determinism, ONNX differing from torch) are in
        ``reasons`` so the build can report them together with the probe's.

    Raises:
        SubmissionError: the encoder cannot be imported, built, run or exported.
    """
    encoder = load_encoder(encoder_py)
    name = type(encoder).__name__
    audio, mask = check_batch()
    feats1, fmask1 = _call(encoder, audio, mask)
    feats2, _ = _call(encoder, audio, mask)
    reasons = []
    deterministic = feats1.shape == feats2.shape and np.array_equal(feats1, feats2, equal_nan=True)
    if not deterministic:
        reasons.append(
            f"deterministic: two forward passes of {name} on the same audio differ: remove randomness "
            "(random ops, dropout) from the encoder"
        )
    with_mask = fmask1 is not None
    output_names = [FEATURES_OUTPUT] + ([MASK_OUTPUT] if with_mask else [])
    exporter = _export(_wrap(encoder, with_mask), audio, mask, Path(out), output_names)
    inputs = {i.name for i in _session(Path(out)).get_inputs()}
    if AUDIO_INPUT not in inputs:  # the exporter drops inputs the graph never reads
        raise SubmissionError(
            f"{name}'s exported graph does not read the audio (only its shape, as a constant?)",
            reasons=[*reasons, "export: the ONNX model has no audio input"],
        )
    spec = OnnxSpec(
        model=Path(out).name,
        audio_input=AUDIO_INPUT,
        features_output=FEATURES_OUTPUT,
        mask_input=MASK_INPUT if MASK_INPUT in inputs else None,
        mask_output=MASK_OUTPUT if with_mask else None,
    )

    diff = None
    if deterministic:
        onnx_feats, onnx_mask = run_onnx(Path(out), spec, audio, mask)
        if onnx_feats.shape != feats1.shape:
            reasons.append(f"export: ONNX features have shape {onnx_feats.shape}, torch gave {feats1.shape}")
        else:
            scale = max(float(np.nanmax(np.abs(feats1))) if feats1.size else 0.0, 1e-6)
            diff = (
                float(np.nanmax(np.abs(onnx_feats.astype(np.float64) - feats1))) / scale
                if feats1.size
                else 0.0
            )
            if diff > EXPORT_RTOL:
                reasons.append(
                    f"export: ONNX features differ from torch by {diff:.2g} (relative): an operation is not "
                    "exported faithfully; simplify it or export the ONNX yourself"
                )
            if (
                with_mask
                and onnx_mask is not None
                and not np.array_equal(onnx_mask.astype(bool), fmask1.astype(bool))
            ):
                reasons.append("export: the ONNX frame mask differs from torch's")
    return ExportResult(
        class_name=name,
        output_dim=int(encoder.output_dim),
        onnx=spec,
        exporter=exporter,
        max_rel_diff=diff,
        reasons=tuple(reasons),
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


def run_onnx(model: Path, spec: OnnxSpec, audio: np.ndarray, mask: np.ndarray):
    """Run a model once outside any sandbox (build-time only): (features, frame mask or None)."""
    sess = _session(model)
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
    for s in seconds:
        audio, mask = check_batch((s,), seed=2)
        feats, fmask = run_onnx(model, spec, audio, mask)
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
