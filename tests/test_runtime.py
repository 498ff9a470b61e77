"""runtime.py from the outside: the CPU share a process may use, the thread pools limited to it, files written whole,
and users' errors in one line."""
import os
import subprocess
import sys

import pytest

from runtime import UsageError, atomic_path, available_cpus, cgroup_cpu_quota, usage_errors
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


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "curves.png"
    with atomic_path(target) as tmp:
        assert not tmp.match("*.png")  # no reader looking for `*.png` (or `*.tar`) takes it for a finished file
        assert tmp.name.startswith("curves.png.tmp-") and tmp.name.endswith(f"-{os.getpid()}")  # its writer's own
        tmp.write_text("first")
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise KeyError("killed mid-write")
    assert target.read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def test_usage_errors_are_one_line_with_advice():
    with pytest.raises(UsageError, match=r"^no manifest in x; --resume=false starts over$"):
        with usage_errors("; --resume=false starts over"):
            raise FileNotFoundError("no manifest in x")
    with pytest.raises(KeyError):  # a bug is not the user's error: it keeps its traceback
        with usage_errors():
            raise KeyError("bug")
