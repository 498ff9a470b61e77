"""The cluster path on one machine: slurm/ job scripts run with Slurm's environment and stand-ins for sbatch, srun,
scontrol, scancel and torchrun (tests/stubs/, each records its arguments), node-local staging, the offline install."""
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

from tests.conftest import REPO

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
    """A VENV whose python is this interpreter and whose torchrun is the recording stand-in (or `torchrun`)."""
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


def shard_files(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in sorted(data.glob("*/*")) if p.suffix in (".tar", ".idx")}


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
    array, single = built["array"], built["single"]
    assert (array / "manifest.json").read_bytes() == (single / "manifest.json").read_bytes()
    assert shard_files(array) == shard_files(single)
    with np.load(array / "stats.npz") as a, np.load(single / "stats.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            np.testing.assert_array_equal(a[name], b[name])


def test_array_script_refuses_a_plain_job(tmp_path):
    env = slurm_env(tmp_path, RAW=str(tmp_path), DATA=str(tmp_path / "out"), SLURM_JOB_ID="7")
    result = subprocess.run(["bash", str(SLURM / "shards_array.sbatch")], env=env, cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: not an array task")


def test_submit_shards_chains_merge_after_array(tmp_path):
    env = slurm_env(tmp_path, RAW="raw-here", DATA=str(tmp_path / "shards"), NUM_TASKS="3")
    result = subprocess.run([str(SLURM / "submit_shards.sh"), "--account=proj42", "--partition=cpu"], env=env,
                            cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    array, merge = calls(tmp_path, "sbatch")
    assert array["args"] == ["--parsable", "--array=0-2", "--account=proj42", "--partition=cpu",
                             "slurm/shards_array.sbatch"]
    assert merge["args"] == ["--parsable", "--dependency=afterok:1001", "--account=proj42", "--partition=cpu",
                             "slurm/shards_merge.sbatch"]
    # Relative paths are made absolute before the jobs (which start in the project directory) see them.
    assert array["env"]["RAW"] == str(tmp_path / "raw-here") and merge["env"]["DATA"] == str(tmp_path / "shards")
    assert array["env"]["NUM_TASKS"] == "3"
    assert "1001" in result.stdout and "1002" in result.stdout


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
    assert f"0 copied" in second.stdout and f"{num_shards} already there" in second.stdout
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

def test_train_one_node_runs_torchrun_standalone(tmp_path):
    env = slurm_env(tmp_path, DATA="/scratch/shards", RUN=str(tmp_path / "run"), SLURM_JOB_ID="4242",
                    SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="gpu017", SLURM_GPUS_ON_NODE="4",
                    TRAIN_ARGS="--epochs=90 --batch_size=256")
    run_script("train.sbatch", env)
    (torchrun,) = calls(tmp_path, "torchrun")
    assert torchrun["args"] == ["--standalone", "--nnodes=1", "--nproc_per_node=4", "--", "train.py",
                                "--data=/scratch/shards", f"--run={tmp_path / 'run'}", "--storage=network",
                                "--epochs=90", "--batch_size=256"]
    assert not calls(tmp_path, "srun") and not calls(tmp_path, "scontrol"), "one node needs neither"


def test_train_several_nodes_rendezvous_on_the_first(tmp_path):
    env = slurm_env(tmp_path, DATA="/scratch/shards", RUN="/scratch/run", SLURM_JOB_ID="4242",
                    SLURM_JOB_NUM_NODES="3", SLURM_JOB_NODELIST="gpu[017-018,020]", SLURM_CPUS_PER_TASK="32",
                    CUDA_VISIBLE_DEVICES="0,1")
    run_script("train.sbatch", env)
    (srun,) = calls(tmp_path, "srun")
    assert srun["args"][:5] == ["--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--cpus-per-task=32",
                                "--kill-on-bad-exit=1"]
    assert srun["args"][5:6] == ["slurm/launch_node.sh"]
    (torchrun,) = calls(tmp_path, "torchrun")
    assert torchrun["args"][:7] == ["--nnodes=3", "--rdzv_id=4242", "--rdzv_backend=c10d",
                                    "--rdzv_endpoint=gpu017:29642", "--nproc_per_node=2", "--", "train.py"]
    assert srun["args"][6:] == torchrun["args"]
    assert calls(tmp_path, "scontrol")[0]["args"] == ["show", "hostnames", "gpu[017-018,020]"]


def test_train_stages_to_local_disk_on_every_node(built, tmp_path):
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


# --- training: SIGUSR1 before the time limit -> checkpoint -> requeue -----------------------------------------------

def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen, output) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended (status {proc.returncode}) before {what}:\n{output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout:.0f} s:\n{output()}")
        time.sleep(0.5)


@pytest.mark.slow
def test_usr1_checkpoints_and_requeues_then_eval(built, tmp_path):
    run = tmp_path / "run"
    torchrun = f'#!/bin/bash\nexec "{sys.executable}" -m torch.distributed.run "$@"\n'
    env = slurm_env(tmp_path, DATA=str(built["single"]), RUN=str(run), SLURM_JOB_ID="4242",
                    SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost", NPROC_PER_NODE="1",
                    TRAIN_ARGS="--preset=demo --epochs=1000 --num_threads=1",
                    VENV=str(fake_venv(tmp_path, torchrun=torchrun)))
    log = open(tmp_path / "job.out", "w+")
    job = subprocess.Popen(["bash", str(SLURM / "train.sbatch")], env=env, cwd=REPO, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # train.py installs its handler right after writing config.json; a signal before that would be lost.
        wait_for(lambda: (run / "config.json").exists(), 240, "RUN/config.json", job,
                 lambda: (tmp_path / "job.out").read_text())
        time.sleep(5)
        job.send_signal(signal.SIGUSR1)
        job.wait(timeout=240)
    finally:
        if job.poll() is None:  # SIGTERM first: torchrun's workers run in sessions of their own, out of killpg's reach
            job.terminate()
            try:
                job.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    output = (tmp_path / "job.out").read_text()
    assert job.returncode == 0, output
    assert "preempted:" in output, output
    assert (run / "checkpoint.pt").is_file()
    assert [c["args"] for c in calls(tmp_path, "scontrol")] == [["requeue", "4242"]], output

    # The evaluation job takes that checkpoint as it is.
    result = run_script("eval.sbatch", {**env, "SLURM_JOB_ID": "4243", "EVAL_ARGS": "--num_threads=1"})
    assert "eval.py" in result.stderr and (run / "eval-val.json").is_file()


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
