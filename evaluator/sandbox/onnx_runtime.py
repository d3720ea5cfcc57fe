"""Run an ONNX encoder submission with onnxruntime, in this process.

The graph is data, not code: onnxruntime only executes its built-in operators, the model must be a
single file (no external data that could point outside the submission), and every call runs under a
wall-clock limit (onnxruntime's ``RunOptions.terminate`` flag, set from a timer thread).

Example::

    with OnnxRuntime(root, manifest, Limits()) as rt:
        feats = rt.encode([np.zeros(16000, np.float32)])   # [[T, D]]
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluator.errors import EnvironmentUnavailable, SandboxError, SubmissionError
from evaluator.sandbox.base import Limits
from evaluator.submission.manifest import SAMPLE_RATE, Manifest

log = logging.getLogger(__name__)

MAX_BATCH_ITEMS = 8  # clips per onnxruntime call
MAX_BATCH_SAMPLES = 8 * 30 * SAMPLE_RATE  # padded samples per call (8 clips of 30 s)
HOP_TOLERANCE_FRAMES = 2  # frames an unmasked output may exceed ceil(len / hop) before it is a contract break
HOP_TOLERANCE_RATIO = 0.02

_ORT_FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
_ORT_MASK_TYPES = {
    "tensor(bool)": np.bool_,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


def cuda_usable() -> bool:
    """True when a CUDA driver with at least one device answers (not merely when the provider is built in)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    try:
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except AttributeError:
        return False


