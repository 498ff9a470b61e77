"""The GPU first-run kit (scripts/gpu_check.sh, make_gpu_payload.sh, gpu_rehearse.sh; docs/GPU.md) without a GPU
and without its payload: shellcheck, the deadline that comes from the call, the order of the measurements, the
probes, what a stage says after a release, the log archive of a killed stage, a damaged part, and the documented
calls against the remote runner's limits. `make gpu-rehearse` runs the rest."""
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = ["scripts/gpu_check.sh", "scripts/make_gpu_payload.sh", "scripts/gpu_rehearse.sh"]
COMMAND_LIMIT = 2000  # characters in one remote command
CALL_LIMIT_S = 600  # seconds one remote command may run
FILES_BACK = 8  # files that come back from $OUT
MEASUREMENTS = [  # the last call's rows, in the order of value (issue 26)
    "model alone, eager, batch 256", "model alone, compiled, batch 256", "pipeline alone, default hw_decoder_load",
    "end to end, eager", "end to end, compiled", "pytest -m gpu", "pipeline alone, hw_decoder_load=0",
    "pipeline alone, hw_decoder_load=1", "hardware decoder", "train.py --compile", "eval.py on its checkpoint",
    "pipeline alone, hw_decoder_load=0.5", "not run here: DDP", "not run here: --mean=channel"]


def kit_env(tmp: Path, stage: int, **env: str) -> dict:
    out = tmp / f"out{stage}"
    shutil.rmtree(out, ignore_errors=True)  # the runner empties $OUT before each call
    variables = {**os.environ, "OUT": str(out), "KIT_WORK": str(tmp / "work"), "PY": sys.executable,
                 "CUDA_VISIBLE_DEVICES": "", "SHM_NEEDED_MIB": "1", **env}
    if "REHEARSAL" not in env:
        variables.pop("REHEARSAL", None)
    return variables


def run_stage(tmp: Path, stage: int, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/gpu_check.sh", str(stage), *args], cwd=REPO, env=kit_env(tmp, stage, **env),
                          capture_output=True, text=True, timeout=300)


def rows(out: Path) -> list[tuple[str, str]]:
    """(step, result) of every row of the notes table, in order."""
    table = [line.split(" | ") for line in (out / "notes.md").read_text().splitlines() if line.startswith("| ")]
    return [(cells[1], cells[2]) for cells in table[2:]]


def make_part(folder: Path, files: dict[str, bytes]) -> Path:
    """A payload part as make_gpu_payload.sh writes one: its files and their SHA256SUMS."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    sums = "".join(f"{hashlib.sha256(data).hexdigest()}  ./{name}\n" for name, data in sorted(files.items()))
    (folder / "SHA256SUMS").write_text(sums)
    return folder


def tree_piece(name: str) -> bytes:
    """One compressed piece of a DALI tree: a tar holding one file."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo(name)
        tar.addfile(info, io.BytesIO(b""))
    return lzma.compress(raw.getvalue())


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("arguments", [[], ["soon"]])
def test_the_last_stage_takes_its_deadline_from_the_call(tmp_path, arguments):
    result = run_stage(tmp_path, 3, ".dev/gpu/p3", *arguments)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "SECONDS" in result.stderr
    assert not (tmp_path / "out3").exists() or not any((tmp_path / "out3").iterdir())


def test_measurements_run_most_valuable_first(tmp_path):
    # A machine after stages 1 and 2 (every part unpacked, the data and DALI installed), then the last call with a
    # deadline of 0 s: every measurement is listed, skipped, in its order.
    work = tmp_path / "work"
    (work / "done").mkdir(parents=True)
    for part in ("p1", "p2", "p3"):
        (work / "done" / f"part-{part}").write_text("")
    for step in ("shards", "data-x1", "dali", "model-alone-compiled-batch-256"):
        (work / "done" / step).touch()
    result = run_stage(tmp_path, 3, str(make_part(tmp_path / "p3", {"dali-tree.002.xz": tree_piece("c")})), "0",
                       REHEARSAL="1")
    steps = [step for step, _ in rows(tmp_path / "out3")]
    measured = steps[steps.index("part p3") + 1:-1]
    assert len(measured) == len(MEASUREMENTS), measured
    assert all(step.startswith(expected) for step, expected in zip(measured, MEASUREMENTS)), measured
    assert rows(tmp_path / "out3")[-1][1].endswith("the call's SECONDS argument)")
    assert result.returncode == 0, result.stdout + result.stderr


def test_without_cuda_the_first_stage_records_torchs_error_and_stops(tmp_path):
    result = run_stage(tmp_path, 1, str(tmp_path / "p1"))
    table = rows(tmp_path / "out1")
    assert table[0][0] == "/dev/shm" and "MiB free" in table[0][1]  # logged first
    assert table[1][0] == "hardware JPEG decoder" and "NVIDIA_DRIVER_CAPABILITIES=" in table[1][1]
    assert not table[1][1].startswith("failed")  # absent is a finding, not a failure
    cuda = dict(table)["CUDA"]
    assert cuda.startswith("failed") and "CUDA unusable" in cuda and "Torch not compiled with CUDA" in cuda
    assert [step for step, _ in table[-2:]] == ["CUDA", "stage 1"]  # nothing after it
    assert result.returncode == 1
    assert "CUDA unusable" in (tmp_path / "out1" / "failures.md").read_text()


def test_the_first_stage_probes_before_it_unpacks(tmp_path):
    result = run_stage(tmp_path, 1, str(tmp_path / "p1"), REHEARSAL="1", INSTALL_S="0")  # every step skipped
    assert [step for step, _ in rows(tmp_path / "out1")] == [
        "/dev/shm", "hardware JPEG decoder", "GPU", "CUDA", "part p1", "wheels", "shards", "torch.compile probe",
        "stage 1"]
    assert result.returncode == 0, result.stdout + result.stderr


