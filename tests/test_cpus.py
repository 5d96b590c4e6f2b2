"""The CPUs a process may use, from fake cgroup trees (v1, v2, unlimited, none) and the real one."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tljob import cpus
from tljob.cpus import CpuBudget, read_budget


def v1(root: Path, folder: str, quota: str, period: str = "100000") -> Path:
    (root / folder).mkdir(parents=True)
    (root / folder / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (root / folder / "cpu.cfs_period_us").write_text(f"{period}\n")
    return root


def v2(root: Path, content: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(content)
    return root


@pytest.mark.parametrize("content,quota,usable", [
    ("150000 100000\n", 1.5, 2),  # rounded up: half a core still gets a call of its own
    ("100000 100000\n", 1.0, 1),
    ("50000 100000\n", 0.5, 1),  # never below one call
    ("800000 100000\n", 8.0, 4),  # a quota above the cores cannot use more than the cores
    ("max 100000\n", None, 4),
])
def test_cgroup_v2(tmp_path: Path, content: str, quota: float | None, usable: int) -> None:
    budget = read_budget(v2(tmp_path, content), cores=4)
    assert (budget.quota, budget.usable) == (quota, usable)


@pytest.mark.parametrize("folder", ["cpu", "cpu,cpuacct"])
def test_cgroup_v1_either_mount(tmp_path: Path, folder: str) -> None:
    budget = read_budget(v1(tmp_path, folder, "100000"), cores=2)
    assert budget == CpuBudget(cores=2, quota=1.0) and budget.usable == 1
    assert budget.describe() == "CPU quota 1.0 of 2 cores"
    unlimited = read_budget(v1(tmp_path / "other", folder, "-1"), cores=2)
    assert unlimited == CpuBudget(cores=2, quota=None) and unlimited.usable == 2
    assert unlimited.describe() == "2 cores, no CPU quota"


def test_v1_period_other_than_the_default(tmp_path: Path) -> None:
    assert read_budget(v1(tmp_path, "cpu", "75000", period="50000"), cores=8).quota == 1.5


def test_v2_wins_over_v1_and_no_cgroup_means_no_quota(tmp_path: Path) -> None:
    both = v2(v1(tmp_path / "both", "cpu", "100000"), "300000 100000")
    assert read_budget(both, cores=8).quota == 3.0
    assert read_budget(tmp_path / "nothing", cores=3) == CpuBudget(cores=3, quota=None)


def test_unreadable_quota_says_so_and_counts_cores(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tljob.cpus"):
        budget = read_budget(v2(tmp_path, "lots\n"), cores=2)
    assert budget.quota is None and budget.usable == 2
    assert "cpu.max" in caplog.text and "'lots'" in caplog.text


def test_this_process_budget_counts_its_affinity() -> None:
    budget = cpus.budget()
    assert budget.cores == len(os.sched_getaffinity(0))
    assert 1 <= budget.usable <= budget.cores
    assert cpus.budget() is budget  # read once


LIMIT = """
import json, sys
import tljob
from tljob import cpus
cpus.budget = lambda: cpus.CpuBudget(cores=4, quota=float(sys.argv[1]) if sys.argv[1] != "none" else None)
size = cpus.limit_tensorflow_threads()
import tensorflow as tf
print("RESULT " + json.dumps([size, tf.config.threading.get_intra_op_parallelism_threads(),
                              tf.config.threading.get_inter_op_parallelism_threads()]))
"""


@pytest.mark.parametrize("quota,expected", [("1.0", [1, 1, 1]), ("2.5", [3, 3, 3]), ("none", [None, 0, 0])])
def test_tensorflow_thread_pools_follow_a_quota_only(quota: str, expected: list) -> None:
    # A fresh process: the pools can only be sized before TensorFlow's runtime starts. 0: TensorFlow's own choice.
    out = subprocess.run([sys.executable, "-c", LIMIT, quota], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.split("RESULT ", 1)[1]) == expected
