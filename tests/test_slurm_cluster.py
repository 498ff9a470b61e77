"""slurm/ on a real Slurm: a private one-node cluster (munged, slurmctld, slurmd) that this module starts on this
machine, runs the job scripts on the built-in sample, and stops again.

Skipped, with the reason, where Slurm cannot start: `slurm-wlm` and `munge` not installed (`apt-get install slurm-wlm
munge`; .ci/run does it), not root (slurmd starts jobs as their user), or a daemon that does not come up. What one
node cannot show (several nodes, srun on many hosts, GPUs) stays in tests/test_hpc.py, with stand-ins for Slurm.

The cluster is this host with its CPUs (select/cons_tres, JobRequeue=1), its own ports, state, spool, logs and munge
key under a temporary folder; jobs see it through SLURM_CONF. Two settings differ from Slurm's defaults so that the
requeue tests take seconds instead of minutes (docs/HPC.md): cred_expire=5 and a scheduler pass every second.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.shardkit import assert_same_shard_set, shard_files

SLURM = REPO / "slurm"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo")
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])  # the daemons live in sbin
# A requeued job may start again after cred_expire + 1 s (120 s by default; below 5 Slurm refuses the value and
# falls back to 120), then at the next scheduler pass (sched_interval 60 s, bf_interval 30 s by default).
CRED_EXPIRE_S = 5
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
         "DEADLINE"}
SHARD_SIZE = 50  # inputs per shard: 8 train and 2 val shards of the sample, so that each of 4 array tasks has some
NUM_TASKS = 4
# With 1 CPU per job, a step of 4 images took 0.84 s on an idle 2-core Xeon VM: the first two epochs (about 90 s
# with start-up and validation) outlast the time-limit test's warning, 30-60 s after the start.
STEPS_PER_EPOCH = 40

SLURM_CONF = """\
ClusterName=alexnet-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/{proctrack}
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proctrack() -> str:
    """linuxproc (process tree) unless this Slurm lacks it; no cgroup plugin: containers often have no usable cgroup."""
    plugins = Path("/usr/lib/x86_64-linux-gnu/slurm-wlm")
    return "pgid" if plugins.is_dir() and not (plugins / "proctrack_linuxproc.so").exists() else "linuxproc"


