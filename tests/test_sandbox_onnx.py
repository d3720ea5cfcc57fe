"""The ONNX worker sandbox against hostile graphs, run by real onnxruntime in a real worker process.

Each hostile model is built here with onnx.helper. Every case must end in a typed error with a reason,
leave this process able to go on, and leave no worker process (and no file) behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper
from resources.encoders.onnx_models import make_onnx
from test_submission_probe import manifest_for

from evaluator.errors import SandboxError, SubmissionError
from evaluator.sandbox import Limits, open_runtime
from evaluator.sandbox.onnx_process import SANDBOXES, sandbox_command
from evaluator.sandbox.onnx_runtime import OnnxRuntime

ONE_SECOND = np.full(16000, 0.1, np.float32)


def children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(autouse=True)
def no_leftovers():
    before = {p.pid for p in children()}
    yield
    deadline = time.monotonic() + 5
    while {p.pid for p in children()} - before and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [(p.pid, p.cmdline()[:3]) for p in children() if p.pid not in before]
    assert not left, f"worker processes left behind: {left}"


def bare_manifest():
    return manifest_for(mask_input=False, mask_output=False)


def save(path, nodes, inits=(), *, domains=(("", 18),), functions=()):
    """A graph with the contract's I/O names: audio [B, S] float -> features [B, T, 8] float."""
    graph = helper.make_graph(
        nodes,
        "hostile",
        [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", "S"])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", "T", 8])],
        list(inits),
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in domains], functions=list(functions)
    )
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def framing_nodes(last: str = "audio"):
    """[B, S] -> [B, S/320, 8]-ish features (exact frame counts do not matter for these tests)."""
    return [
        helper.make_node("Unsqueeze", [last, "AX2"], ["u"]),  # [B, S, 1]
        helper.make_node("Expand", ["u", "D8"], ["e"]),  # [B, S, 8]
        helper.make_node("Slice", ["e", "ST", "EN", "AX1", "HOP"], ["features"]),  # every 320th sample
    ]


def framing_inits():
    return [
        numpy_helper.from_array(np.array([2], np.int64), "AX2"),
        numpy_helper.from_array(np.array([1, 1, 8], np.int64), "D8"),
        numpy_helper.from_array(np.array([0], np.int64), "ST"),
        numpy_helper.from_array(np.array([1 << 40], np.int64), "EN"),
        numpy_helper.from_array(np.array([1], np.int64), "AX1"),
        numpy_helper.from_array(np.array([320], np.int64), "HOP"),
    ]


def memory_bomb(path):
    """Allocates S x S floats (1 GB for one second of audio) before producing features."""
    nodes = [
        helper.make_node("Shape", ["audio"], ["shp"]),
        helper.make_node("Slice", ["shp", "AX1", "TWO", "ZERO"], ["s"]),  # [S]
        helper.make_node("Concat", ["ONE", "s", "s"], ["big_shape"], axis=0),  # [1, S, S]
        helper.make_node("ConstantOfShape", ["big_shape"], ["big"]),
        helper.make_node("ReduceMax", ["big"], ["m"], keepdims=0),  # scalar 0.0
        helper.make_node("Add", ["audio", "m"], ["a2"]),
        *framing_nodes("a2"),
    ]
    inits = framing_inits() + [
        numpy_helper.from_array(np.array([2], np.int64), "TWO"),
        numpy_helper.from_array(np.array([0], np.int64), "ZERO"),
        numpy_helper.from_array(np.array([1], np.int64), "ONE"),
    ]
    return save(path, nodes, inits)


def external_data_model(path, location: str):
    """A valid graph whose one weight claims to live in ``location`` (written by hand: onnx refuses)."""
    weight = numpy_helper.from_array(np.ones(8, np.float32), "W")
    nodes = framing_nodes("audio")
    nodes[-1].output[0] = "f"
    nodes.append(helper.make_node("Mul", ["f", "W"], ["features"]))
    save(path, nodes, framing_inits() + [weight])
    model = onnx.load(str(path))
    w = next(t for t in model.graph.initializer if t.name == "W")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "32")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


# -- refused before onnxruntime sees the file ---------------------------------------------------------


def test_custom_operator_domain_refused(tmp_path):
    nodes = [helper.make_node("Evil", ["audio"], ["features"], domain="com.attacker")]
    save(tmp_path / "model.onnx", nodes, domains=(("", 18), ("com.attacker", 1)))
    with pytest.raises(SubmissionError, match="custom-op libraries are never loaded") as e:
        open_runtime(tmp_path, bare_manifest(), Limits())
    assert any("com.attacker::Evil" in r for r in e.value.reasons)


def test_custom_domain_hidden_in_a_subgraph_refused(tmp_path):
    body = helper.make_graph(
        [helper.make_node("Evil", ["audio"], ["y"], domain="com.attacker")],
        "then",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("If", ["c"], ["features"], then_branch=body, else_branch=body),
    ]
    save(tmp_path / "model.onnx", nodes)
    with pytest.raises(SubmissionError) as e:
        open_runtime(tmp_path, bare_manifest(), Limits())
    assert any("com.attacker::Evil" in r for r in e.value.reasons)


