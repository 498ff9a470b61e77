"""The cluster path without a cluster: slurm/ job scripts run with Slurm's environment and stand-ins for sbatch, srun,
scontrol, scancel and torchrun (tests/stubs/, each records its arguments), node-local staging, the offline install.

tests/test_slurm_cluster.py runs the same scripts on a real one-node Slurm (array and merge, time limit, requeue,
scancel, preemption, evaluation). The `test_stub_slurm_*` tests here check what one node without GPUs cannot show:
the exact launch arguments, several nodes and their rendezvous, GPUs, two training ranks under one torchrun."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import stage as shards_stage
from tests.conftest import REPO
from tests.shardkit import assert_same_shard_set, shard_files

STUBS = REPO / "tests" / "stubs"
SLURM = REPO / "slurm"
WNIDS = ["n01440764", "n01443537", "n01484850"]
TRAIN_PER_CLASS, VAL_PER_CLASS = 8, 2  # 30 images
SHARD_SIZE = 4  # inputs per shard: several shards per split, so that three array tasks each own some
NUM_TASKS = 3


def write_folders(raw: Path) -> None:
    """train/<wnid>/*.JPEG and val/<wnid>/*.JPEG: small images of different sizes and colours."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c, wnid in enumerate(WNIDS):
            folder = raw / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                h, w = rng.integers(64, 160, size=2)
                rgb = (rng.integers(0, 256, (h // 8, w // 8, 3)) // (c + 1)).astype(np.uint8)
                Image.fromarray(rgb).resize((w, h)).save(folder / f"{wnid}_{split}{i}.JPEG", quality=90)


def slurm_env(tmp: Path, **extra: str) -> dict:
    """This process's environment without any real Slurm job's variables, the stand-ins first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(PATH=f"{STUBS}{os.pathsep}{env['PATH']}", STUB_LOG=str(tmp / "calls.jsonl"),
               SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="1")
    env.update(extra)
    if "VENV" not in env:
        env["VENV"] = str(fake_venv(tmp))
    return env


def fake_venv(tmp: Path, torchrun: str | None = None) -> Path:
    """A VENV whose python is this interpreter and whose torchrun is the recording stand-in, or the Python source
    `torchrun` (slurm/torchrun_status.py runs it in its own process, as it does the real console script)."""
    venv = tmp / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    run = venv / "bin" / "torchrun"
    run.unlink(missing_ok=True)
    if torchrun is None:
        run.symlink_to(STUBS / "torchrun")
    else:
        run.write_text(torchrun)
        run.chmod(0o755)
    return venv


def calls(tmp: Path, cmd: str | None = None) -> list[dict]:
    log = tmp / "calls.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return [c for c in lines if cmd is None or c["cmd"] == cmd]


def run_script(script: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(SLURM / script)], env=env, cwd=env.get("SLURM_SUBMIT_DIR", REPO),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


# --- shellcheck ----------------------------------------------------------------------------------------------------

def test_job_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(REPO)) for p in [*SLURM.glob("*.sh"), *SLURM.glob("*.sbatch")])
    assert len(scripts) >= 6
    result = subprocess.run(["shellcheck", "--external-sources", *scripts], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --- shards: array tasks, merge ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same 30 images built twice: by three array tasks and a merge job (the scripts), and in one process."""
    tmp = tmp_path_factory.mktemp("hpc-shards")
    raw, array, single = tmp / "raw", tmp / "array", tmp / "single"
    write_folders(raw)
    env = slurm_env(tmp, RAW=str(raw), DATA=str(array), SHARDS_ARGS=f"--shard_size={SHARD_SIZE}")
    written, logs = [], []
    array_env = {"SLURM_ARRAY_JOB_ID": "500", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": str(NUM_TASKS - 1),
                 "SLURM_ARRAY_TASK_COUNT": str(NUM_TASKS)}
    # Task 2 as a rerun of that task alone would see it (`NUM_TASKS=3 sbatch --array=2`).
    rerun_env = {"SLURM_ARRAY_JOB_ID": "600", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_MAX": "2",
                 "SLURM_ARRAY_TASK_COUNT": "1", "NUM_TASKS": str(NUM_TASKS)}
    for task in range(NUM_TASKS):  # in an order other than 0..n-1: tasks are independent
        task = (task + 1) % NUM_TASKS
        before = shard_files(array)
        result = run_script("shards_array.sbatch", {
            **env, **(rerun_env if task == 2 else array_env), "SLURM_JOB_ID": str(500 + task),
            "SLURM_ARRAY_TASK_ID": str(task)})
        after = shard_files(array)
        assert all(after[name] == content for name, content in before.items()), "a task changed another's shard"
        written.append(set(after) - set(before))
        logs.append(result.stderr)
    assert not (array / "manifest.json").exists(), "array tasks must leave the manifest to the merge job"
    run_script("shards_merge.sbatch", {**env, "SLURM_JOB_ID": "501"})
    subprocess.run([sys.executable, "-m", "shards", "build", f"--raw={raw}", f"--out={single}",
                    f"--shard_size={SHARD_SIZE}", "--workers=1"], cwd=REPO, check=True, capture_output=True)
    return {"tmp": tmp, "raw": raw, "array": array, "single": single, "written": written, "logs": logs}


def test_array_tasks_write_disjoint_shards(built):
    written = built["written"]
    assert all(written), f"every task writes some shards: {written}"
    for i in range(NUM_TASKS):
        for j in range(i + 1, NUM_TASKS):
            assert not written[i] & written[j]
    assert set.union(*written) == set(shard_files(built["single"]))
    assert all("--num_tasks=3" in log and "--workers=1" in log for log in built["logs"]), "scripts echo their command"


def test_merge_equals_a_single_process_build(built):
    assert_same_shard_set(built["array"], built["single"])


def test_array_script_refuses_a_plain_job(tmp_path):
    env = slurm_env(tmp_path, RAW=str(tmp_path), DATA=str(tmp_path / "out"), SLURM_JOB_ID="7")
    result = subprocess.run(["bash", str(SLURM / "shards_array.sbatch")], env=env, cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: not an array task")


def submit_shards(tmp: Path, *options: str, **env: str) -> subprocess.CompletedProcess:
    env = slurm_env(tmp, RAW="raw-here", DATA=str(tmp / "shards"), **env)
    return subprocess.run([str(SLURM / "submit_shards.sh"), *options], env=env, cwd=tmp, capture_output=True,
                          text=True)


def test_submit_shards_chains_merge_after_array(tmp_path):
    result = submit_shards(tmp_path, "--account=proj42", "--partition=cpu", "--cpus-per-task=16", NUM_TASKS="3")
    assert result.returncode == 0, result.stderr
    array, merge = calls(tmp_path, "sbatch")
    assert array["args"] == ["--parsable", "--array=0-2", "--account=proj42", "--partition=cpu", "--cpus-per-task=16",
                             "slurm/shards_array.sbatch"]
    # A failed task cancels the merge job (an afterok never met would leave it pending for ever); it uses one CPU.
    assert merge["args"] == ["--parsable", "--dependency=afterok:1001", "--kill-on-invalid-dep=yes",
                             "--account=proj42", "--partition=cpu", "--cpus-per-task=16", "--cpus-per-task=1",
                             "slurm/shards_merge.sbatch"]
    # Relative paths are made absolute before the jobs (which start in the project directory) see them.
    assert array["env"]["RAW"] == str(tmp_path / "raw-here") and merge["env"]["DATA"] == str(tmp_path / "shards")
    assert array["env"]["NUM_TASKS"] == "3"
    assert "1001" in result.stdout and "1002" in result.stdout


def test_submit_shards_defaults_to_a_few_tasks_and_throttles_the_array_only(tmp_path):
    result = submit_shards(tmp_path, MAX_RUNNING="2")
    assert result.returncode == 0, result.stderr
    array, merge = calls(tmp_path, "sbatch")
    assert array["args"][1] == "--array=0-3%2" and array["env"]["NUM_TASKS"] == "4"
    assert not any(a.startswith("--array") for a in merge["args"])


def test_submit_shards_reruns_only_the_failed_tasks_then_a_new_merge(tmp_path):
    result = submit_shards(tmp_path, NUM_TASKS="8", TASKS="1,5-6")
    assert result.returncode == 0, result.stderr
    array, merge = calls(tmp_path, "sbatch")
    assert array["args"][1] == "--array=1,5-6" and array["env"]["NUM_TASKS"] == "8"  # the plan of all 8 tasks
    assert merge["args"][1] == "--dependency=afterok:1001"


@pytest.mark.parametrize("options, env, message", [
    (["--array=0-9%2"], {}, "the array is set by NUM_TASKS"),
    ([], {"TASKS": "1;rm"}, "TASKS=1;rm"),
    ([], {"MAX_RUNNING": "0"}, "MAX_RUNNING=0"),
])
def test_submit_shards_usage_errors(tmp_path, options, env, message):
    result = submit_shards(tmp_path, *options, **env)
    assert result.returncode == 2 and message in result.stderr
    assert not calls(tmp_path, "sbatch")


@pytest.mark.parametrize("script", ["train.sbatch", "eval.sbatch", "shards_array.sbatch", "shards_merge.sbatch"])
def test_job_submitted_outside_the_checkout_stops_with_one_line(tmp_path, script):
    env = slurm_env(tmp_path, SLURM_SUBMIT_DIR=str(tmp_path), DATA="d", RUN="r", RAW="r", SLURM_JOB_ID="9")
    env.pop("PROJECT", None)
    result = subprocess.run(["bash", str(SLURM / script)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: no {tmp_path}/slurm/common.sh: submit from the checkout or set PROJECT=<checkout>"
    assert "command not found" not in result.stderr


# --- staging to node-local disk ------------------------------------------------------------------------------------

def stage(data: Path, to: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", "stage", f"--data={data}", f"--to={to}", *args],
                          cwd=REPO, capture_output=True, text=True)


def test_stage_copies_and_verifies_then_skips_what_is_there(built, tmp_path):
    data, local = built["single"], tmp_path / "local"
    first = stage(data, local)
    assert first.returncode == 0, first.stderr
    assert shard_files(local) == shard_files(data)
    for name in ("manifest.json", "stats.npz"):
        assert (local / name).read_bytes() == (data / name).read_bytes()
    manifest = json.loads((data / "manifest.json").read_text())
    num_shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    assert f"{num_shards} copied" in first.stdout

    mtimes = {p: p.stat().st_mtime_ns for p in local.glob("*/*.tar")}
    second = stage(data, local)
    assert second.returncode == 0, second.stderr
    assert "0 copied" in second.stdout and f"{num_shards} already there" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in local.glob("*/*.tar")} == mtimes

    damaged = sorted(local.glob("train/*.tar"))[0]
    damaged.write_bytes(damaged.read_bytes()[:-1024])
    third = stage(data, local)
    assert third.returncode == 0, third.stderr
    assert "1 copied" in third.stdout and shard_files(local) == shard_files(data)


