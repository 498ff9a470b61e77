"""The one timing method every row uses, and what is recorded next to it (machine, memory).

`measure({name: work, ...})`: each `work(n)` does n units of work (batches, training steps, whole commands) and
returns the images it processed. A warm-up runs a first unit (pipelines fill their queues, workers start, cuDNN
picks its algorithms, torch.compile and FFCV compile), then more until they have taken a repeat's share of the time;
their pace sets the units per repeat so that each repeat lasts about `seconds / repeats`. Then `repeats` timed
repeats, the works interleaved repeat by repeat so that a change in the machine's load hits them alike. A repeat is
timed on the host clock after the device has finished its queued work (torch.cuda.synchronize), so GPU work still
queued is inside it. The figure is the median images/s over the repeats, shown with the lowest and highest. Beside
it, the CPU time per image of this process and every process it started (workers included; a shared machine's load
distorts it less than the wall clock), and of the calling thread alone: on a GPU that thread also drives the
training step.
"""
import contextlib
import os
import platform
import resource
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from runtime import available_cpus

REPO = Path(__file__).resolve().parents[1]
MIB = 2 ** 20


@dataclass
class Rate:
    """images/s: the median over the timed repeats, and their lowest and highest."""
    median: float
    low: float
    high: float
    repeats: int
    units_per_repeat: int
    cpu_ms_per_image: float  # CPU time of this process and its descendants per image (median over the repeats)
    caller_ms_per_image: float  # CPU time of the calling thread per image (median over the repeats)
    memory: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"images_per_s": self.median, "low": self.low, "high": self.high, "repeats": self.repeats,
                "units_per_repeat": self.units_per_repeat, "cpu_ms_per_image": self.cpu_ms_per_image,
                "caller_ms_per_image": self.caller_ms_per_image,
                **self.memory}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(works: dict, *, seconds: float, repeats: int, device=torch.device("cpu"),
            warmup_units: int = 2) -> dict[str, Rate]:
    """{name: Rate} of each `work(n) -> images` (see the module docstring); `warmup_units`: at least this many
    units of warm-up; 0: none and one unit per repeat, for a unit that is a whole pass over a split and warms up
    before its work is returned."""
    span = seconds / repeats
    units = {name: 1 for name in works} if warmup_units == 0 else {}
    for name, work in works.items():
        if warmup_units == 0:
            break
        work(1)  # the first unit compiles, autotunes and fills queues: it does not set the pace
        done, elapsed = 1, 0.0
        while done < warmup_units or elapsed < span:
            sync(device)
            start = time.perf_counter()
            work(1)
            sync(device)
            elapsed += time.perf_counter() - start
            done += 1
        units[name] = max(1, round(span / (elapsed / (done - 1))))
    rates, cpu, caller = ({name: [] for name in works} for _ in range(3))
    memory = {name: {} for name in works}
    for _ in range(repeats):
        for name, work in works.items():
            with track_peak(memory[name], device):
                sync(device)
                start_tree, start_thread = tree_cpu_seconds(), time.thread_time()  # not inside the timed span
                start = time.perf_counter()
                images = work(units[name])
                sync(device)
                elapsed = time.perf_counter() - start
                caller[name].append(1000 * (time.thread_time() - start_thread) / images)
                cpu[name].append(1000 * (tree_cpu_seconds() - start_tree) / images)
                rates[name].append(images / elapsed)
    return {name: Rate(statistics.median(r), min(r), max(r), repeats, units[name], statistics.median(cpu[name]),
                       statistics.median(caller[name]), memory[name]) for name, r in rates.items()}


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process, of every living process descending from it (Linux /proc), and
    of the children it has waited for (a row's commands, which end within the span)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, seconds = {}, {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # ended while being read
            parents[int(entry.name)] = int(fields[1])
            seconds[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    waited = resource.getrusage(resource.RUSAGE_CHILDREN)
    mine, total = os.getpid(), waited.ru_utime + waited.ru_stime
    for pid, cpu in seconds.items():
        ancestor = pid
        while ancestor not in (mine, 0, 1) and ancestor in parents:
            ancestor = parents[ancestor]
        total += cpu if ancestor == mine else 0.0
    return total


def endless(loader):
    while True:
        yield from loader


def batches_work(batches):
    """work(n) for an endless iterator of (images, labels, ...): read n batches, return their images."""
    def work(n: int) -> int:
        return sum(next(batches)[0].shape[0] for _ in range(n))
    return work


# ---------------------------------------------------------------------------------------------------- memory
@contextlib.contextmanager
def track_peak(memory: dict, device: torch.device):
    """Raise `memory`'s peaks to those of the block: this process's resident set (its high-water mark reset first
    where Linux allows) and, on a GPU, torch's peak allocation and the device's memory in use (DALI's pools too)."""
    try:  # Linux: "5" resets VmHWM to the current RSS, so each row gets its own peak
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    peaks = {"host_rss_peak_mib": host_rss_peak() / MIB}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        peaks["gpu_torch_peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        peaks["gpu_device_used_mib"] = (total - free) / MIB
    for key, value in peaks.items():
        memory[key] = max(memory.get(key, 0.0), value)


def host_rss_peak() -> int:
    """Bytes: VmHWM from /proc (resettable), else ru_maxrss (the whole life of the process)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------------- machine
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def git_revision() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+modified" if dirty else "") if head else None


def hardware(device: torch.device) -> dict:
    """What ran the benchmark: CPU, cores, memory, GPU, library versions, code revision."""
    from PIL import features

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    info = {"host": socket.gethostname(), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "cpus_usable": available_cpus(), "memory_gib": round(memory, 1), "platform": platform.platform(),
            "gpu": None, "git": git_revision(),
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
                         "libjpeg_turbo": features.version("libjpeg_turbo"),
                         **{name: package_version(name) for name in (
                             "nvidia-dali-cuda130", "nvidia-dali-cuda120", "pillow", "webdataset", "ffcv")}}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2 ** 30, 1),
                       "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version(), "driver": nvidia_driver()}
    return info


def nvidia_driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
