"""Device choice, CPU cores, determinism settings and the graph-capture fallback."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from evaluator import compute
from evaluator.cores import cgroup_cpu_quota, usable_cpus
from evaluator.errors import ConfigError, EnvironmentUnavailable

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")


class TestDevice:
    def test_auto_and_cpu(self):
        expected = "cuda" if torch.cuda.is_available() else "cpu"
        assert compute.resolve_device("auto").type == expected
        assert compute.resolve_device(None).type == expected
        assert compute.resolve_device("cpu") == torch.device("cpu")
        assert compute.resolve_device(" CPU ") == torch.device("cpu")

    @pytest.mark.parametrize("bad", ["tpu", "gpu", "cuda:x", "", "mps:0:1"])
    def test_unknown_names_are_config_errors(self, bad):
        if bad == "":
            assert compute.resolve_device(bad).type in ("cpu", "cuda")  # empty means auto
            return
        with pytest.raises(ConfigError, match="auto, cpu, cuda, cuda:N"):
            compute.resolve_device(bad)

    @no_cuda
    @pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
    def test_cuda_without_a_gpu_says_why(self, spec):
        with pytest.raises(EnvironmentUnavailable, match=f"--device {spec}: torch .* cannot use CUDA here"):
            compute.resolve_device(spec)

    def test_describe(self):
        assert compute.describe(torch.device("cpu")) == f"cpu ({usable_cpus()} usable cores)"


class TestCores:
    def test_affinity_bounds_the_count(self):
        code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
                "from evaluator.cores import usable_cpus; print(usable_cpus())")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
        assert out.stdout.strip() == "1"

    def test_never_more_than_the_machine(self):
        assert 1 <= usable_cpus() <= (os.cpu_count() or 1)

    @pytest.mark.parametrize("content, quota", [("150000 100000", 1.5), ("max 100000", None), ("50000 100000", 0.5),
                                                ("garbage", None)])
    def test_cgroup_v2_quota(self, tmp_path, content, quota):
        (tmp_path / "cpu.max").write_text(content + "\n")
        assert cgroup_cpu_quota(tmp_path) == quota
        if quota is not None:
            assert usable_cpus(tmp_path) == max(1, min(len(os.sched_getaffinity(0)), round(quota)))

    def test_cgroup_v1_quota(self, tmp_path):
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
        assert cgroup_cpu_quota(tmp_path) == 1.0 and usable_cpus(tmp_path) == 1
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
        assert cgroup_cpu_quota(tmp_path) is None

    def test_no_cgroup_files(self, tmp_path):
        assert cgroup_cpu_quota(tmp_path) is None


class TestOpenMPWaiting:
    def test_threads_are_the_usable_cores_unless_given(self):
        assert compute.cpu_threads() == usable_cpus() and compute.cpu_threads(3) == 3

    @pytest.mark.parametrize("busy, expected", [(0.0, "default"), (0.3, "default"), (0.6, "PASSIVE"), (2.0, "PASSIVE")])
    def test_idle_threads_sleep_only_beside_busy_processes(self, monkeypatch, busy, expected):
        from evaluator import cores

        monkeypatch.setattr(cores, "busy_elsewhere", lambda interval: busy)
        env = {}
        assert cores.settle_openmp(env) == expected
        assert env == ({"OMP_WAIT_POLICY": "PASSIVE"} if expected == "PASSIVE" else {})

    def test_a_users_setting_is_kept(self, monkeypatch):
        from evaluator import cores

        monkeypatch.setattr(cores, "busy_elsewhere", lambda interval: 5.0)
        assert cores.settle_openmp(env := {"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE" and env == {"OMP_WAIT_POLICY": "ACTIVE"}
        assert cores.settle_openmp({"GOMP_SPINCOUNT": "1000"}) == "GOMP_SPINCOUNT=1000"

    def test_a_spinning_neighbour_is_seen(self):
        from evaluator.cores import busy_elsewhere

        burner = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"])
        try:
            time.sleep(0.3)
            assert busy_elsewhere(1.0) >= 0.6
        finally:
            burner.kill()
            burner.wait()

    def test_proc_stat_is_read_per_cpu_of_our_affinity(self, tmp_path):
        from evaluator.cores import _busy_ticks

        stat = tmp_path / "stat"
        stat.write_text("cpu  10 0 10 100 5 0 0 0 0 0\n"
                        "cpu0 4 0 6 50 1 0 0 0 0 0\n"
                        "cpu1 6 0 4 50 4 0 0 0 0 0\n"
                        "intr 12345\n")
        assert _busy_ticks(stat, None) == 20 and _busy_ticks(stat, {1}) == 10
        assert _busy_ticks(tmp_path / "missing", None) is None


class TestExecution:
    def test_settings_come_back(self):
        threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
        with compute.execution(torch.device("cpu"), deterministic=not det, threads=1, seed=3):
            assert torch.get_num_threads() == 1
            assert torch.are_deterministic_algorithms_enabled() == (not det)
            a = torch.rand(3)
        with compute.execution(torch.device("cpu"), deterministic=det, threads=None, seed=3):
            assert torch.get_num_threads() == usable_cpus()
            b = torch.rand(3)
        assert torch.equal(a, b)  # the seed is applied inside
        assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det


class TestCompiled:
    def test_the_graph_computes_what_eager_does(self):
        lin = torch.nn.Linear(4, 3)
        fn = compute.compiled(lambda x: torch.relu(lin(x)).sum(-1), device=torch.device("cpu"), exact=True,
                              backend="eager")
        x = torch.randn(5, 4)
        assert torch.equal(fn(x), torch.relu(lin(x)).sum(-1))

    def test_a_failing_capture_falls_back_to_eager_once(self, caplog):
        calls = []

        def broken(x):
            calls.append("fast")
            raise RuntimeError("capture failed\nlong details")

        def eager(x):
            calls.append("eager")
            return x + 1

        fb = compute.Fallback(broken, eager, "training")
        with caplog.at_level(logging.WARNING, logger="evaluator.compute"):
            assert fb(1) == 2 and fb(2) == 3
        assert calls == ["fast", "eager", "eager"]
        assert fb.failed == "RuntimeError: capture failed"
        assert sum("graph capture failed" in r.message for r in caplog.records) == 1

    def test_use_compile(self):
        cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
        assert not compute.use_compile("auto", cpu) and compute.use_compile("auto", cuda)
        assert compute.use_compile("on", cpu) and not compute.use_compile("off", cuda)
        with pytest.raises(ConfigError):
            compute.use_compile("sometimes", cpu)