def test_stage_one_split(built, tmp_path):
    result = stage(built["single"], tmp_path / "local", "--splits=val")
    assert result.returncode == 0, result.stderr
    assert {Path(name).parts[0] for name in shard_files(tmp_path / "local")} == {"val"}


def test_stage_refuses_a_damaged_source_in_one_line(built, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(built["single"], data)
    victim = sorted(data.glob("val/*.tar"))[0]
    content = bytearray(victim.read_bytes())
    content[1000] ^= 0xFF
    victim.write_bytes(bytes(content))
    result = stage(data, tmp_path / "local")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert victim.name in result.stderr and "altered" in result.stderr
    assert not (tmp_path / "local" / "manifest.json").exists(), "an incomplete copy has no manifest"
    assert not (tmp_path / "local" / victim.relative_to(data)).exists()


def test_restaging_never_takes_files_from_a_reader(built, tmp_path, monkeypatch):
    """An evaluation job staging into the directory a training job reads: at every point of the second staging,
    the manifest the trainer loaded is there and every shard it lists is whole."""
    data, local = built["single"], tmp_path / "local"
    assert stage(data, local).returncode == 0
    manifest = (local / "manifest.json").read_bytes()
    entries = [e for split in json.loads(manifest)["splits"].values() for e in split["shards"]]
    damaged = local / entries[0]["file"]
    damaged.write_bytes(damaged.read_bytes()[:-1024])  # to be copied again while the reader goes on

    checks = []
    verify = shards_stage.verify_shard

    def reader_then_verify(path, entry):
        assert (local / "manifest.json").read_bytes() == manifest  # what the trainer's next epoch reads
        assert all(verify(local / e["file"], e) is None for e in entries[1:])
        checks.append(path)
        return verify(path, entry)

    monkeypatch.setattr(shards_stage, "verify_shard", reader_then_verify)
    shards_stage.stage_main([f"--data={data}", f"--to={local}", "--workers=1"])
    assert checks and shard_files(local) == shard_files(data)
    assert [p.name for p in local.iterdir() if p.name.startswith(".")] == [], "no partial copies left"


def test_stage_refuses_a_directory_holding_another_shard_set(built, tmp_path):
    other, local = tmp_path / "other", tmp_path / "local"
    shutil.copytree(built["single"], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["params"]["seed"] = 1  # as a rebuild with another seed would say
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert stage(built["single"], local).returncode == 0
    before = {p: p.read_bytes() for p in local.rglob("*") if p.is_file()}
    result = stage(other, local)
    assert result.returncode == 2 and "holds another shard set" in result.stderr
    assert {p: p.read_bytes() for p in local.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("args, message", [
    ((), "required"),
    (("--data={missing}", "--to={tmp}/local"), "no manifest.json"),
    (("--data={data}", "--to={tmp}/local", "--splits=test"), "no split 'test'"),
])
def test_stage_usage_errors(built, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "missing", tmp=tmp_path, data=built["single"]) for a in args]
    result = subprocess.run([sys.executable, "-m", "shards", "stage", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr


# --- training: launch arguments ------------------------------------------------------------------------------------

SHIELD = "--signals_to_handle=SIGINT,SIGHUP,SIGQUIT"  # slurm/torchrun_status.py: torchrun leaves SIGTERM alone


def test_stub_slurm_one_node_with_gpus_runs_torchrun_standalone_through_srun(tmp_path):
    env = slurm_env(tmp_path, DATA="/scratch/shards", RUN=str(tmp_path / "run"), SLURM_JOB_ID="4242",
                    SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="gpu017", SLURM_GPUS_ON_NODE="4",
                    SLURM_CPUS_PER_TASK="16", TRAIN_ARGS="--epochs=90 --batch_size=256")
    run_script("train.sbatch", env)
    # A job step on one node too: Slurm sends a preemption's SIGTERM to job steps, not to the job script.
    (srun,) = calls(tmp_path, "srun")
    assert srun["args"][:6] == ["--nodes=1", "--ntasks=1", "--ntasks-per-node=1", "--cpus-per-task=16",
                                "--kill-on-bad-exit=1", "slurm/launch_node.sh"]
    (torchrun,) = calls(tmp_path, "torchrun")
    assert torchrun["args"] == [SHIELD, "--standalone", "--nnodes=1", "--nproc_per_node=4", "--", "train.py",
                                "--data=/scratch/shards", f"--run={tmp_path / 'run'}", "--storage=network",
                                "--device=cuda", "--epochs=90", "--batch_size=256"]
    assert srun["args"][6:] == torchrun["args"][1:]
    assert not calls(tmp_path, "scontrol"), "one node needs no host list"


def test_stub_slurm_several_nodes_rendezvous_on_the_first(tmp_path):
    env = slurm_env(tmp_path, DATA="/scratch/shards", RUN="/scratch/run", SLURM_JOB_ID="4242",
                    SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="gpu[017-018,020]", SLURM_CPUS_PER_TASK="32",
                    CUDA_VISIBLE_DEVICES="0,1")
    run_script("train.sbatch", env)
    (srun,) = calls(tmp_path, "srun")
    assert srun["args"][:5] == ["--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--cpus-per-task=32",
                                "--kill-on-bad-exit=1"]
    assert srun["args"][5:6] == ["slurm/launch_node.sh"]
    (torchrun,) = calls(tmp_path, "torchrun")
    assert torchrun["args"][:8] == [SHIELD, "--nnodes=3", "--rdzv_id=4242", "--rdzv_backend=c10d",
                                    "--rdzv_endpoint=gpu017:29642", "--nproc_per_node=2", "--", "train.py"]
    assert srun["args"][6:] == torchrun["args"][1:]
    assert calls(tmp_path, "scontrol")[0]["args"] == ["show", "hostnames", "gpu[017-018,020]"]


def test_stub_slurm_several_nodes_each_stage_to_local_disk(built, tmp_path):
    local = tmp_path / "local"
    env = slurm_env(tmp_path, DATA=str(built["single"]), RUN="/scratch/run", STAGE_TO=str(local),
                    SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="n[1-2]")
    run_script("train.sbatch", env)
    stage_srun = calls(tmp_path, "srun")[0]["args"]
    assert stage_srun[:3] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert stage_srun[5:] == ["python", "-m", "shards", "stage", f"--data={built['single']}", f"--to={local}",
                              "--workers=1"]
    assert shard_files(local) == shard_files(built["single"])
    (torchrun,) = calls(tmp_path, "torchrun")
    assert f"--data={local}" in torchrun["args"] and "--storage=local" in torchrun["args"]


def test_stub_slurm_stage_to_job_is_a_directory_of_the_job_named_on_the_node(built, tmp_path):
    """STAGE_TO=job: under the job's TMPDIR as the compute node sets it, so no other job stages into it."""
    node_tmp = tmp_path / "node-tmp"
    node_tmp.mkdir()
    env = slurm_env(tmp_path, DATA=str(built["single"]), RUN=str(tmp_path / "run"), STAGE_TO="job",
                    TMPDIR=str(node_tmp), SLURM_JOB_ID="77", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="n1")
    result = run_script("train.sbatch", env)
    local = node_tmp / "alexnet-shards-77"
    assert f"--to={local}" in calls(tmp_path, "srun")[0]["args"]
    (torchrun,) = calls(tmp_path, "torchrun")
    assert f"--data={local}" in torchrun["args"]
    assert f"rm -rf -- {local}" in result.stderr and not local.exists(), "the run finished: the job's copy goes"
    # The evaluation job stages the val shards into its own directory (then finds no checkpoint to evaluate, fails,
    # and removes its copy).
    evaluation = subprocess.run(["bash", str(SLURM / "eval.sbatch")], env={**env, "SLURM_JOB_ID": "78",
                                "SLURM_TMPDIR": str(node_tmp / "slurm")}, cwd=REPO, capture_output=True, text=True)
    local = node_tmp / "slurm" / "alexnet-shards-78"
    assert f"--to={local} --splits=val" in evaluation.stderr and "2 copied" in evaluation.stdout
    assert evaluation.returncode != 0 and not local.exists()


@pytest.mark.parametrize("gpus, train_args, expected", [
    ({}, "", []),  # no GPU allocated: train.py chooses (the CPU here)
    ({"SLURM_GPUS_ON_NODE": "0"}, "", []),
    ({"SLURM_JOB_GPUS": "2,3"}, "", ["--device=cuda"]),
    ({"SLURM_GPUS_ON_NODE": "8"}, "--device=cpu", ["--device=cuda", "--device=cpu"]),  # the later option wins
])
def test_stub_slurm_trains_on_the_gpus_slurm_allocated_or_fails(tmp_path, gpus, train_args, expected):
    """With GPUs allocated, train.py gets --device=cuda: a job whose GPUs are not visible to torch fails at once
    instead of training on the CPU; the user's TRAIN_ARGS come after it and win."""
    env = slurm_env(tmp_path, DATA="/scratch/shards", RUN="/scratch/run", SLURM_JOB_ID="5", SLURM_JOB_NUM_NODES="1",
                    SLURM_JOB_NODELIST="n1", NPROC_PER_NODE="1", TRAIN_ARGS=train_args, **gpus)
    run_script("train.sbatch", env)
    (torchrun,) = calls(tmp_path, "torchrun")
    assert [a for a in torchrun["args"] if a.startswith("--device")] == expected


# --- training: stop signals -> checkpoint -> requeue -----------------------------------------------------------------

FAKE_TRAINER = '''"""Stands in for train.py: marks its start in RUN; on SIGUSR1 or SIGTERM it saves a "checkpoint" for
FAKE_SAVE_SECONDS, then exits FAKE_EXIT_ON_STOP; without a signal it finishes (status 0) after two minutes."""
import os, signal, sys, time
from pathlib import Path

run = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("--run=")))
stop = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))
run.mkdir(parents=True, exist_ok=True)
(run / "started").write_text(str(os.getpid()))
deadline = time.monotonic() + 120
while not stop and time.monotonic() < deadline:
    time.sleep(0.05)
if stop:
    time.sleep(float(os.environ["FAKE_SAVE_SECONDS"]))
    (run / "saved").write_text(stop[0])
    sys.exit(int(os.environ["FAKE_EXIT_ON_STOP"]))
'''


def real_torchrun(tmp: Path, trainer: Path | None = None) -> Path:
    """A VENV whose torchrun is torch's own, running `trainer` in place of train.py when given."""
    swap = f"sys.argv = [{str(trainer)!r} if a == 'train.py' else a for a in sys.argv]\n" if trainer else ""
    return fake_venv(tmp, torchrun=f"import sys\nfrom torch.distributed.run import main\n{swap}sys.exit(main())\n")


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, found by parent: torchrun starts its workers in sessions of their own."""
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


@contextlib.contextmanager
def running_job(script: str, env: dict, log: Path):
    """The job script in the background; afterwards nothing of it is left running."""
    with open(log, "w") as out:
        job = subprocess.Popen(["bash", str(SLURM / script)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield job
    finally:
        if job.poll() is None:
            for pid in [*descendants(job.pid), job.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            job.wait()


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (status {proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s:\n{log.read_text()}")
        time.sleep(0.2)


def fake_training_job(tmp: Path, **env: str) -> dict:
    trainer = tmp / "fake_train.py"
    trainer.write_text(FAKE_TRAINER)
    return slurm_env(tmp, DATA="/scratch/shards", RUN=str(tmp / "run"), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="1",
                     SLURM_JOB_NODELIST="localhost", NPROC_PER_NODE="2", VENV=str(real_torchrun(tmp, trainer)),
                     **env)


@pytest.mark.slow
@pytest.mark.parametrize("exit_on_stop, job_status, requeued", [(75, 75, True), (0, 0, False), (3, 1, False)])
def test_stub_slurm_two_ranks_usr1_near_the_limit_requeues_on_75_only(tmp_path, exit_on_stop, job_status, requeued):
    """The job script passes SIGUSR1 to srun (here: launch_node.sh itself), launch_node.sh to the trainers, through a
    real torchrun. 75 (stopped, checkpoint saved) requeues; 0 (the run finished: the signal came after its last
    check) and a failure (torchrun reports it as 1) do not."""
    env = fake_training_job(tmp_path, FAKE_SAVE_SECONDS="0", FAKE_EXIT_ON_STOP=str(exit_on_stop))
    run, log = tmp_path / "run", tmp_path / "job.out"
    with running_job("train.sbatch", env, log) as job:
        wait_for(lambda: (run / "started").exists(), 120, "the trainer's start", job, log)
        time.sleep(1)  # both ranks
        job.send_signal(signal.SIGUSR1)
        job.wait(timeout=120)
    output = log.read_text()
    assert job.returncode == job_status, output
    assert (run / "saved").read_text() == "SIGUSR1", output
    assert [c["args"] for c in calls(tmp_path, "scontrol")] == ([["requeue", "4242"]] if requeued else []), output
    assert not calls(tmp_path, "scancel"), "srun passes SIGUSR1 on: no need to signal every process of the job"
    if exit_on_stop == 0:
        assert "the run finished before the trainer saw the signal: not requeueing" in output


@pytest.mark.slow
def test_stub_slurm_two_ranks_sigterm_to_the_job_step_leave_the_trainer_time_to_save(tmp_path):
    """Preemption: Slurm sends SIGTERM to every process of the job step, not to the job script. Passed on by
    torchrun, it would be followed by SIGKILL after torchrun's shutdown timeout (1 s here, 30 s by default); torchrun
    ignores it, so the trainers' 4 s save completes. The job ends with 75 and leaves the requeue to Slurm."""
    env = fake_training_job(tmp_path, FAKE_SAVE_SECONDS="4", FAKE_EXIT_ON_STOP="75",
                            TORCH_ELASTIC_SHUTDOWN_TIMEOUT="1")
    run, log = tmp_path / "run", tmp_path / "job.out"
    with running_job("train.sbatch", env, log) as job:
        wait_for(lambda: (run / "started").exists(), 120, "the trainer's start", job, log)
        time.sleep(1)
        for pid in descendants(job.pid):  # the job step: srun's task (launch_node.sh) and everything below it
            os.kill(pid, signal.SIGTERM)
        job.wait(timeout=120)
    output = log.read_text()
    assert job.returncode == 75, output
    assert (run / "saved").read_text() == "SIGTERM", output
    assert not calls(tmp_path, "scontrol"), output
    assert "training stopped early (SIGTERM" in output


# --- offline install -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_wheelhouse_then_offline_setup(tmp_path):
    """`make wheelhouse` (index access), then `make setup WHEELHOUSE=...` in a new venv with no index at all."""
    wheelhouse, venv = tmp_path / "wheelhouse", tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    download = subprocess.run(["make", "wheelhouse", f"WHEELHOUSE={wheelhouse}"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=1800)
    assert download.returncode == 0, download.stdout[-3000:] + download.stderr[-3000:]
    wheels = sorted(p.name for p in wheelhouse.iterdir())
    assert any(w.startswith("torch-") for w in wheels) and any(w.startswith("setuptools-") for w in wheels)
    offline = {**env, "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull}  # not even this machine's local indexes
    install = subprocess.run(["make", "setup", f"VENV={venv}", f"WHEELHOUSE={wheelhouse}"], cwd=REPO, env=offline,
                             capture_output=True, text=True, timeout=1800)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch, nvidia.dali, shards, config"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