def test_model_local_function_domain_is_allowed(tmp_path):
    """torch's exporter wraps modules in functions of its own domain: they expand to standard ops."""
    fn = helper.make_function(
        "pkg.local", "Halve", ["x"], ["y"],
        [helper.make_node("Constant", [], ["h"], value_float=0.5),
         helper.make_node("Mul", ["x", "h"], ["y"])],
        opset_imports=[helper.make_opsetid("", 18)],
    )  # fmt: skip
    nodes = framing_nodes("half")
    nodes.insert(0, helper.make_node("Halve", ["audio"], ["half"], domain="pkg.local"))
    save(
        tmp_path / "model.onnx", nodes, framing_inits(), domains=(("", 18), ("pkg.local", 1)), functions=[fn]
    )
    with open_runtime(tmp_path, bare_manifest(), Limits()) as rt:
        (out,) = rt.encode([ONE_SECOND])
    np.testing.assert_allclose(out[:, 0], 0.05, rtol=1e-6)


@pytest.mark.parametrize(
    ("location", "reason"),
    [
        ("../x", "climbs out with '..'"),
        ("sub/../../x", "climbs out with '..'"),
        ("/etc/passwd", "is an absolute path"),
        ("link.bin", "goes through a symbolic link"),
        ("linkdir/w.bin", "goes through a symbolic link"),
    ],
)
def test_external_data_outside_the_submission_refused(tmp_path, location, reason):
    sub = tmp_path / "submission"
    sub.mkdir()
    (tmp_path / "x").write_bytes(np.ones(8, np.float32).tobytes())  # what the attacker hopes to read
    (sub / "link.bin").symlink_to(tmp_path / "x")
    (sub / "linkdir").symlink_to(tmp_path)
    (tmp_path / "w.bin").write_bytes(np.ones(8, np.float32).tobytes())
    external_data_model(sub / "model.onnx", location)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SubmissionError, match="outside the submission; refused before loading") as e:
        open_runtime(sub, bare_manifest(), Limits())
    assert any(reason in r and location in r for r in e.value.reasons), e.value.reasons
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_external_data_inside_the_submission_is_read(tmp_path):
    """Models over protobuf's 2 GB limit keep weights beside the .onnx file: allowed when inside."""
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(np.full(8, 2.0, np.float32).tobytes())
    external_data_model(tmp_path / "model.onnx", "weights/w.bin")
    with open_runtime(tmp_path, bare_manifest(), Limits()) as rt:
        (out,) = rt.encode([ONE_SECOND])
    plain = tmp_path / "plain"
    plain.mkdir()
    save(plain / "model.onnx", framing_nodes("audio"), framing_inits())
    with open_runtime(plain, bare_manifest(), Limits()) as rt:
        (ref,) = rt.encode([ONE_SECOND])
    np.testing.assert_allclose(out, 2.0 * ref, rtol=1e-6)  # the weight really came from w.bin


def test_missing_external_data_refused(tmp_path):
    external_data_model(tmp_path / "model.onnx", "nowhere.bin")
    with pytest.raises(SubmissionError) as e:
        open_runtime(tmp_path, bare_manifest(), Limits())
    assert any("is not a file in the submission" in r for r in e.value.reasons)


# -- stopped while running ----------------------------------------------------------------------------


def test_memory_bomb_stopped_by_the_memory_limit(tmp_path):
    memory_bomb(tmp_path / "model.onnx")
    with open_runtime(tmp_path, bare_manifest(), Limits(memory_mb=512, wall_seconds=60)) as rt:
        (small,) = rt.encode([np.zeros(1600, np.float32)])  # 1600^2 floats = 10 MB: fine
        with pytest.raises(SandboxError, match="512 MB memory limit"):
            rt.encode([ONE_SECOND])  # 16000^2 floats = 1 GB
        (again,) = rt.encode([np.zeros(1600, np.float32)])  # the runtime goes on
    assert small.shape == again.shape == (5, 8)


def test_wall_clock_kills_the_worker_and_the_next_call_starts_a_new_one(tmp_path):
    make_onnx(tmp_path / "model.onnx", loop_iterations=50_000_000)
    with OnnxRuntime(tmp_path, manifest_for(), Limits(wall_seconds=0.5)) as rt:
        first = rt._worker.proc.pid
        t0 = time.monotonic()
        with pytest.raises(SandboxError, match="wall-clock limit.*worker was killed"):
            rt.encode([ONE_SECOND])
        assert time.monotonic() - t0 < 5
        assert rt._worker is None and not psutil.pid_exists(first)
        with pytest.raises(SandboxError, match="wall-clock limit"):
            rt.encode([ONE_SECOND])
        assert rt.restarts == 1


def test_cpu_time_limit(tmp_path):
    make_onnx(tmp_path / "model.onnx", loop_iterations=500_000_000)
    with OnnxRuntime(tmp_path, manifest_for(), Limits(cpu_seconds=1, wall_seconds=60)) as rt:
        t0 = time.monotonic()
        with pytest.raises(SandboxError, match="CPU-time limit"):
            rt.encode([ONE_SECOND])
        assert time.monotonic() - t0 < 30


