"""How many CPU cores this process may really use (no torch here: the ONNX sandbox host asks too).

``os.cpu_count()`` counts the machine's cores, not ours: under taskset, a container's ``--cpus`` or a
cgroup quota, sizing thread pools from it oversubscribes the cores we have, and OpenMP threads that spin
while waiting for each other then make a 2-core run slower than a single thread.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_STAT = Path("/proc/stat")
# Idle OpenMP worker threads sleep instead of spinning: set before the OpenMP runtime loads (with torch).
QUIET_OPENMP = {"OMP_WAIT_POLICY": "PASSIVE"}
BUSY_THRESHOLD = 0.5  # cores kept busy by other processes above which OpenMP threads should not spin


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """Cores of this process's CPU affinity, capped by the cgroup's CPU quota when one is set (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota + 0.5)))
    return max(1, cores)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs granted by the cgroup (v2 ``cpu.max``, else v1 ``cfs_quota_us / cfs_period_us``); None: no limit."""
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def busy_elsewhere(interval: float = 0.25, proc_stat: Path = PROC_STAT) -> float:
    """Cores of our CPU affinity that *other* processes kept busy during ``interval`` seconds.

    Read from the per-CPU lines of /proc/stat, minus this process's own CPU time; 0.0 where /proc/stat
    cannot be read (not Linux), so the caller falls back to every usable core.
    """
    try:
        cpus = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        cpus = None
    first, ours = _busy_ticks(proc_stat, cpus), os.times()
    if first is None:
        return 0.0
    t0 = time.monotonic()
    time.sleep(interval)
    second, ours_after = _busy_ticks(proc_stat, cpus), os.times()
    elapsed = time.monotonic() - t0
    if second is None or elapsed <= 0:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = (second - first) / ticks
    own = (ours_after.user + ours_after.system) - (ours.user + ours.system)
    return max(0.0, (busy - own) / elapsed)


def _busy_ticks(proc_stat: Path, cpus: set[int] | None) -> int | None:
    """Non-idle clock ticks summed over ``cpus`` (all CPUs when None)."""
    try:
        lines = proc_stat.read_text().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values) - values[3] - values[4]
    return total


def settle_openmp(environ=os.environ, interval: float = 0.2) -> str:
    """Choose how idle OpenMP threads wait, before torch loads (the runtime reads it once, at load).

    Alone on its cores, GNU OpenMP's default (spin a while, then sleep) is the fastest: +15 % per
    SmolLM2 step over sleeping at once. Beside busy processes a spinning thread steals the core its
    partner waits for, and steps slow down 2x (SmolLM2) to 70x (tiny decoder); sleeping threads do not.
    So: passive when other processes keep our cores busy at the start, the default otherwise. A value
    the user set is kept. Returns what is in force ("default", "PASSIVE", ...); results never depend on it.
    """
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return environ.get("OMP_WAIT_POLICY") or f"GOMP_SPINCOUNT={environ['GOMP_SPINCOUNT']}"
    if busy_elsewhere(interval) >= BUSY_THRESHOLD:
        environ.update(QUIET_OPENMP)
        return QUIET_OPENMP["OMP_WAIT_POLICY"]
    return "default"