def check_single_file(model_path: Path) -> None:
    """Refuse ONNX files that reference external data (the contract is one self-contained file).

    Raises:
        SubmissionError: the file is not ONNX, or a tensor lives outside it.
    """
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, ... for garbage
        raise SubmissionError(f"{model_path.name} is not a readable ONNX model: {e}") from e
    external = [t.name for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise SubmissionError(
            f"{model_path.name} stores {len(external)} tensor(s) as external data (e.g. {external[0]!r}); "
            "the contract is a single self-contained .onnx file: re-export with external_data=False"
        )


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


class OnnxRuntime:
    """The `Runtime` for ``kind == "onnx"`` submissions (see evaluator/sandbox/base.py)."""

    name = "onnx"

    def __init__(
        self,
        root: Path,
        manifest: Manifest,
        limits: Limits,
        *,
        max_batch_items: int = MAX_BATCH_ITEMS,
        max_batch_samples: int = MAX_BATCH_SAMPLES,
    ):
        """Load the model and check its inputs and outputs against the manifest.

        Args:
            root: the unpacked submission folder.
            manifest: its manifest (kind "onnx").
            limits: resource caps; ``cpus`` sets the thread count, ``wall_seconds`` bounds each call,
                ``gpu`` asks for CUDA and fails when it is not usable.
            max_batch_items: clips per onnxruntime call.
            max_batch_samples: padded samples (items x longest clip) per call.

        Raises:
            SubmissionError: the model is missing, not ONNX, has external data, or its I/O names or
                types do not match the manifest.
            EnvironmentUnavailable: a GPU was asked for but none is usable.
        """
        import onnxruntime as ort

        if manifest.kind != "onnx" or manifest.onnx is None:
            raise SubmissionError(
                f"manifest kind is {manifest.kind!r}; OnnxRuntime runs only 'onnx' submissions"
            )
        self.manifest = manifest
        self.limits = limits
        self.spec = manifest.onnx
        self.max_batch_items = max_batch_items
        self.max_batch_samples = max_batch_samples
        self.calls = 0
        self._hop_samples = manifest.frame_hop_ms * SAMPLE_RATE / 1000.0
        self._out_dtype = np.dtype(manifest.output_dtype)

        root = Path(root).resolve()
        model_path = (root / self.spec.model).resolve()
        if not model_path.is_relative_to(root):
            raise SubmissionError(f"onnx.model {self.spec.model!r} points outside the submission")
        if not model_path.is_file():
            raise SubmissionError(f"onnx.model {self.spec.model!r} is not a file in the submission")
        check_single_file(model_path)

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(limits.cpus))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 4  # fatal only: failures come back as exceptions, reported once
        providers = ["CPUExecutionProvider"]
        if limits.gpu:
            if not cuda_usable():
                raise EnvironmentUnavailable(
                    "a GPU was requested (Limits.gpu) but no usable CUDA device was found"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise SubmissionError(f"onnxruntime cannot load {self.spec.model}: {error_line(e)}") from e
        first = self._session.get_providers()[0]
        if limits.gpu and first != "CUDAExecutionProvider":
            raise EnvironmentUnavailable(f"a GPU was requested but onnxruntime fell back to {first}")
        self.device = "cuda" if first == "CUDAExecutionProvider" else "cpu"
        self.isolation = (
            f"in-process onnxruntime ({first}): built-in operators only, no external data, "
            f"{opts.intra_op_num_threads} thread(s), {limits.wall_seconds:g} s wall clock per call; "
            "memory and CPU time are not capped"
        )
        self._check_io()

    # -- setup -------------------------------------------------------------------------------------

    def _check_io(self) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        problems = []
        wanted_in = [self.spec.audio_input] + ([self.spec.mask_input] if self.spec.mask_input else [])
        for name in wanted_in:
            if name not in inputs:
                problems.append(
                    f"input {name!r} named in the manifest is not in the model (it has {sorted(inputs)})"
                )
        extra = sorted(set(inputs) - set(wanted_in))
        if extra:
            problems.append(f"the model needs inputs the manifest does not name: {extra}")
        audio = inputs.get(self.spec.audio_input)
        if audio is not None and audio.type != "tensor(float)":
            problems.append(f"audio input {audio.name!r} is {audio.type}; the contract feeds float32 [B, S]")
        if audio is not None and len(audio.shape) != 2:
            problems.append(f"audio input {audio.name!r} has rank {len(audio.shape)}; the contract is [B, S]")
        mask = inputs.get(self.spec.mask_input) if self.spec.mask_input else None
        if mask is not None and mask.type not in _ORT_MASK_TYPES:
            problems.append(f"mask input {mask.name!r} is {mask.type}; use bool, int64 or float")
        for name in (self.spec.features_output, self.spec.mask_output):
            if name and name not in outputs:
                problems.append(
                    f"output {name!r} named in the manifest is not in the model (it has {sorted(outputs)})"
                )
        feats = outputs.get(self.spec.features_output)
        if feats is not None and feats.type in _ORT_FLOAT_TYPES:
            got = np.dtype(_ORT_FLOAT_TYPES[feats.type])
            if got != self._out_dtype:
                problems.append(
                    f"features output is {got.name} but manifest output_dtype is {self._out_dtype.name}: "
                    "fix one of them"
                )
        elif feats is not None:
            problems.append(
                f"features output {feats.name!r} is {feats.type}; the contract is float32 or float16"
            )
        if problems:
            raise SubmissionError("the ONNX model does not match its manifest", reasons=problems)
        self._mask_dtype = _ORT_MASK_TYPES[mask.type] if mask is not None else None

    # -- encoding ----------------------------------------------------------------------------------

    def encode(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Encode clips (1-D float32 16 kHz arrays); see `Runtime.encode`.

        Clips are sorted by length and cut into chunks so that little padding is computed; a clip of
        zero samples gets a [0, D] array without calling the encoder.
        """
        clips = [np.asarray(w, dtype=np.float32) for w in waves]
        for i, c in enumerate(clips):
            if c.ndim != 1:
                raise ValueError(f"clip {i} has shape {c.shape}; encode() takes 1-D mono audio")
        self.calls += len(clips)
        out: list[np.ndarray | None] = [None] * len(clips)
        order = sorted((i for i, c in enumerate(clips) if c.size), key=lambda i: clips[i].size)
        for i, c in enumerate(clips):
            if c.size == 0:
                out[i] = np.zeros((0, self.manifest.output_dim), np.float32)
        for chunk in self._chunks(order, clips):
            for i, feats in zip(chunk, self._run_batch([clips[i] for i in chunk])):
                out[i] = feats
        return out  # type: ignore[return-value]

    def _chunks(self, order: list[int], clips: list[np.ndarray]):
        chunk: list[int] = []
        for i in order:  # ascending length: the newest clip is the longest of its chunk
            n = len(chunk) + 1
            if chunk and (n > self.max_batch_items or n * clips[i].size > self.max_batch_samples):
                yield chunk
                chunk = []
            chunk.append(i)
        if chunk:
            yield chunk

    def _run_batch(self, clips: list[np.ndarray]) -> list[np.ndarray]:
        lengths = np.array([c.size for c in clips])
        batch = np.zeros((len(clips), int(lengths.max())), np.float32)  # [B, S], zero padding
        for i, c in enumerate(clips):
            batch[i, : c.size] = c
        feed = {self.spec.audio_input: batch}
        if self.spec.mask_input:
            mask = np.arange(batch.shape[1])[None, :] < lengths[:, None]  # [B, S]
            feed[self.spec.mask_input] = mask.astype(self._mask_dtype)
        names = [self.spec.features_output] + ([self.spec.mask_output] if self.spec.mask_output else [])
        results = self._run(names, feed, seconds=lengths.sum() / SAMPLE_RATE)
        feats = results[0]
        frame_mask = results[1] if self.spec.mask_output else None
        return self._split(feats, frame_mask, lengths)

    def _run(self, names: list[str], feed: dict, *, seconds: float) -> list[np.ndarray]:
        import onnxruntime as ort

        run_options = ort.RunOptions()
        run_options.log_severity_level = 4
        timed_out = threading.Event()

        def stop():
            timed_out.set()
            run_options.terminate = True

        timer = threading.Timer(self.limits.wall_seconds, stop)
        timer.daemon = True
        timer.start()
        try:
            return self._session.run(names, feed, run_options)
        except Exception as e:  # onnxruntime's RuntimeException/Fail/InvalidArgument
            if timed_out.is_set():
                raise SandboxError(
                    f"the encoder ran past the {self.limits.wall_seconds:g} s wall-clock limit on a batch of "
                    f"{len(next(iter(feed.values())))} clip(s) ({seconds:.1f} s of audio)"
                ) from e
            raise SandboxError(
                f"the encoder failed on a batch of {seconds:.1f} s of audio: {error_line(e)}"
            ) from e
        finally:
            timer.cancel()

    def _split(
        self, feats: np.ndarray, frame_mask: np.ndarray | None, lengths: np.ndarray
    ) -> list[np.ndarray]:
        b = len(lengths)
        if not isinstance(feats, np.ndarray) or feats.ndim != 3:
            shape = getattr(feats, "shape", None)
            raise SandboxError(f"features output has shape {shape}; the contract is [B, T, D] (rank 3)")
        if feats.shape[0] != b:
            raise SandboxError(f"features output has batch size {feats.shape[0]} for {b} input clip(s)")
        if feats.dtype != self._out_dtype:
            raise SandboxError(f"features are {feats.dtype}; manifest output_dtype is {self._out_dtype.name}")
        t, d = feats.shape[1], feats.shape[2]
        if d != self.manifest.output_dim:
            raise SandboxError(f"features have D={d}; manifest output_dim is {self.manifest.output_dim}")
        if frame_mask is not None:
            if frame_mask.ndim != 2 or frame_mask.shape[0] != b:
                raise SandboxError(
                    f"frame mask has shape {frame_mask.shape}; the contract is [B, T] = [{b}, {t}]"
                )
            if frame_mask.shape[1] != t:
                raise SandboxError(
                    f"frame mask length {frame_mask.shape[1]} != T = {t} frames of the features "
                    "(a mask over samples was returned instead of one over frames?)"
                )
            keep = frame_mask.astype(bool)
            return [feats[i][keep[i]].astype(np.float32) for i in range(b)]
        expected = np.ceil(lengths / self._hop_samples).astype(int)
        longest = int(expected.max())
        if t > longest + max(HOP_TOLERANCE_FRAMES, HOP_TOLERANCE_RATIO * longest):
            raise SandboxError(
                f"the encoder returned {t} frames for a clip of {lengths.max() / SAMPLE_RATE:.2f} s, but "
                f"frame_hop_ms={self.manifest.frame_hop_ms:g} implies about {longest}; fix frame_hop_ms "
                "or return a frame mask"
            )
        return [feats[i, : min(t, int(expected[i]))].astype(np.float32) for i in range(b)]

    # -- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._session = None

    def __enter__(self) -> OnnxRuntime:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def error_line(e: BaseException, limit: int = 300) -> str:
    """The informative part of an onnxruntime error, on one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    node = re.search(r"running (\w+) node\..*?Status Message: (.*)", text)
    if node:  # drop onnxruntime's source location and C++ signature, keep the op and the message
        text = f"{node.group(1)} node failed: " + re.sub(r"^.*? was false\. ", "", node.group(2))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expected_frames(n_samples: int, frame_hop_ms: float) -> int:
    """Frames an encoder with this hop should return for a clip: ceil(samples / hop)."""
    return math.ceil(n_samples / (frame_hop_ms * SAMPLE_RATE / 1000.0))
