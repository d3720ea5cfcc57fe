"""The ONNX worker process seen from the host: how it is isolated, started, talked to and killed.

The worker itself is `evaluator.sandbox.onnx_worker`; `OnnxRuntime` (onnx_runtime.py) drives it.
Isolation kinds are tried strongest first (`SANDBOXES`): bubblewrap as nobody, bubblewrap, ``unshare``,
then a plain process with a warning; the one in force is described to the user.
"""

from __future__ import annotations

import importlib.util
import logging
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

from evaluator.fileio import UnsafeInput, parse_json, read_npy
from evaluator.sandbox import onnx_worker
from evaluator.sandbox.base import Limits

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)

NOBODY = 65534
SANDBOXES = ("bwrap-nobody", "bwrap", "unshare", "none")  # strongest first
WORKER_IN_SANDBOX = "/run/xares/onnx_worker.py"
SUBMISSION_IN_SANDBOX = "/submission"
MAX_JSON_FRAME = 1 << 20
STDERR_KEPT = 64 << 10  # bytes of the worker's stderr kept for error messages
CLOSE_GRACE_SECONDS = 2.0
MIN_LOAD_SECONDS = 120.0  # starting the worker and loading the model may take longer than one call


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


class WorkerDied(Exception):
    """The worker exited or broke the protocol; the message says how."""


class Worker:
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
            raise WorkerDied("the worker stopped reading its requests") from e

    def receive(self, deadline: float, *, max_array_bytes: int) -> tuple[dict, list[np.ndarray]]:
        """One message; raises TimeoutError past the deadline, WorkerDied on exit or garbage."""
        try:
            message = parse_json(self._frame(deadline, MAX_JSON_FRAME))
        except UnsafeInput as e:
            raise WorkerDied(f"the worker broke the protocol ({e})") from e
        if not isinstance(message, dict):
            raise WorkerDied("the worker broke the protocol (a message that is not an object)")
        arrays = []
        for _ in range(int(message.get("arrays", 0))):
            data = self._frame(deadline, max_array_bytes)
            try:  # the worker runs the participant's model: its bytes are untrusted too
                arrays.append(read_npy(data, max_bytes=len(data)))
            except UnsafeInput as e:
                raise WorkerDied(f"the worker sent an unreadable array ({e})") from e
        return message, arrays

    def _frame(self, deadline: float, limit: int) -> bytes:
        head = self._exactly(onnx_worker.HEADER.size, deadline)
        (n,) = onnx_worker.HEADER.unpack(head)
        if n > limit:
            raise WorkerDied(f"the worker sent a {n}-byte message; the limit is {limit} bytes")
        return self._exactly(n, deadline)

    def _exactly(self, n: int, deadline: float) -> bytes:
        fd = self.proc.stdout.fileno()
        while len(self._pending) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sel.select(timeout=left):
                raise TimeoutError
            chunk = os.read(fd, max(65536, min(n - len(self._pending), 16 << 20)))
            if not chunk:
                raise WorkerDied("the worker exited")
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


