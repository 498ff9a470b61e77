"""runtime.py from the outside: the CPU share a process may use, and the thread pools limited to it."""
import os
import subprocess
import sys

from runtime import available_cpus, cgroup_cpu_quota
from tests.conftest import REPO


def test_the_tightest_cgroup_quota_on_the_way_to_the_root_counts(tmp_path):
    for folder, quota in (("", "max 100000"), ("job", "250000 100000"), ("job/step", "max 100000")):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / folder / "cpu.max").write_text(quota + "\n")
    membership = tmp_path / "cgroup"
    membership.write_text("0::/job/step\n")
    assert cgroup_cpu_quota(tmp_path, membership) == 2
    membership.write_text("0::/\n")
    assert cgroup_cpu_quota(tmp_path, membership) is None
    membership.write_text("4:memory:/somewhere\n")  # cgroup v1 only: no quota read
    assert cgroup_cpu_quota(tmp_path, membership) is None


def test_slurm_allocation_caps_the_cpus(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")
    assert available_cpus() == 1
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "100000")
    assert available_cpus() == len(os.sched_getaffinity(0))


def test_limit_threads_caps_blas_and_torch_in_this_process_and_its_children():
    code = ("import numpy, torch, runtime, os, threadpoolctl; runtime.limit_threads(1); "
            "print(torch.get_num_threads(), max(p['num_threads'] for p in threadpoolctl.threadpool_info()), "
            "os.environ['OPENBLAS_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1", "1"]
