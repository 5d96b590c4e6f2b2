"""How many CPUs this process may use: the input pipelines' parallelism (tljob.data) and TensorFlow's thread
pools follow it.

In a pod with a CPU limit the kernel enforces it as a CFS quota, while every core of the node stays
schedulable: counting cores (what tf.data's AUTOTUNE does when its autotuner is off) then starts one parallel
call per node core, and the quota throttles all of them. The usable count is the smaller of the cores this
process may run on (its affinity, which cpusets narrow) and the quota rounded up.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v2 has one file; cgroup v1 mounts the cpu controller alone or together with cpuacct.
_V2_MAX = "cpu.max"
_V1_DIRS = ("cpu", "cpu,cpuacct")


@dataclass(frozen=True)
class CpuBudget:
    cores: int  # cores this process may be scheduled on
    quota: float | None  # the CFS quota in CPUs (quota / period); None when there is none

    @property
    def usable(self) -> int:
        if self.quota is None:
            return self.cores
        return max(1, min(self.cores, math.ceil(self.quota)))

    def describe(self) -> str:
        """'CPU quota 1.0 of 2 cores', or '2 cores, no CPU quota'."""
        cores = f"{self.cores} core{'' if self.cores == 1 else 's'}"
        if self.quota is None:
            return f"{cores}, no CPU quota"
        return f"CPU quota {round(self.quota, 2)} of {cores}"


def read_budget(cgroup_root: str | os.PathLike[str] = CGROUP_ROOT, cores: int | None = None) -> CpuBudget:
    """The budget from the cgroup files under `cgroup_root` (v2 first, then v1) and the affinity mask.

    A container sees its own cgroup at the root of these mounts (runc and containerd mount it there), so
    the files at the top are the container's limit. No file, or "max" / -1, means no quota.
    """
    if cores is None:
        cores = len(os.sched_getaffinity(0))
    root = Path(cgroup_root)
    v2 = root / _V2_MAX
    if v2.is_file():  # "max 100000" or "150000 100000"
        return CpuBudget(cores, _quota(v2, v2.read_text().split(), unlimited="max"))
    for name in _V1_DIRS:
        quota_file = root / name / "cpu.cfs_quota_us"
        if quota_file.is_file():  # "-1" or "150000", beside the period "100000"
            period = (root / name / "cpu.cfs_period_us").read_text()
            return CpuBudget(cores, _quota(quota_file, [quota_file.read_text().strip(), period.strip()],
                                           unlimited="-1"))
    return CpuBudget(cores, None)


def _quota(path: Path, fields: list[str], *, unlimited: str) -> float | None:
    """quota / period in CPUs from the file's [quota, period]; None for the unlimited value."""
    if fields[:1] == [unlimited]:
        return None
    try:
        quota, period = (int(f) for f in fields)
        return quota / period
    except (ValueError, ZeroDivisionError):
        # Not a format any kernel writes; the schedulable cores are then the best figure there is.
        log.warning("CPU quota: cannot read %s (%r): using the %d schedulable cores", path, " ".join(fields),
                    len(os.sched_getaffinity(0)))
        return None


@functools.cache
def budget() -> CpuBudget:
    """This process's budget, read once: a pod's limit does not change while it runs."""
    return read_budget()


def limit_tensorflow_threads() -> int | None:
    """Sizes TensorFlow's intra- and inter-op thread pools to the budget when a CPU quota narrows it; returns
    the size set, None when the pools keep TensorFlow's own sizes.

    TensorFlow sizes both pools by the schedulable cores; under a quota their threads then run in short
    bursts and wait out the rest of each CFS period. In a container limited to 1 CPU on 2 cores this raised
    the dry run's steady-state images/s 1.7x (bench/README.md, "CPU quota"). Call it before TensorFlow's
    runtime starts (the first op, the strategy).
    """
    cpu = budget()
    if cpu.usable >= cpu.cores:
        return None
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(cpu.usable)
    tf.config.threading.set_inter_op_parallelism_threads(cpu.usable)
    return cpu.usable
