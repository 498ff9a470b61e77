"""The --key=value configuration every entry point uses."""
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import pytest

from config import parse_config, save_config
from runtime import UsageError
from tests.conftest import REPO


@dataclass
class Example:
    lr: float = 0.01  # learning rate per 128 images
    epochs: int = 90  # passes over the training set
    device: Literal["cpu", "cuda"] = "cpu"  # where the model runs
    compile: bool = False  # torch.compile the model
    run: str = "runs/x"  # output directory
    limit: int | None = None  # stop after this many steps (none: no limit)


def test_defaults_and_typed_overrides():
    cfg = parse_config(Example, ["--lr=0.1", "--epochs=3", "--device=cuda", "--compile", "--limit=5"])
    assert cfg == Example(lr=0.1, epochs=3, device="cuda", compile=True, limit=5)
    assert isinstance(cfg.lr, float) and isinstance(cfg.epochs, int)
    assert parse_config(Example, []) == Example()
    assert parse_config(Example, ["--compile=false", "--limit=none"]).limit is None
    assert parse_config(Example, ["--", "--epochs=3"]).epochs == 3  # torchrun ... script.py -- --key=value


@pytest.mark.parametrize("argv, words", [
    (["--nope=1"], "unknown option --nope"),
    (["--epochs=three"], "--epochs=three: expected int"),
    (["--device=tpu"], "expected one of cpu, cuda"),
    (["--compile=maybe"], "expected true or false"),
    (["--lr"], "--lr needs a value"),
    (["lr=3"], "unexpected argument"),
])
def test_bad_options_are_usage_errors(argv, words):
    with pytest.raises(UsageError, match=words):
        parse_config(Example, argv)


def test_help_lists_fields_with_comments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(Example, ["--help"], description="Example tool.")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Example tool." in out
    assert "--lr=0.01" in out and "learning rate per 128 images" in out
    assert "--limit=None" in out and "stop after this many steps" in out


def test_saved_config_round_trips(tmp_path):
    cfg = parse_config(Example, ["--epochs=7"])
    save_config(cfg, tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["epochs"] == 7


def test_usage_error_is_one_line_and_exit_2():
    code = ("from dataclasses import dataclass\n"
            "from config import parse_config\nfrom runtime import run_main\n"
            "@dataclass\nclass C:\n    a: int = 1  # a\n"
            "run_main(lambda argv: parse_config(C, argv), ['--b=2'])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown option --b (see --help for the 1 known options)"]
