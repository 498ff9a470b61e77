"""The GPU first-run kit (scripts/gpu_check.sh, make_gpu_payload.sh, gpu_rehearse.sh; docs/GPU.md) without a GPU
and without its payload: shellcheck, each stage's bookkeeping (the notes table, the log archive, the deadline, a
damaged part), and the documented calls against the remote runner's limits. `make gpu-rehearse` runs the rest."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPTS = ["scripts/gpu_check.sh", "scripts/make_gpu_payload.sh", "scripts/gpu_rehearse.sh"]
COMMAND_LIMIT = 2000  # characters in one remote command
CALL_LIMIT_S = 600  # seconds one remote command may run
FILES_BACK = 8  # files that come back from $OUT


def run_stage(tmp: Path, stage: int, *args: str, **env: str) -> subprocess.CompletedProcess:
    out = tmp / f"out{stage}"
    shutil.rmtree(out, ignore_errors=True)  # the runner empties $OUT before each call
    variables = {**os.environ, "OUT": str(out), "KIT_WORK": str(tmp / "work"), "PY": sys.executable,
                 "CUDA_VISIBLE_DEVICES": "", **env}
    variables.pop("REHEARSAL", None)
    return subprocess.run(["bash", "scripts/gpu_check.sh", str(stage), *args], cwd=REPO, env=variables,
                          capture_output=True, text=True, timeout=300)


def rows(out: Path) -> dict[str, str]:
    """{step: result} of the notes table (the last row of each step)."""
    table = [line.split(" | ") for line in (out / "notes.md").read_text().splitlines() if line.startswith("| ")]
    return {cells[1]: cells[2] for cells in table[2:]}


def test_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", *SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_stages_without_a_gpu_leave_the_table_and_one_archive(tmp_path):
    second = run_stage(tmp_path, 2)
    assert second.returncode == 0, second.stdout + second.stderr
    table = rows(tmp_path / "out2")
    assert table["model alone, compiled, batch 128"] == "skipped: no GPU"
    assert table["stage 2"].startswith("ended after")
    with tarfile.open(tmp_path / "out2" / "logs-stage2.tar.gz") as logs:
        assert logs.getnames() and all(name.startswith("stage2") for name in logs.getnames())
    # Stage 3 starts from the rows of the stages before it; a deadline already past skips every step that runs.
    third = run_stage(tmp_path, 3, DEADLINE_S="1")
    table = rows(tmp_path / "out3")
    assert "model alone, compiled, batch 128" in table
    assert table["DALI"].startswith("skipped: deadline")
    assert table["pytest -m gpu"] == "skipped: no GPU"
    assert third.returncode == 0, third.stdout + third.stderr
    for out in ("out2", "out3"):
        files = [p for p in (tmp_path / out).rglob("*") if p.is_file()]
        assert len(files) <= FILES_BACK and all(re.fullmatch(r"[\w.-]+", p.name) for p in files)
    assert "| stage | step | result | s |" in third.stdout  # the table ends the output


def test_a_damaged_part_is_reported_and_not_stashed(tmp_path):
    part = tmp_path / "p2"
    part.mkdir()
    (part / "dali-common.tar.xz.01").write_bytes(b"arrived")
    (part / "SHA256SUMS").write_text(f"{'0' * 64}  ./dali-common.tar.xz.01\n")
    result = run_stage(tmp_path, 2, str(part))
    assert result.returncode == 1
    assert "damaged" in rows(tmp_path / "out2")["part p2"]
    assert not (tmp_path / "work" / "parts" / "p2").exists()


def documented_calls() -> list[tuple[int, str, list[str], int]]:
    """(stage, command, carry, timeout_s) of each row of docs/GPU.md's table of calls."""
    text = (REPO / "docs" / "GPU.md").read_text()
    found = re.findall(r"^\| (\d) \| `([^`]+)` \| `(\[[^`]*\])` \| (\d+) \|", text, re.MULTILINE)
    return [(int(stage), command, json.loads(carry), int(timeout)) for stage, command, carry, timeout in found]


def test_documented_calls_fit_the_runner():
    calls = documented_calls()
    assert [stage for stage, *_ in calls] == [1, 2, 3]
    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    deadlines = {int(s): int(d) for s, d in re.findall(r"(\d)\) DEADLINE_S=\$\{DEADLINE_S:-(\d+)\}", script)}
    for stage, command, carry, timeout in calls:
        assert len(command) <= COMMAND_LIMIT
        assert f"scripts/gpu_check.sh {stage} .dev/gpu/p{stage}" in command
        assert carry == [f".dev/gpu/p{stage}"]
        assert deadlines[stage] + 20 <= timeout <= CALL_LIMIT_S  # the stage ends itself before the runner stops it
        ignored = subprocess.run(["git", "check-ignore", "-q", carry[0]], cwd=REPO)
        assert ignored.returncode == 0, f"{carry[0]} must be ignored by git: only ignored paths are carried"
    assert sum(deadlines.values()) <= 11 * 60  # with start-up and pauses, inside 15 minutes of device time
