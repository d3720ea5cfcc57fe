"""Run an ONNX encoder submission with onnxruntime in a sandboxed worker process.

Before anything runs, the host reads the graph as data (`check_model`): only operator domains that
onnxruntime implements itself, no custom-op library (none is ever registered), and every external-data
reference must name a file inside the submission (relative, no ``..``, no link), so a model over
protobuf's 2 GB limit can keep its weights beside the .onnx file. The session itself lives in `evaluator.sandbox.onnx_worker`, started once
per runtime under the strongest isolation this host allows (`SANDBOXES`, tried in order; the one in
force is spelled out in ``isolation``): bubblewrap with no network, its own pid/ipc/uts namespaces, a
read-only view of the interpreter and the submission only, as uid 65534; else ``unshare``; else a
plain process, with a warning. The worker caps its own memory, CPU time, processes and file size with
rlimits before it touches the model; the host bounds every call by the wall clock and kills the whole
worker on timeout. A worker that dies is started again on the next call.

Example::

    with OnnxRuntime(root, manifest, Limits()) as rt:
        feats = rt.encode([np.zeros(16000, np.float32)])   # [[T, D]]
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evaluator.errors import EnvironmentUnavailable, SandboxError, SubmissionError
from evaluator.sandbox import onnx_worker
from evaluator.sandbox.base import Limits
from evaluator.submission.manifest import SAMPLE_RATE, Manifest

log = logging.getLogger(__name__)

MAX_BATCH_ITEMS = 8  # clips per onnxruntime call
MAX_BATCH_SAMPLES = 8 * 30 * SAMPLE_RATE  # padded samples per call (8 clips of 30 s)
HOP_TOLERANCE_FRAMES = 2  # frames an unmasked output may exceed ceil(len / hop) before it is a contract break
HOP_TOLERANCE_RATIO = 0.02

# Operator domains onnxruntime implements with its own compiled kernels: the ONNX standard sets and
# Microsoft's contrib ops (what torch exports and the onnxruntime optimizers emit: FusedMatMul,
# Attention, ...). Anything else needs a custom-op library, which would be the participant's native code.
ALLOWED_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft"})
NOBODY = 65534
SANDBOXES = ("bwrap-nobody", "bwrap", "unshare", "none")  # strongest first
WORKER_IN_SANDBOX = "/run/xares/onnx_worker.py"
SUBMISSION_IN_SANDBOX = "/submission"
MAX_JSON_FRAME = 1 << 20
STDERR_KEPT = 64 << 10  # bytes of the worker's stderr kept for error messages
CLOSE_GRACE_SECONDS = 2.0
MIN_LOAD_SECONDS = 120.0  # starting the worker and loading the model may take longer than one call

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


# -- static checks (the host reads the graph as data; onnxruntime never sees a refused file) -----------


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
        for t in _all_tensors(model.graph)
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
    external = [t for t in _all_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL]
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


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


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


# -- the sandboxed worker process -----------------------------------------------------------------------


def sandbox_command(kind: str, *, root: Path, gpu: bool) -> tuple[list[str], str] | None:
    """The argv that starts the worker under one kind of sandbox, and what that sandbox gives.

    Args:
        kind: one of `SANDBOXES`.
        root: the submission folder (made visible read-only).
        gpu: bind the NVIDIA device nodes.

    Returns:
        (argv, description), or None when the tools for this kind are missing on this host.
    """
    worker = Path(onnx_worker.__file__).resolve()
    python = [sys.executable, "-I", "-B"]
    root_uid = os.geteuid() == 0
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--no-new-privs"]
    if kind in ("bwrap-nobody", "bwrap"):
        if not shutil.which("bwrap") or (
            kind == "bwrap-nobody" and not (root_uid and shutil.which("setpriv"))
        ):
            return None
        argv = (drop if kind == "bwrap-nobody" else []) + ["bwrap", *_bwrap_flags(worker, root, gpu)]
        argv += ["--", *python, WORKER_IN_SANDBOX]
        who = (
            f"uid {NOBODY} (nobody) inside and outside"
            if kind == "bwrap-nobody"
            else f"uid {NOBODY} in a user namespace (uid {os.geteuid()} outside"
            + ("; the interpreter is not readable by nobody)" if root_uid else ")")
        )
        return argv, (
            f"bubblewrap: no network, own pid/ipc/uts/user namespaces, {who}; a read-only view of the "
            "interpreter and the submission only, a private /tmp"
        )
    if kind == "unshare":
        if not shutil.which("unshare") or (root_uid and not shutil.which("setpriv")):
            return None
        if root_uid:
            argv = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--", *drop]
            who = f"uid {NOBODY} (nobody)"
        else:
            argv = ["unshare", "--user", "--net", "--pid", "--fork", "--kill-child", "--"]
            who = f"uid {os.geteuid()} (own user namespace)"
        return argv + [*python, str(worker)], (
            f"unshare: no network, own pid namespace, {who}; the host filesystem is visible read-write "
            "as far as that uid may"
        )
    if kind == "none":
        return [*python, str(worker)], (
            f"NO isolation: the network is NOT isolated and the worker runs as uid {os.geteuid()} "
            "(neither bubblewrap nor unshare could start it)"
        )
    raise ValueError(f"unknown sandbox {kind!r}; expected one of {SANDBOXES}")


def _bwrap_flags(worker: Path, root: Path, gpu: bool) -> list[str]:
    """Every bubblewrap flag in one list: what the worker may see and do."""
    flags = [
        "--unshare-all",  # net, pid, ipc, uts, cgroup (user below)
        "--unshare-user",
        "--uid", str(NOBODY),
        "--gid", str(NOBODY),
        "--die-with-parent",
        "--new-session",  # no TIOCSTI into our terminal
        "--ro-bind", "/usr", "/usr",
        "--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache",
        "--dev", "/dev",
        "--proc", "/proc",
        "--tmpfs", "/tmp",
        "--ro-bind", str(worker), WORKER_IN_SANDBOX,
        "--ro-bind", str(root), SUBMISSION_IN_SANDBOX,
        "--chdir", "/tmp",
    ]  # fmt: skip
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            flags += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            flags += ["--ro-bind", top, top]
    seen = set()
    for path in _python_paths():
        if path not in seen and not path.startswith("/usr/"):
            seen.add(path)
            flags += ["--ro-bind", path, path]
    if gpu:
        for dev in sorted(Path("/dev").glob("nvidia*")):
            flags += ["--dev-bind", str(dev), str(dev)]
    return flags


def _python_paths() -> list[str]:
    """Folders the interpreter, numpy and onnxruntime need (the interpreter's prefix, the venv, ...)."""
    paths = [sys.base_prefix, sys.prefix, os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))]
    for name in ("numpy", "onnxruntime"):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            paths.append(os.path.dirname(next(iter(spec.submodule_search_locations))))
    return [os.path.realpath(p) for p in paths if os.path.isdir(p)] + [p for p in paths if os.path.isdir(p)]