@dataclass
class Cluster:
    root: Path
    env: dict  # for the client commands and, through sbatch (--export=ALL), for the jobs
    node_tmp: Path  # the jobs' TMPDIR: where STAGE_TO=job copies

    def run(self, *command: str) -> str:
        result = subprocess.run(command, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout

    def sbatch(self, script: str, *options: str, **env: str) -> int:
        result = subprocess.run(["sbatch", "--parsable", f"--output={self.root}/jobs/%x-%j.out", *options,
                                 str(SLURM / script)], env={**self.env, **env}, cwd=REPO, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.split(";")[0])

    def jobs(self, job_id: int) -> list[dict]:
        """`scontrol show job` as dictionaries: one, or one per task of an array job."""
        out = self.run("scontrol", "--oneliner", "show", "job", str(job_id))
        return [dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def job(self, job_id: int) -> dict:
        (job,) = self.jobs(job_id)
        return job

    def log(self, job_id: int) -> str:
        path = Path(self.job(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, job_id: int, until, what: str, timeout: float = 900) -> dict:
        """Poll the job until `until(job)`; fails with its state and log after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: no {what} after {timeout:.0f} s: {job.get('JobState')}, "
                                     f"{job.get('Reason')}\n{self.log(job_id)[-3000:]}")
            time.sleep(0.5)

    def wait_ended(self, job_id: int, timeout: float = 900) -> dict:
        return self.wait(job_id, lambda job: job["JobState"] in ENDED, "end", timeout)


def start_daemon(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_daemons(daemons: list[subprocess.Popen]) -> None:
    """Only the processes this module started, last started first."""
    for daemon in reversed(daemons):
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def wait_for_idle_node(cluster: Cluster, daemons: list[subprocess.Popen], timeout: float = 60) -> str | None:
    """None once the node takes jobs; else why not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [d.args[0] for d in daemons if d.poll() is not None]
        if dead:
            return f"{', '.join(dead)} exited"
        result = subprocess.run(["sinfo", "--noheader", "--format=%T"], env=cluster.env, capture_output=True,
                                text=True)
        if result.stdout.strip() == "idle":
            return None
        time.sleep(0.5)
    return f"the node is not idle after {timeout:.0f} s"


def log_tails(root: Path) -> str:
    return "\n".join(f"--- {p.name}:\n" + "\n".join(p.read_text(errors="replace").splitlines()[-5:])
                     for p in sorted(root.glob("log/*")) + sorted(root.glob("munge/*.log")))


@pytest.fixture(scope="session")
def cluster():
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=SBIN_PATH) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)}): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("a private Slurm needs root here: slurmd starts the jobs as their user")
    # munged wants every directory above its socket searchable by all: not pytest's private tmp folders.
    root = Path(tempfile.mkdtemp(prefix="slurm-test-"))
    root.chmod(0o755)
    for folder in ("munge", "state", "spool", "log", "jobs", "node-tmp"):
        (root / folder).mkdir()
    (root / "munge" / "munge.key").write_bytes(os.urandom(1024))
    (root / "munge" / "munge.key").chmod(0o600)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, root=root, ctld_port=free_port(), slurmd_port=free_port(),
                                      cred_expire=CRED_EXPIRE_S, proctrack=proctrack(), cpus=os.cpu_count()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(SLURM_CONF=str(conf), PATH=SBIN_PATH, VENV=sys.prefix, TMPDIR=str(root / "node-tmp"))
    cluster = Cluster(root, env, root / "node-tmp")
    munge = root / "munge"
    daemons = [start_daemon([shutil.which("munged", path=SBIN_PATH), "--foreground", f"--key-file={munge}/munge.key",
                             f"--socket={munge}/munge.socket", f"--pid-file={munge}/munged.pid",
                             f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
                            root / "log" / "munged.out", env)]
    try:
        for _ in range(100):
            if (munge / "munge.socket").exists() or daemons[0].poll() is not None:
                break
            time.sleep(0.1)
        for daemon in ("slurmctld", "slurmd"):
            daemons.append(start_daemon([shutil.which(daemon, path=SBIN_PATH), "-D"], root / "log" / f"{daemon}.out",
                                        env))
        why_not = wait_for_idle_node(cluster, daemons)
        if why_not:
            pytest.skip(f"Slurm did not start: {why_not}\n{log_tails(root)}")
        yield cluster
        subprocess.run(["scancel", f"--user={os.getuid()}"], env=env, capture_output=True)
        for _ in range(120):
            if not subprocess.run(["squeue", "--noheader"], env=env, capture_output=True, text=True).stdout.strip():
                break
            time.sleep(0.5)
    finally:
        stop_daemons(daemons)
        shutil.rmtree(root, ignore_errors=True)


# --- the built-in sample -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_raw(cluster, tmp_path_factory) -> Path:
    """`make sample`: the built-in sample in the official archive layout."""
    raw = tmp_path_factory.mktemp("slurm-sample") / "raw"
    subprocess.run([sys.executable, "-m", "shards", "sample", f"--out={raw}"], cwd=REPO, check=True,
                   capture_output=True)
    return raw


@pytest.fixture(scope="module")
def sample_shards(sample_raw, tmp_path_factory) -> Path:
    """What `make shards RAW=<sample> ARGS=--shard_size=50` writes, in one process outside Slurm."""
    data = tmp_path_factory.mktemp("slurm-shards") / "data"
    subprocess.run([sys.executable, "-m", "shards", "build", f"--raw={sample_raw}", f"--out={data}",
                    f"--shard_size={SHARD_SIZE}"], cwd=REPO, check=True, capture_output=True)
    return data


# --- shards: the array and the merge -------------------------------------------------------------------------------

def submit_shards(cluster: Cluster, raw: Path, data: Path, **env: str) -> tuple[int, int]:
    """slurm/submit_shards.sh as docs/HPC.md shows it; (array job, merge job)."""
    result = subprocess.run([str(SLURM / "submit_shards.sh"), "--cpus-per-task=1", "--time=00:20:00",
                             f"--output={cluster.root}/jobs/%x-%j.out"],
                            env={**cluster.env, "RAW": str(raw), "DATA": str(data), "NUM_TASKS": str(NUM_TASKS),
                                 "SHARDS_ARGS": f"--shard_size={SHARD_SIZE}", **env},
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    found = re.search(r"shard array job (\d+) .*merge job (\d+)", result.stdout)
    assert found, result.stdout
    return int(found[1]), int(found[2])


def wait_for_array(cluster: Cluster, array: int, timeout: float = 600) -> dict[int, dict]:
    """Every task of the array job once all have ended, by task number."""
    deadline = time.monotonic() + timeout
    while True:
        records = cluster.jobs(array)  # the pending tasks share one record: ArrayTaskId=2-3
        if all(t["ArrayTaskId"].isdigit() and t["JobState"] in ENDED for t in records):
            return {int(t["ArrayTaskId"]): t for t in records}
        assert time.monotonic() < deadline, f"array job {array} still running after {timeout:.0f} s: {records}"
        time.sleep(0.5)


def test_shard_array_and_merge_write_what_make_shards_writes(cluster, sample_raw, sample_shards, tmp_path):
    data = tmp_path / "shards"
    array, merge = submit_shards(cluster, sample_raw, data)
    tasks = wait_for_array(cluster, array)
    assert sorted(tasks) == list(range(NUM_TASKS))
    assert {t["JobState"] for t in tasks.values()} == {"COMPLETED"}, tasks
    job = cluster.wait_ended(merge)
    assert job["JobState"] == "COMPLETED", cluster.log(merge)
    assert "+ python -m shards verify" in cluster.log(merge)
    assert_same_shard_set(data, sample_shards)


def test_a_failed_array_task_cancels_the_merge_and_TASKS_reruns_only_it(cluster, sample_raw, sample_shards, tmp_path):
    """Task 2's node fails its site setup: the merge job is cancelled, not left pending (--kill-on-invalid-dep); the
    rerun with TASKS=2 runs that task and a new merge, and leaves the other tasks' shards as they were."""
    data, broken = tmp_path / "shards", tmp_path / "node-2-broken"
    broken.touch()
    site_setup = tmp_path / "site.sh"
    site_setup.write_text(f'if [[ ${{SLURM_ARRAY_TASK_ID:-}} == 2 && -e {broken} ]]; then\n'
                          '    echo "site setup failed on this node" >&2\n    exit 1\nfi\n')
    array, merge = submit_shards(cluster, sample_raw, data, SITE_SETUP=str(site_setup))
    tasks = wait_for_array(cluster, array)
    assert {i: t["JobState"] for i, t in tasks.items()} == {0: "COMPLETED", 1: "COMPLETED", 2: "FAILED",
                                                           3: "COMPLETED"}
    job = cluster.wait_ended(merge, timeout=60)
    assert job["JobState"] == "CANCELLED", job
    assert not (data / "manifest.json").exists()
    before = {name: (data / name).stat().st_mtime_ns for name in shard_files(data)}
    assert before and set(before) < set(shard_files(sample_shards))

    broken.unlink()  # the node is repaired
    array, merge = submit_shards(cluster, sample_raw, data, SITE_SETUP=str(site_setup), TASKS="2")
    tasks = wait_for_array(cluster, array)
    assert {i: t["JobState"] for i, t in tasks.items()} == {2: "COMPLETED"}
    assert cluster.wait_ended(merge)["JobState"] == "COMPLETED", cluster.log(merge)
    assert_same_shard_set(data, sample_shards)
    assert all((data / name).stat().st_mtime_ns == mtime for name, mtime in before.items()), "a shard was rewritten"


# --- training: time limit, requeue, scancel, preemption -----------------------------------------------------------

def train_args(epochs: int) -> str:
    # One CPU per job (SLURM_CPUS_PER_TASK=1): the reference run trains beside the interrupted one on this node, with
    # the same thread counts, so that the two compute bit for bit the same.
    return (f"--device=cpu --preset=demo --batch_size=4 --epochs={epochs} --max_steps_per_epoch={STEPS_PER_EPOCH} "
            "--log_interval=1")


TRAIN_OPTIONS = ("--gpus-per-node=0", "--cpus-per-task=1", "--time=00:30:00")


def metric_rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def last_step(run: Path) -> int:
    return max((r["step"] for r in metric_rows(run)), default=0)


def wait_for_training(cluster: Cluster, job_id: int, run: Path, after_step: int) -> None:
    """Until the trainer of `job_id` has logged a step after `after_step` (its stop handlers are in place)."""
    cluster.wait(job_id, lambda job: job["JobState"] in ENDED or last_step(run) > after_step,
                 f"training step after {after_step}")
    assert cluster.job(job_id)["JobState"] == "RUNNING", cluster.log(job_id)


@pytest.fixture(scope="module")
def training(cluster, sample_shards, tmp_path_factory) -> dict:
    """One run directory through every way a job stops, next to a reference run that is never stopped:
    1. epochs 1-2 under a 2-minute limit with --signal=B:USR1@60 and STAGE_TO=job: the job checkpoints, requeues
       itself and resumes (its limit raised while it waits, so that the restart runs to the end);
    2. epoch 3: `scancel --signal=TERM` stops it with a checkpoint (status 75, not requeued);
    3. the same command again: resumed, then preempted by `scontrol requeue`; Slurm requeues it, it resumes and
       finishes.
    The reference run's evaluation (eval.sbatch, STAGE_TO=job) waits for it with --dependency=afterok."""
    tmp = tmp_path_factory.mktemp("slurm-train")
    run, reference = tmp / "run", tmp / "reference"
    jobs, seen = {}, {}
    data = {"DATA": str(sample_shards)}
    jobs["reference"] = cluster.sbatch("train.sbatch", *TRAIN_OPTIONS, **data, RUN=str(reference),
                                       TRAIN_ARGS=train_args(epochs=3))
    # Its evaluation starts when it has finished, on the other CPU, while the stopped run goes on.
    jobs["eval"] = cluster.sbatch("eval.sbatch", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:30:00",
                                  f"--dependency=afterok:{jobs['reference']}", "--kill-on-invalid-dep=yes", **data,
                                  RUN=str(reference), STAGE_TO="job")

    # Slurm sends the warning at one of its time-limit checks, every 30 s, up to 30 s before it is due (here: 30-60 s
    # after the start; with --time=1 it came at the first check, before the trainer could be ready).
    limited = cluster.sbatch("train.sbatch", "--gpus-per-node=0", "--cpus-per-task=1", "--time=2",
                             "--signal=B:USR1@60", **data, RUN=str(run), STAGE_TO="job", TRAIN_ARGS=train_args(2))
    jobs["time_limit"] = limited
    job = cluster.wait(limited, lambda j: j["JobState"] in ENDED or int(j["Restarts"]) > 0, "requeue")
    seen["copy_while_requeued"] = (cluster.node_tmp / f"alexnet-shards-{limited}").is_dir()
    seen["checkpoint_at_requeue"] = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["step"] \
        if (run / "checkpoint.pt").exists() else None
    if job["JobState"] not in ENDED:
        cluster.run("scontrol", "update", f"JobId={limited}", "TimeLimit=30")
    cluster.wait_ended(limited)
    seen["copy_after_the_end"] = (cluster.node_tmp / f"alexnet-shards-{limited}").exists()

    end_of_epoch_2 = last_step(run)
    stopped = cluster.sbatch("train.sbatch", *TRAIN_OPTIONS, **data, RUN=str(run), TRAIN_ARGS=train_args(3))
    jobs["scancel_term"] = stopped
    wait_for_training(cluster, stopped, run, end_of_epoch_2)
    cluster.run("scancel", "--signal=TERM", str(stopped))
    cluster.wait_ended(stopped)
    seen["scancel_stop_step"] = last_step(run)

    preempted = cluster.sbatch("train.sbatch", *TRAIN_OPTIONS, **data, RUN=str(run), TRAIN_ARGS=train_args(3))
    jobs["preempted"] = preempted
    wait_for_training(cluster, preempted, run, seen["scancel_stop_step"])
    cluster.run("scontrol", "requeue", str(preempted))
    cluster.wait_ended(preempted)
    cluster.wait_ended(jobs["reference"])
    return {"run": run, "reference": reference, "jobs": jobs, "seen": seen}


def job_and_log(cluster: Cluster, training: dict, name: str) -> tuple[dict, str]:
    job_id = training["jobs"][name]
    return cluster.job(job_id), cluster.log(job_id)


def test_time_limit_signal_checkpoints_requeues_and_the_restart_resumes_and_finishes(cluster, training):
    job, log = job_and_log(cluster, training, "time_limit")
    assert "slurm: time limit near" in log, log
    assert "the run finished before the trainer saw the signal" not in log, "too little training to be stopped"
    assert "preempted: SIGUSR1" in log and f"slurm: requeueing job {training['jobs']['time_limit']}" in log, log
    assert "resuming from" in log, log
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "start 2 on 1 node(s)" in log and "start 3" not in log, "a finished run is not requeued again"
    assert 0 < training["seen"]["checkpoint_at_requeue"] < 2 * STEPS_PER_EPOCH


def test_stage_to_job_is_kept_while_the_job_requeues_itself_and_removed_when_it_ends(cluster, training):
    job, log = job_and_log(cluster, training, "time_limit")
    assert training["seen"]["copy_while_requeued"], "the staged copy is kept for the restart"
    assert re.search(r"0 copied", log), "the restart on the same node found its copy"
    assert not training["seen"]["copy_after_the_end"], log


def test_scancel_signal_term_stops_with_a_checkpoint_and_no_requeue(cluster, training):
    job, log = job_and_log(cluster, training, "scancel_term")
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("FAILED", "75:0", "0"), log
    assert "preempted: SIGTERM" in log and "slurm: training stopped early" in log, log
    assert 2 * STEPS_PER_EPOCH < training["seen"]["scancel_stop_step"] < 3 * STEPS_PER_EPOCH


def test_preemption_by_scontrol_requeue_resumes_and_finishes(cluster, training):
    job, log = job_and_log(cluster, training, "preempted")
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "preempted: SIGTERM" in log, log
    assert log.count("resuming from") == 2, log


def without_timing(row: dict) -> dict:
    """A metrics row less its wall-clock figures (seconds, rates, shares, ETAs), which no two runs share."""
    return {k: v for k, v in row.items()
            if not (k.endswith("_s") or k in ("images_per_s", "data_wait_share", "peak_gpu_mem_gib"))}


def test_the_run_after_all_of_it_equals_one_never_stopped(cluster, training):
    """One metrics row per step and per epoch, the same losses and errors as the reference run, and the same final
    weights bit for bit (on the CPU)."""
    job, log = job_and_log(cluster, training, "reference")
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "0"), log
    rows, reference = metric_rows(training["run"]), metric_rows(training["reference"])
    steps = [r["step"] for r in rows if "epoch" not in r]
    assert steps == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert [r["epoch"] for r in rows if "epoch" in r] == [1, 2, 3]
    assert list(map(without_timing, rows)) == list(map(without_timing, reference))
    final, expected = (torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
                       for run in (training["run"], training["reference"]))
    assert final["step"] == expected["step"] == 3 * STEPS_PER_EPOCH
    assert final["model"].keys() == expected["model"].keys()
    for name, tensor in final["model"].items():
        assert torch.equal(tensor, expected["model"][name]), name


# --- evaluation ----------------------------------------------------------------------------------------------------

def test_eval_of_the_finished_run_stages_to_job_and_removes_the_copy(cluster, training):
    run, job_id = training["reference"], training["jobs"]["eval"]
    job = cluster.wait_ended(job_id)
    log = cluster.log(job_id)
    assert job["JobState"] == "COMPLETED", log
    assert f"--to={cluster.node_tmp}/alexnet-shards-{job_id}" in log and "2 copied" in log, log
    results = json.loads((run / "eval-val.json").read_text())  # next to the checkpoint
    assert results["n"] == 100 and results["checkpoint"] == str(run / "checkpoint.pt")  # the sample's val split
    assert not (cluster.node_tmp / f"alexnet-shards-{job_id}").exists(), "the job's copy outlived it"


def test_a_failed_eval_removes_its_staged_copy_too(cluster, sample_shards, tmp_path):
    job_id = cluster.sbatch("eval.sbatch", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:10:00",
                            DATA=str(sample_shards), CKPT=str(tmp_path / "none.pt"), STAGE_TO="job")
    job = cluster.wait_ended(job_id)
    log = cluster.log(job_id)
    assert job["JobState"] == "FAILED" and "2 copied" in log, log
    assert not (cluster.node_tmp / f"alexnet-shards-{job_id}").exists(), log