def test_crashed_worker_is_reported_and_replaced(tmp_path):
    make_onnx(tmp_path / "model.onnx")
    with OnnxRuntime(tmp_path, manifest_for(), Limits()) as rt:
        rt.encode([ONE_SECOND])
        python = [p for p in children() if "onnx_worker" in " ".join(p.cmdline())]
        python[-1].send_signal(signal.SIGSEGV)  # the innermost: the interpreter running onnxruntime
        python[-1].wait(5)
        with pytest.raises(SandboxError, match="worker died"):
            rt.encode([ONE_SECOND])
        assert not [p for p in python if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        (out,) = rt.encode([ONE_SECOND])
        assert out.shape == (50, 8) and rt.restarts == 1


def test_worker_gone_after_close_and_close_twice(tmp_path):
    make_onnx(tmp_path / "model.onnx")
    rt = open_runtime(tmp_path, manifest_for(), Limits())
    assert any("onnx_worker" in " ".join(p.cmdline()) for p in children())
    rt.close()
    rt.close()
    assert not children()


def test_peak_memory_is_the_workers(tmp_path):
    make_onnx(tmp_path / "model.onnx")
    with open_runtime(tmp_path, manifest_for(), Limits()) as rt:
        assert rt.peak_memory_mb() is None
        rt.encode([np.ones(30 * 16000, np.float32)] * 8)  # 8 x 30 s: ~15 MB of input alone
        assert 10 < rt.peak_memory_mb() < 1024


# -- the isolation in force ---------------------------------------------------------------------------


def _run_in(kind, tmp_path, code):
    command = sandbox_command(kind, root=tmp_path, gpu=False)
    if command is None:
        pytest.skip(f"{kind} is not installed here")
    argv = command[0][:-1] + ["-c", code]  # the same sandbox, another script
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}, check=False
    )


def test_bwrap_sandbox_has_no_network_and_sees_only_the_submission(tmp_path):
    code = (
        "import os, socket\n"
        "print('uid', os.getuid())\n"
        f"print('repo visible', os.path.exists({os.path.dirname(__file__)!r}))\n"
        "print('submission', sorted(os.listdir('/submission')))\n"
        "try:\n"
        "    socket.create_connection(('1.1.1.1', 53), timeout=5)\n"
        "except OSError as e:\n"
        "    print('net', e.errno)\n"
    )
    (tmp_path / "model.onnx").write_bytes(b"x")
    result = _run_in("bwrap", tmp_path, code)
    if result.returncode and "bwrap" in result.stderr:
        pytest.skip(f"bubblewrap cannot run here: {result.stderr.strip()}")
    out = result.stdout.splitlines()
    assert out[:3] == ["uid 65534", "repo visible False", "submission ['model.onnx']"], result
    assert out[3] in ("net 101", "net 99"), out  # ENETUNREACH / EADDRNOTAVAIL: no interface but lo


def test_isolation_is_reported(tmp_path, caplog):
    make_onnx(tmp_path / "model.onnx")
    with open_runtime(tmp_path, manifest_for(), Limits(memory_mb=1000, cpu_seconds=99)) as rt:
        assert rt.device == "cpu" and "CPUExecutionProvider" in rt.isolation
        assert "1000 MB" in rt.isolation and "99 s CPU" in rt.isolation
        if rt._sandbox.startswith("bwrap"):
            assert "bubblewrap: no network" in rt.isolation
    with OnnxRuntime(tmp_path, manifest_for(), Limits(), sandboxes=["none"]) as rt:
        assert "the network is NOT isolated" in rt.isolation
        (out,) = rt.encode([ONE_SECOND])
    assert out.shape == (50, 8)
    assert "WITHOUT network isolation" in caplog.text


def test_unknown_sandbox_kind(tmp_path):
    make_onnx(tmp_path / "model.onnx")
    with pytest.raises(ValueError, match="unknown sandbox"):
        OnnxRuntime(tmp_path, manifest_for(), Limits(), sandboxes=["chroot"])
    assert "bwrap" in SANDBOXES


def test_worker_never_unpickles(tmp_path):
    """The array frames are plain .npy read with allow_pickle=False: a pickled object is refused."""
    import io

    from evaluator.sandbox import onnx_worker

    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        onnx_worker.load_array(buf.getvalue())
    assert os.path.exists(onnx_worker.__file__)


def test_worker_threads_never_exceed_the_usable_cores(tmp_path):
    """Limits.cpus above the cores this process may use would oversubscribe them; the worker also gets
    the quiet OpenMP setting in its environment."""
    from evaluator.cores import QUIET_OPENMP, usable_cpus

    make_onnx(tmp_path / "model.onnx")
    with OnnxRuntime(tmp_path, manifest_for(), Limits(cpus=64), sandboxes=["none"]) as rt:
        assert f"{usable_cpus()} thread(s)" in rt.isolation
        assert all(rt._env()[k] == v for k, v in QUIET_OPENMP.items())
    with OnnxRuntime(tmp_path, manifest_for(), Limits(cpus=1), sandboxes=["none"]) as rt:
        assert "1 thread(s)" in rt.isolation
