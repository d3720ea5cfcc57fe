"""The ONNX worker: one onnxruntime session in its own process, driven over a pipe.

`evaluator.sandbox.onnx_runtime` starts this file as a script (``python -I onnx_worker.py``, usually
inside bubblewrap, where only this file, the interpreter and the submission are visible) and talks to
it with frames: an 8-byte big-endian length, then the bytes. A message is one JSON frame, followed by
as many ``.npy`` frames as the JSON says. Arrays are read with ``allow_pickle=False`` on both sides:
nothing that crosses the pipe is ever unpickled.

    host -> worker: {"model", "threads", "providers", "memory_mb", "cpu_seconds", "pids", "fsize_mb"}
    worker -> host: {"event": "hello", "uid", "rlimits"}      # before the model is touched
    worker -> host: {"event": "ready", "providers", "inputs", "outputs", "rss_mb"} | {"error", ...}
    host -> worker: {"op": "run", "names": [...], "feeds": [...]} + one array per feed
    worker -> host: {"ok": true, "arrays": n, "peak_mb"} + n arrays | {"ok": false, "error", "kind"}

The protocol uses the file descriptor that was stdout; fd 1 is pointed at stderr before anything else
runs, so a library that prints cannot corrupt it. This module imports only the standard library,
numpy and onnxruntime: it must run where the evaluator package is not visible.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import sys

HEADER = struct.Struct(">Q")
MAX_REQUEST_BYTES = 8 << 30  # a request bigger than this is a host bug, not something to allocate


def read_frame(stream) -> bytes | None:
    """One frame, or None at a clean end of stream."""
    head = stream.read(HEADER.size)
    if not head:
        return None
    if len(head) != HEADER.size:
        raise EOFError("truncated frame header")
    (n,) = HEADER.unpack(head)
    if n > MAX_REQUEST_BYTES:
        raise ValueError(f"frame of {n} bytes refused")
    data = stream.read(n)
    if len(data) != n:
        raise EOFError("truncated frame")
    return data


def write_frame(stream, data: bytes) -> None:
    stream.write(HEADER.pack(len(data)))
    stream.write(data)


def send(stream, message: dict, arrays=()) -> None:
    import numpy as np

    write_frame(stream, json.dumps(message).encode())
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
        write_frame(stream, buf.getvalue())
    stream.flush()


def load_array(data: bytes):
    import numpy as np

    return np.load(io.BytesIO(data), allow_pickle=False)


def status_mb(key: str) -> float | None:
    """A Vm* field of /proc/self/status in MiB (None where /proc is not mounted)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def set_limits(config: dict) -> dict:
    """Lower soft and hard limits together, so the model cannot raise them back."""
    mb = 1 << 20
    wanted = {
        "RLIMIT_DATA": config["memory_mb"] * mb,  # heap and anonymous mappings: what a big tensor needs
        "RLIMIT_CPU": config["cpu_seconds"],
        "RLIMIT_NPROC": config["pids"],
        "RLIMIT_FSIZE": config["fsize_mb"] * mb,
        "RLIMIT_CORE": 0,
    }
    if config.get("address_space_mb"):  # not with CUDA, which reserves terabytes of address space
        wanted["RLIMIT_AS"] = config["address_space_mb"] * mb
    applied = {}
    for name, value in wanted.items():
        res = getattr(resource, name)
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        # CPU: SIGXCPU at the soft limit names the cause; SIGKILL one second later if it is caught
        hard_value = value + 1 if name == "RLIMIT_CPU" and hard == resource.RLIM_INFINITY else value
        resource.setrlimit(res, (value, hard_value))
        applied[name] = value
    return applied


def _io(args) -> list[dict]:
    return [
        {"name": a.name, "type": a.type, "shape": [d if isinstance(d, int) else None for d in a.shape]}
        for a in args
    ]


def _error_kind(text: str) -> str:
    lowered = text.lower()
    if "allocat" in lowered or "bad_alloc" in lowered or "out of memory" in lowered:
        return "memory"
    return "run"


def main() -> int:
    proto_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed from here on goes to stderr, never into the protocol
    proto_in = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)

    first = read_frame(proto_in)
    if first is None:
        return 0
    config = json.loads(first)
    rlimits = set_limits(config)
    send(proto_out, {"event": "hello", "uid": os.getuid(), "rlimits": rlimits})

    try:
        import numpy as np
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = config["threads"]
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 4  # fatal only: failures come back as exceptions
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # shared cores
        session = ort.InferenceSession(config["model"], sess_options=opts, providers=config["providers"])
    except MemoryError:
        send(proto_out, {"error": "out of memory while loading the model", "kind": "memory"})
        return 1
    except Exception as e:  # noqa: BLE001 - every failure goes back to the host as a reason
        kind = "memory" if _error_kind(str(e)) == "memory" else "load"
        send(proto_out, {"error": str(e), "kind": kind})
        return 1
    baseline = status_mb("VmRSS")
    send(
        proto_out,
        {
            "event": "ready",
            "providers": session.get_providers(),
            "inputs": _io(session.get_inputs()),
            "outputs": _io(session.get_outputs()),
            "rss_mb": baseline,
        },
    )

    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    while True:
        frame = read_frame(proto_in)
        if frame is None:
            return 0
        request = json.loads(frame)
        feed = {}
        for name in request["feeds"]:
            data = read_frame(proto_in)
            if data is None:
                return 1
            feed[name] = load_array(data)
        try:
            results = session.run(request["names"], feed, run_options)
            arrays = [np.asarray(r) for r in results]
            if any(a.dtype.hasobject for a in arrays):
                raise TypeError("an output is not a numeric tensor")
        except MemoryError:
            send(proto_out, {"ok": False, "error": "out of memory", "kind": "memory"})
            continue
        except Exception as e:  # noqa: BLE001 - onnxruntime's own error types, reported to the host
            send(proto_out, {"ok": False, "error": str(e), "kind": _error_kind(str(e))})
            continue
        send(proto_out, {"ok": True, "arrays": len(arrays), "peak_mb": status_mb("VmHWM")}, arrays)


if __name__ == "__main__":
    sys.exit(main())