def test_after_a_release_the_last_stage_names_the_stages_to_call_again(tmp_path):
    part = make_part(tmp_path / "p3", {"dali-tree.002.xz": tree_piece("c")})
    started = time.monotonic()
    result = run_stage(tmp_path, 3, str(part), "500")
    table = dict(rows(tmp_path / "out3"))
    assert "missing p1 p2" in table["earlier stages"] and "stage 1, stage 2, the last of them with SECONDS" in \
        table["earlier stages"]
    assert table["part p3"].startswith("p3: 2 files")  # kept for the calls that follow
    assert table["measurements"].startswith("failed: not started")
    assert result.returncode == 1
    assert time.monotonic() - started < 60  # it ends at once: the device time goes to the restart


def test_after_a_release_the_second_stage_keeps_its_part_and_asks_for_the_first(tmp_path):
    result = run_stage(tmp_path, 2, str(make_part(tmp_path / "p2", {"dali-tree.001.xz": tree_piece("b")})))
    table = dict(rows(tmp_path / "out2"))
    assert "missing p1" in table["earlier stages"] and "call again stage 1, then the stages still to come" in \
        table["earlier stages"]
    assert (tmp_path / "work" / "tree" / "dali-tree.001").is_file()  # decompressed, ready for the last stage
    assert "measurements" not in table  # no SECONDS: nothing is measured
    ended = int(re.match(r"ended after (\d+) s \(deadline 45 s", table["stage 2"]).group(1))
    assert ended <= 45  # an install stage ends itself well inside its call's timeout
    assert result.returncode == 1


def test_a_damaged_part_is_reported_and_not_kept(tmp_path):
    part = make_part(tmp_path / "p2", {"dali-tree.001.xz": tree_piece("b")})
    (part / "dali-tree.001.xz").write_bytes(b"arrived")
    result = run_stage(tmp_path, 2, str(part))
    assert result.returncode == 1
    assert "damaged" in dict(rows(tmp_path / "out2"))["part p2"]
    assert not (tmp_path / "work" / "parts" / "p2").exists()
    assert not (tmp_path / "work" / "done" / "part-p2").exists()


def test_a_killed_stage_still_returns_the_logs_of_its_finished_steps(tmp_path):
    # A Python that takes a minute to start: the CUDA probe runs until the stage is killed as the runner kills a
    # command at its limit (SIGKILL, no exit handler).
    slow = tmp_path / "slow-python"
    slow.write_text(f"#!/bin/sh\nsleep 60\nexec {sys.executable} \"$@\"\n")
    slow.chmod(0o755)
    stage = subprocess.Popen(["bash", "scripts/gpu_check.sh", "1", str(tmp_path / "p1")], cwd=REPO,
                             env=kit_env(tmp_path, 1, PY=str(slow)), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    archive, notes = tmp_path / "out1" / "logs-stage1.tar.gz", tmp_path / "out1" / "notes.md"
    try:
        for _ in range(100):  # the GPU step (no nvidia-smi here: failed) has ended when its row is written
            if notes.exists() and "| GPU |" in notes.read_text() and archive.exists():
                break
            time.sleep(0.2)
        time.sleep(1)
    finally:
        os.killpg(stage.pid, signal.SIGKILL)
        stage.wait()
    assert "| stage 1 |" not in notes.read_text()  # killed before its end
    with tarfile.open(archive) as logs:
        assert {"stage1/dev-shm.log", "stage1/gpu.log"} <= set(logs.getnames())
    assert "stage 1: GPU" in (tmp_path / "out1" / "failures.md").read_text()
    files = [p for p in (tmp_path / "out1").rglob("*") if p.is_file()]
    assert len(files) <= FILES_BACK and all(re.fullmatch(r"[\w.-]+", p.name) for p in files)


def documented_calls() -> list[tuple[int, str, list[str], str]]:
    """(stage, command, carry, timeout_s) of each row of docs/GPU.md's table of calls."""
    text = (REPO / "docs" / "GPU.md").read_text()
    found = re.findall(r"^\| (\d) \| `([^`]+)` \| `(\[[^`]*\])` \| ([^|]+) \|", text, re.MULTILINE)
    return [(int(stage), command, json.loads(carry), timeout.strip()) for stage, command, carry, timeout in found]


def test_documented_calls_fit_the_runner():
    calls = documented_calls()
    assert [stage for stage, *_ in calls] == [1, 2, 3]
    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    install_s = int(re.search(r"INSTALL_S=\$\{INSTALL_S:-(\d+)\}", script).group(1))
    for stage, command, carry, timeout in calls:
        assert len(command) <= COMMAND_LIMIT
        assert f"bash scripts/gpu_check.sh {stage} .dev/gpu/p{stage}" in command
        assert carry == [f".dev/gpu/p{stage}"]
        ignored = subprocess.run(["git", "check-ignore", "-q", carry[0]], cwd=REPO)
        assert ignored.returncode == 0, f"{carry[0]} must be ignored by git: only ignored paths are carried"
        if stage < 3:  # the stage ends itself well before the runner stops it
            assert install_s + 15 <= int(timeout) <= 2 * install_s
        else:  # the deadline comes from the previous reply; the runner's limit leaves the stage time to end
            assert command.endswith(" SECONDS") and timeout == "SECONDS + 30"
    limit = re.search(r"SECONDS = min\(budget_left_s - (\d+), (\d+)\)", (REPO / "docs" / "GPU.md").read_text())
    assert limit and int(limit.group(2)) + 30 <= CALL_LIMIT_S and int(limit.group(1)) >= 45
