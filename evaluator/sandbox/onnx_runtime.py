"""Run an ONNX encoder submission with onnxruntime in a sandboxed worker process.

Before anything runs, `onnx_checks.check_model` reads the graph as data: built-in operator domains only,
no custom-op library, external data only inside the submission. The session itself lives in the worker
(`onnx_worker`), started once per runtime by `onnx_process` under the strongest isolation the host allows
(bubblewrap, else ``unshare``, else a plain process with a warning; the one in force is spelled out in
``isolation``). The worker caps its own memory, CPU time, processes and file size with rlimits before it
touches the model; the host bounds every call by the wall clock and kills the whole worker on timeout. A
worker that dies is started again on the next call. This module pads clips into batches, checks what comes
back against the contract and trims padding frames.

Example::

    with OnnxRuntime(root, manifest, Limits()) as rt:
        feats = rt.encode([np.zeros(16000, np.float32)])   # [[T, D]]
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluator.cores import QUIET_OPENMP, usable_cpus
from evaluator.errors import EnvironmentUnavailable, SandboxError, SandboxTimeout, SubmissionError
from evaluator.sandbox.base import Limits
from evaluator.sandbox.onnx_checks import check_model
from evaluator.sandbox.onnx_process import (
    MIN_LOAD_SECONDS,
    SANDBOXES,
    SUBMISSION_IN_SANDBOX,
    Worker,
    WorkerDied,
    sandbox_command,
)
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
        sandboxes: Sequence[str] = SANDBOXES,
    ):
        """Check the model, start its worker, and check its inputs and outputs against the manifest.

        Args:
            root: the unpacked submission folder.
            manifest: its manifest (kind "onnx").
            limits: resource caps; ``cpus`` sets the thread count, ``wall_seconds`` bounds each call (and
                the model load, with at least `MIN_LOAD_SECONDS`), ``memory_mb``/``cpu_seconds``/``pids`` become the worker's rlimits,
                ``gpu`` asks for CUDA and fails when it is not usable.
            max_batch_items: clips per onnxruntime call.
            max_batch_samples: padded samples (items x longest clip) per call.
            sandboxes: the isolation kinds to try, in order (`SANDBOXES`); the first that starts is used.

        Raises:
            SubmissionError: the model is missing, not ONNX, uses a custom operator, reads external data outside the submission,
                does not load, or its I/O names or types do not match the manifest.
            EnvironmentUnavailable: a GPU was asked for but none is usable, or no sandbox kind starts.
        """
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
        self.restarts = 0
        # None: frames "fixed", every frame is kept (there is no hop to trim padding frames by)
        self._hop_samples = None if manifest.fixed_frames else manifest.frame_hop_ms * SAMPLE_RATE / 1000.0
        self._out_dtype = np.dtype(manifest.output_dtype)
        self._worker: Worker | None = None
        self._peak_mb: float | None = None

        self.root = Path(root).resolve()
        model_path = (self.root / self.spec.model).resolve()
        if not model_path.is_relative_to(self.root):
            raise SubmissionError(f"onnx.model {self.spec.model!r} points outside the submission")
        if not model_path.is_file():
            raise SubmissionError(f"onnx.model {self.spec.model!r} is not a file in the submission")
        check_model(self.root, model_path)
        self._model_rel = model_path.relative_to(self.root).as_posix()

        # no more threads than the cores we may use: oversubscribed pools spin against each other
        self._threads = max(1, min(int(limits.cpus), usable_cpus()))
        self._providers = ["CPUExecutionProvider"]
        if limits.gpu:
            if not cuda_usable():
                raise EnvironmentUnavailable(
                    "a GPU was requested (Limits.gpu) but no usable CUDA device was found"
                )
            self._providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self._sandboxes = list(sandboxes)
        self._sandbox: str | None = None
        try:
            ready = self._start()
            first = ready["providers"][0]
            if limits.gpu and first != "CUDAExecutionProvider":
                raise EnvironmentUnavailable(f"a GPU was requested but onnxruntime fell back to {first}")
            self.device = "cuda" if first == "CUDAExecutionProvider" else "cpu"
            self._check_io(ready["inputs"], ready["outputs"])
        except BaseException:
            self.close()
            raise
        self.isolation = (
            f"onnxruntime worker process ({first}, {self._threads} thread(s)) under {self._description}; "
            f"rlimits: {limits.memory_mb} MB data, {limits.cpu_seconds} s CPU, {limits.pids} processes, "
            f"no core files; {limits.wall_seconds:g} s wall clock per call; built-in operator domains only, "
            "no custom-op library, external data only inside the submission"
        )

    # -- the worker --------------------------------------------------------------------------------

    def _worker_config(self, model: str) -> dict:
        gpu = self._providers[0] == "CUDAExecutionProvider"
        return {
            "model": model,
            "threads": self._threads,
            "providers": self._providers,
            "memory_mb": self.limits.memory_mb,
            # virtual memory is what onnxruntime reserves up front (thread stacks, arenas): cap it
            # loosely on CPU; CUDA reserves terabytes of address space and cannot run under RLIMIT_AS
            "address_space_mb": None if gpu else 2 * self.limits.memory_mb + 2048,
            "cpu_seconds": self.limits.cpu_seconds,
            "pids": self.limits.pids,
            "fsize_mb": 1,  # the worker writes no files; /tmp is scratch for libraries only
        }

    def _env(self) -> dict:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "OMP_NUM_THREADS": str(self._threads),
            **QUIET_OPENMP,
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        for key in ("CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH"):
            if key in os.environ and self.limits.gpu:
                env[key] = os.environ[key]
        return env

    def _start(self) -> dict:
        """Start a worker under the first sandbox kind that works here; return its "ready" message."""
        tried = []
        kinds = [self._sandbox] if self._sandbox else self._sandboxes
        for kind in kinds:
            command = sandbox_command(kind, root=self.root, gpu=self.limits.gpu)
            if command is None:
                tried.append(f"{kind}: not installed")
                continue
            argv, description = command
            model = (
                f"{SUBMISSION_IN_SANDBOX}/{self._model_rel}"
                if kind.startswith("bwrap")
                else str(self.root / self._model_rel)
            )
            worker = Worker(argv, self._env(), log_bytes=self.limits.log_bytes)
            deadline = time.monotonic() + max(self.limits.wall_seconds, MIN_LOAD_SECONDS)
            try:
                worker.send(self._worker_config(model))
                hello, _ = worker.receive(deadline, max_array_bytes=0)
                if hello.get("event") != "hello":
                    raise WorkerDied(f"unexpected first message {str(hello)[:100]}")
            except (WorkerDied, TimeoutError) as e:
                reason = (
                    worker.exit_reason(limits=self.limits) if not isinstance(e, TimeoutError) else "no answer"
                )
                worker.kill()
                tried.append(f"{kind}: {reason}")
                log.debug("sandbox %s did not start: %s", kind, reason)
                continue
            self._worker, self._sandbox, self._description = worker, kind, description
            if kind == "none":
                log.warning("the ONNX worker runs WITHOUT network isolation: %s", "; ".join(tried))
            return self._await_ready(deadline)
        raise EnvironmentUnavailable("the ONNX worker could not be started under any sandbox", reasons=tried)

    def _await_ready(self, deadline: float) -> dict:
        worker = self._worker
        try:
            ready, _ = worker.receive(deadline, max_array_bytes=0)
        except TimeoutError:
            self.close()
            raise SandboxError(
                f"the model did not load within {max(self.limits.wall_seconds, MIN_LOAD_SECONDS):g} s"
            ) from None
        except WorkerDied:
            reason = worker.exit_reason(limits=self.limits)
            self.close()
            raise SubmissionError(f"onnxruntime died loading {self.spec.model}: {reason}") from None
        if "error" in ready:
            self.close()
            text = error_line(RuntimeError(str(ready["error"])))
            if ready.get("kind") == "memory":
                raise SandboxError(
                    f"loading {self.spec.model} hit the {self.limits.memory_mb} MB memory limit: {text}"
                )
            raise SubmissionError(f"onnxruntime cannot load {self.spec.model}: {text}")
        self._baseline_mb = float(ready.get("rss_mb") or 0.0)
        return ready

    def peak_memory_mb(self) -> float | None:
        """Peak resident memory of the worker above its level once the model was loaded (None before a call)."""
        return self._peak_mb

    # -- setup -------------------------------------------------------------------------------------

    def _check_io(self, model_inputs: list[dict], model_outputs: list[dict]) -> None:
        inputs = {i["name"]: i for i in model_inputs}
        outputs = {o["name"]: o for o in model_outputs}
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
        if audio is not None and audio["type"] != "tensor(float)":
            problems.append(
                f"audio input {audio['name']!r} is {audio['type']}; the contract feeds float32 [B, S]"
            )
        if audio is not None and len(audio["shape"]) != 2:
            problems.append(
                f"audio input {audio['name']!r} has rank {len(audio['shape'])}; the contract is [B, S]"
            )
        mask = inputs.get(self.spec.mask_input) if self.spec.mask_input else None
        if mask is not None and mask["type"] not in _ORT_MASK_TYPES:
            problems.append(f"mask input {mask['name']!r} is {mask['type']}; use bool, int64 or float")
        for name in (self.spec.features_output, self.spec.mask_output):
            if name and name not in outputs:
                problems.append(
                    f"output {name!r} named in the manifest is not in the model (it has {sorted(outputs)})"
                )
        feats = outputs.get(self.spec.features_output)
        if feats is not None and feats["type"] in _ORT_FLOAT_TYPES:
            got = np.dtype(_ORT_FLOAT_TYPES[feats["type"]])
            if got != self._out_dtype:
                problems.append(
                    f"features output is {got.name} but manifest output_dtype is {self._out_dtype.name}: "
                    "fix one of them"
                )
        elif feats is not None:
            problems.append(
                f"features output {feats['name']!r} is {feats['type']}; the contract is float32 or float16"
            )
        if problems:
            raise SubmissionError("the ONNX model does not match its manifest", reasons=problems)
        self._mask_dtype = _ORT_MASK_TYPES[mask["type"]] if mask is not None else None

    # -- encoding ----------------------------------------------------------------------------------

    def encode(self, waves: Sequence[np.ndarray], *, timeout: float | None = None) -> list[np.ndarray]:
        """Encode clips (1-D float32 16 kHz arrays); see `Runtime.encode`.

        Clips are sorted by length and cut into chunks so that little padding is computed; a clip of
        zero samples gets a [0, D] array without calling the encoder.
        """
        clips = [np.asarray(w, dtype=np.float32) for w in waves]
        for i, c in enumerate(clips):
            if c.ndim != 1:
                raise ValueError(f"clip {i} has shape {c.shape}; encode() takes 1-D mono audio")
        self.calls += len(clips)
        end = None if timeout is None else time.monotonic() + timeout  # one budget for every chunk
        out: list[np.ndarray | None] = [None] * len(clips)
        order = sorted((i for i, c in enumerate(clips) if c.size), key=lambda i: clips[i].size)
        for i, c in enumerate(clips):
            if c.size == 0:
                out[i] = np.zeros((0, self.manifest.output_dim), np.float32)
        for chunk in self._chunks(order, clips):
            for i, feats in zip(chunk, self._run_batch([clips[i] for i in chunk], end)):
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

    def _run_batch(self, clips: list[np.ndarray], end: float | None = None) -> list[np.ndarray]:
        lengths = np.array([c.size for c in clips])
        batch = np.zeros((len(clips), int(lengths.max())), np.float32)  # [B, S], zero padding
        for i, c in enumerate(clips):
            batch[i, : c.size] = c
        feed = {self.spec.audio_input: batch}
        if self.spec.mask_input:
            mask = np.arange(batch.shape[1])[None, :] < lengths[:, None]  # [B, S]
            feed[self.spec.mask_input] = mask.astype(self._mask_dtype)
        names = [self.spec.features_output] + ([self.spec.mask_output] if self.spec.mask_output else [])
        results = self._run(names, feed, seconds=lengths.sum() / SAMPLE_RATE, end=end)
        feats = results[0]
        frame_mask = results[1] if self.spec.mask_output else None
        return self._split(feats, frame_mask, lengths)

    def _run(self, names: list[str], feed: dict, *, seconds: float, end: float | None = None) -> list[np.ndarray]:
        """One session.run in the worker, under the wall clock; a dead worker is restarted next call."""
        batch = len(next(iter(feed.values())))
        what = f"a batch of {batch} clip(s) ({seconds:.1f} s of audio)"
        if self._worker is not None and not self._worker.alive():  # nothing of ours runs between calls
            reason = self._worker.exit_reason(limits=self.limits)
            self._drop_worker()
            raise SandboxError(f"the encoder's worker died between calls: {reason}")
        if self._worker is None:  # killed after a timeout or a crash: a fresh one for this call
            self.restarts += 1
            self._await_after_restart()
        worker = self._worker
        deadline = time.monotonic() + self.limits.wall_seconds
        budgeted = end is not None and end < deadline
        if budgeted:
            deadline = end
        try:
            worker.send({"op": "run", "names": names, "feeds": list(feed)}, list(feed.values()))
            reply, arrays = worker.receive(deadline, max_array_bytes=self.limits.output_mb << 20)
        except TimeoutError:
            self._drop_worker()
            limit = "what was left of the time budget" if budgeted else f"the {self.limits.wall_seconds:g} s wall-clock limit"
            raise SandboxTimeout(f"the encoder ran past {limit} on {what}; its worker was killed") from None
        except WorkerDied as e:
            reason = worker.exit_reason(limits=self.limits)
            self._drop_worker()
            raise SandboxError(f"the encoder's worker died on {what}: {e}: {reason}") from None
        if not reply.get("ok"):
            text = error_line(RuntimeError(str(reply.get("error", "?"))))
            if reply.get("kind") == "memory":
                raise SandboxError(
                    f"the encoder hit the {self.limits.memory_mb} MB memory limit on {what}: {text}"
                )
            raise SandboxError(f"the encoder failed on a batch of {seconds:.1f} s of audio: {text}")
        if len(arrays) != len(names):
            raise SandboxError(f"the worker returned {len(arrays)} output(s) for {len(names)} requested")
        peak = reply.get("peak_mb")
        if isinstance(peak, (int, float)):
            above = max(0.0, float(peak) - self._baseline_mb)
            self._peak_mb = above if self._peak_mb is None else max(self._peak_mb, above)
        return arrays

    def _await_after_restart(self) -> None:
        ready = self._start()
        if ready["providers"][0] != self._providers[0]:
            self._drop_worker()
            raise SandboxError(
                f"the restarted worker runs on {ready['providers'][0]}, not {self._providers[0]}"
            )

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
        if self._hop_samples is None:
            return [feats[i].astype(np.float32) for i in range(b)]
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

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None

    def close(self) -> None:
        """Stop the worker (end of input, then SIGKILL to its process group); safe to call twice."""
        if self._worker is not None:
            self._worker.close()
            self._worker = None

    def __enter__(self) -> OnnxRuntime:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_worker", None) is not None:
            self._worker.kill()


def error_line(e: BaseException, limit: int = 300) -> str:
    """The informative part of an onnxruntime error, on one line."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    node = re.search(r"running (\w+) node\..*?Status Message: (.*)", text)
    if node:  # drop onnxruntime's source location and C++ signature, keep the op and the message
        text = f"{node.group(1)} node failed: " + re.sub(r"^.*? was false\. ", "", node.group(2))
    text = re.sub(r"/\S+\.(?:cc|cpp|h):\d+ .*?\)\s+", "", text)  # a C++ source location and signature
    return text if len(text) <= limit else text[: limit - 3] + "..."


def expected_frames(n_samples: int, frame_hop_ms: float) -> int:
    """Frames an encoder with this hop should return for a clip: ceil(samples / hop)."""
    return math.ceil(n_samples / (frame_hop_ms * SAMPLE_RATE / 1000.0))
