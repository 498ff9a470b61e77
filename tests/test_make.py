"""The Makefile as a user meets it: bad input gives one `error:` line and a non-zero exit, never a traceback."""
import subprocess

import pytest

from tests.conftest import REPO


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr


def test_setup_is_idempotent_and_fast():
    first = make("setup")
    assert first.returncode == 0, first.stderr
    again = make("setup")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout


@pytest.mark.parametrize("raw, words", [
    ("/nonexistent/imagenet", "not a directory"),
    (str(REPO / "tests"), "no ImageNet layout recognised"),
])
def test_shards_with_a_bad_raw(tmp_path, raw, words):
    assert_one_line_error(make("shards", f"RAW={raw}", f"DATA={tmp_path / 'data'}"), words)


@pytest.mark.parametrize("target, variables, words", [
    ("train", ["DATA=/nonexistent/shards", "RUN={tmp}/run"], "/nonexistent/shards"),
    ("eval", ["DATA=/nonexistent/shards", "CKPT={tmp}/checkpoint.pt"], "/nonexistent/shards"),
    ("bench", ["DATA=/nonexistent/shards", "ARGS=--out={tmp}/bench.json"], "/nonexistent/shards"),
    ("verify", ["DATA=/nonexistent/shards"], "/nonexistent/shards"),
])
def test_targets_with_a_missing_data_dir(tmp_path, target, variables, words):
    result = make(target, *[v.format(tmp=tmp_path) for v in variables])
    assert_one_line_error(result, words)
