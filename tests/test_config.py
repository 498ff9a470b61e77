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


def run_config_script(body: str, argv: list[str]) -> subprocess.CompletedProcess:
    """A script parsing `argv` into dataclass C (`body`: its lines after `class C:`) under run_main."""
    code = ("from dataclasses import dataclass\n"
            "from config import parse_config\nfrom runtime import UsageError, run_main\n"
            f"@dataclass\nclass C:\n{body}"
            f"run_main(lambda argv: parse_config(C, argv), {argv!r})\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)


def test_usage_error_is_one_line_and_exit_2():
    result = run_config_script("    a: int = 1  # a\n", ["--b=2"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown option --b (see --help for the 1 known options)"]


@dataclass
class Grouped:
    verbose: bool = False  # print more (declared before any group: listed under "other")
    # --- data ---
    data: str = "data/sample"  # shard directory
    max_steps_per_epoch: int = 0  # a long option name that sets the width of the option column
    # --- schedule ---
    epochs: int = 90  # passes over the training set
    compile: bool = True  # torch.compile the model


def test_key_space_value_parses_like_key_equals_value():
    spaced = parse_config(Example, ["--lr", "0.1", "--epochs", "3", "--device", "cuda", "--limit", "none"])
    assert spaced == parse_config(Example, ["--lr=0.1", "--epochs=3", "--device=cuda", "--limit=none"])
    assert parse_config(Example, ["--lr", "-0.5"]).lr == -0.5  # a negative number is a value, not an option
    assert parse_config(Example, ["--run", "runs/y", "--compile"]) == Example(run="runs/y", compile=True)


def test_flags_switch_on_with_the_name_and_off_with_no():
    assert parse_config(Grouped, ["--verbose", "--no-compile"]) == Grouped(verbose=True, compile=False)
    assert parse_config(Grouped, ["--no_compile"]).compile is False
    assert parse_config(Grouped, ["--compile=false"]).compile is False  # the older spelling still reads
    assert parse_config(Grouped, ["--no-compile", "--compile"]).compile is True  # the last one wins


@pytest.mark.parametrize("argv, message", [
    (["--epoch=3"], "unknown option --epoch (did you mean --epochs?)"),
    (["--epoch", "3"], "unknown option --epoch (did you mean --epochs?)"),
    (["--max-step-per-epoch=3"], "unknown option --max_step_per_epoch (did you mean --max_steps_per_epoch?)"),
    (["--no-epochs"], "--no-epochs: --epochs is not a true/false option; write --epochs=value"),
    (["--compile", "false"], "--compile takes no separate value ('false'): write --compile, --no-compile or "
                             "--compile=true|false"),
    (["--epochs"], "--epochs needs a value: --epochs=... or --epochs ..."),
    (["--epochs", "--compile"], "--epochs needs a value: --epochs=... or --epochs ..."),
    (["--zzz=1"], "unknown option --zzz (see --help for the 5 known options)"),
])
def test_near_misses_name_the_nearest_option(argv, message):
    with pytest.raises(UsageError) as error:
        parse_config(Grouped, argv)
    assert str(error.value) == message


def test_help_is_grouped_in_aligned_columns(capsys):
    with pytest.raises(SystemExit):
        parse_config(Grouped, ["--help"])
    lines = capsys.readouterr().out.splitlines()
    headings = [line for line in lines if line.endswith(":") and " " not in line]
    assert headings == ["data:", "schedule:", "other:"]  # in the order of the source; ungrouped fields last
    rows = {line.split()[0]: line for line in lines if line.startswith("  --")}
    assert set(rows) == {"--verbose", "--data=data/sample", "--max_steps_per_epoch=0", "--epochs=90", "--compile"}
    assert "--verbose (off)" in rows["--verbose"] and "--compile (on)" in rows["--compile"]
    comments = {"--verbose": "print more", "--data=data/sample": "shard directory",
                "--max_steps_per_epoch=0": "a long option", "--epochs=90": "passes over", "--compile": "torch.compile"}
    columns = {rows[option].index(comment) for option, comment in comments.items()}
    assert len(columns) == 1  # every comment starts in the same column, whatever the default's length
    assert lines.index(rows["--epochs=90"]) > lines.index("schedule:") > lines.index(rows["--data=data/sample"])


def test_help_without_groups_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_config(Example, ["-h"])
    out = capsys.readouterr().out
    assert "other:" not in out and "--compile (off)" in out and "--device=cpu" in out


def test_train_help_groups_every_option_and_fits_the_width():
    from config import field_notes, help_text
    from train import TrainConfig
    groups = {name: group for name, (group, _) in field_notes(TrainConfig).items()}
    assert {"data", "schedule", "numerics", "speed", "run"} <= set(groups.values())
    assert groups["batch_size"] == "schedule" and groups["compile"] == "speed" and groups["run"] == "run"
    text = help_text(TrainConfig, None, width=100)
    assert all(len(line) <= 100 for line in text.splitlines())
    for name in groups:
        assert f"--{name}" in text or f"--no-{name}" in text


def test_a_usage_error_from_the_dataclass_itself_is_one_line():
    result = run_config_script("    a: int = 1  # a positive count\n"
                               "    def __post_init__(self):\n"
                               "        if self.a < 1:\n"
                               "            raise UsageError(f'--a={self.a}: expected at least 1')\n",
                               ["--a", "0"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: --a=0: expected at least 1"]


def test_torchrun_takes_run_for_its_run_path_unless_a_double_dash_comes_first():
    """Why the documented torchrun commands keep `--`: torchrun's own argparse parser reads every argument, the
    script's too, and `--run` is an ambiguous abbreviation of its `--run-path`/`--run_path`. Nothing a script does
    changes that parser; after `--` every option of train.py reaches train.py as written."""
    torchrun = pytest.importorskip("torch.distributed.run").get_args_parser()
    options = ["--run=runs/a", "--batch_size", "256", "--no-compile", "--epochs=3"]
    assert torchrun.parse_args(["--nproc_per_node=8", "train.py", "--", *options]).training_script_args == options
    with pytest.raises(SystemExit):
        torchrun.parse_args(["--nproc_per_node=8", "train.py", "--run=runs/a"])
    assert torchrun.parse_args(["train.py", *options[1:]]).training_script_args == options[1:]


@dataclass
class LongDefault:
    checkpoint: str = "runs/a-long-run-name/checkpoint.pt"  # checkpoint written by train.py
    split: str = "val"  # split to evaluate


def test_an_option_too_long_for_the_column_puts_its_comment_below_in_the_column(capsys):
    with pytest.raises(SystemExit):
        parse_config(LongDefault, ["--help"])
    lines = capsys.readouterr().out.splitlines()
    at = lines.index("  --checkpoint=runs/a-long-run-name/checkpoint.pt")
    column = len("  --split=val") + 2  # the widest option that fits, and two spaces
    assert lines[at + 1].index("checkpoint written") == lines[at + 2].index("split to evaluate") == column