class _WorkerDied(Exception):
    """The worker exited or broke the protocol; the message says how."""


class _Worker:
    """One worker process: start (with a hello before the model is touched), talk in frames, kill."""

    def __init__(self, argv: list[str], env: dict, *, log_bytes: int):
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # one process group: killed as a whole
            close_fds=True,
        )
        self._stderr = bytearray()
        self._stderr_cap = max(1024, min(log_bytes, STDERR_KEPT))
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.proc.stdout, selectors.EVENT_READ)
        self._pending = bytearray()

    def _read_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
            self._stderr += chunk
            if len(self._stderr) > self._stderr_cap:
                del self._stderr[: len(self._stderr) - self._stderr_cap]

    def last_stderr_line(self, limit: int = 300) -> str:
        self._drain.join(timeout=1.0)
        lines = [
            ln.strip() for ln in bytes(self._stderr).decode("utf-8", "replace").splitlines() if ln.strip()
        ]
        text = lines[-1] if lines else ""
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def send(self, message: dict, arrays: Sequence[np.ndarray] = ()) -> None:
        try:
            onnx_worker.send(self.proc.stdin, message, arrays)
        except (BrokenPipeError, OSError) as e:
            raise _WorkerDied("the worker stopped reading its requests") from e

    def receive(self, deadline: float, *, max_array_bytes: int) -> tuple[dict, list[np.ndarray]]:
        """One message; raises TimeoutError past the deadline, _WorkerDied on exit or garbage."""
        try:
            message = json.loads(self._frame(deadline, MAX_JSON_FRAME))
        except ValueError as e:
            raise _WorkerDied(f"the worker broke the protocol ({e})") from e
        if not isinstance(message, dict):
            raise _WorkerDied("the worker broke the protocol (a message that is not an object)")
        arrays = []
        for _ in range(int(message.get("arrays", 0))):
            data = self._frame(deadline, max_array_bytes)
            try:
                arrays.append(onnx_worker.load_array(data))
            except ValueError as e:
                raise _WorkerDied(f"the worker sent an unreadable array ({e})") from e
        return message, arrays

    def _frame(self, deadline: float, limit: int) -> bytes:
        head = self._exactly(onnx_worker.HEADER.size, deadline)
        (n,) = onnx_worker.HEADER.unpack(head)
        if n > limit:
            raise _WorkerDied(f"the worker sent a {n}-byte message; the limit is {limit} bytes")
        return self._exactly(n, deadline)

    def _exactly(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while len(self._pending) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(timeout=left):
                raise TimeoutError
            chunk = os.read(fd, max(65536, min(n - len(self._pending), 16 << 20)))
            if not chunk:
                raise _WorkerDied("the worker exited")
            self._pending += chunk
        data = bytes(self._pending[:n])
        del self._pending[:n]
        return data

    def exit_reason(self, *, limits: Limits) -> str:
        """Why the (dead or dying) worker stopped: signal or exit code, and its last stderr line."""
        try:
            code = self.proc.wait(timeout=CLOSE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        last = self.last_stderr_line()
        if code is not None and code < 0:
            sig = signal.Signals(-code)
            what = f"killed by {sig.name}"
            if sig == signal.SIGXCPU:
                what += f" (the {limits.cpu_seconds} s CPU-time limit)"
            elif sig == signal.SIGKILL:
                what += f" (a limit: {limits.memory_mb} MB memory or {limits.cpu_seconds} s CPU time?)"
        else:
            what = f"exited with code {code}"
            if code == 137 or code == 128 + signal.SIGKILL:
                what += f" (killed; a limit: {limits.memory_mb} MB memory?)"
            elif code == 128 + signal.SIGXCPU:
                what += f" (the {limits.cpu_seconds} s CPU-time limit)"
        if re.search(r"MemoryError|bad_alloc|[Cc]annot allocate|out of memory", last):
            what += f"; out of memory under the {limits.memory_mb} MB limit"
        return what + (f"; last stderr line: {last}" if last else "")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (bubblewrap takes its namespace down with it) and reap."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._finish()

    def close(self) -> None:
        """Ask politely (end of input), then kill whatever is left."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=CLOSE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def _finish(self) -> None:
        self._sel.close()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._drain.join(timeout=1.0)
        if not self._drain.is_alive():  # closing under a reading thread would deadlock at exit
            self.proc.stderr.close()


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
        self._hop_samples = manifest.frame_hop_ms * SAMPLE_RATE / 1000.0
        self._out_dtype = np.dtype(manifest.output_dtype)
        self._worker: _Worker | None = None
        self._peak_mb: float | None = None

        self.root = Path(root).resolve()
        model_path = (self.root / self.spec.model).resolve()
        if not model_path.is_relative_to(self.root):
            raise SubmissionError(f"onnx.model {self.spec.model!r} points outside the submission")
        if not model_path.is_file():
            raise SubmissionError(f"onnx.model {self.spec.model!r} is not a file in the submission")
        check_model(self.root, model_path)
        self._model_rel = model_path.relative_to(self.root).as_posix()

        self._threads = max(1, int(limits.cpus))
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
            worker = _Worker(argv, self._env(), log_bytes=self.limits.log_bytes)
            deadline = time.monotonic() + max(self.limits.wall_seconds, MIN_LOAD_SECONDS)
            try:
                worker.send(self._worker_config(model))
                hello, _ = worker.receive(deadline, max_array_bytes=0)
                if hello.get("event") != "hello":
                    raise _WorkerDied(f"unexpected first message {str(hello)[:100]}")
            except (_WorkerDied, TimeoutError) as e:
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
        except _WorkerDied:
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
        try:
            worker.send({"op": "run", "names": names, "feeds": list(feed)}, list(feed.values()))
            reply, arrays = worker.receive(deadline, max_array_bytes=self.limits.output_mb << 20)
        except TimeoutError:
            self._drop_worker()
            raise SandboxError(
                f"the encoder ran past the {self.limits.wall_seconds:g} s wall-clock limit on {what}; "
                "its worker was killed"
            ) from None
        except _WorkerDied as e:
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
