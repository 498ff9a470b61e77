"""progress.py: one way to show long work (a bar on a terminal, plain lines in a file) and the loop's clock."""
import io
import re
import time

import numpy as np

from progress import LoaderWait, ProgressLines, duration, eta_s, pace, progress_bar
from tests.shardkit import run_cli, write_data


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_file_gets_plain_lines_with_the_bars_counters_and_no_carriage_returns():
    out = io.StringIO()
    with progress_bar(4, "pass", unit="img", interval_s=0, file=out) as bar:
        assert isinstance(bar, ProgressLines)
        for _ in range(4):
            bar.update()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4
    assert [" ".join(line.split("[")[0].split()) for line in lines] == [
        "pass: 25% 1/4", "pass: 50% 2/4", "pass: 75% 3/4", "pass: 100% 4/4"]
    assert re.fullmatch(r"pass: 100% 4/4 \[\d\d:\d\d<\d\d:\d\d, .*img/s\]", lines[-1])


def test_lines_come_every_interval_and_short_work_prints_none():
    out = io.StringIO()
    with progress_bar(100, "short", interval_s=30, file=out) as bar:
        bar.update(100)
    assert out.getvalue() == ""  # done before the first interval: nothing to report
    out = io.StringIO()
    with progress_bar(3, "slow", interval_s=0.5, file=out) as bar:
        bar.update()
        time.sleep(0.6)
        bar.update()  # a line: 0.6 s since the start
        bar.update()  # none: 0 s since the last line
    lines = out.getvalue().splitlines()
    assert [" ".join(line.split("[")[0].split()) for line in lines] == ["slow: 67% 2/3", "slow: 100% 3/3"]


def test_a_terminal_gets_tqdms_bar_and_a_disabled_bar_nothing():
    terminal = Terminal()
    with progress_bar(2, "pass", file=terminal) as bar:
        bar.update(2)
    assert "\r" in terminal.getvalue() and "2/2" in terminal.getvalue()
    for file in (io.StringIO(), Terminal()):
        with progress_bar(2, "rank 1", enabled=False, file=file) as bar:
            bar.update(2)
        assert file.getvalue() == ""


def test_loader_wait_counts_the_time_in_next_only():
    def slow_loader():
        for batch in range(3):
            time.sleep(0.05)
            yield batch

    waits = LoaderWait()
    start = time.perf_counter()
    for _ in waits.iterate(slow_loader()):
        time.sleep(0.1)  # the step: not waiting for data
    total = time.perf_counter() - start
    waited = waits.take()
    assert 0.15 <= waited < 0.4 <= total  # the three 0.1 s steps are not counted
    assert waits.take() == 0.0


def test_pace_and_eta():
    assert pace(seconds=10.0, steps=5, images=640, wait_s=2.5) == {
        "images_per_s": 64.0, "step_time_s": 2.0, "data_wait_s": 0.5, "data_wait_share": 0.25}
    assert eta_s(2.0, steps_left_in_epoch=3, epochs_left_after=2, steps_per_epoch=10) == {
        "eta_epoch_s": 6.0, "eta_run_s": 46.0}
    assert [duration(s) for s in (0, 65, 3725, 1.5 * 86400)] == ["0:00", "1:05", "1:02:05", "1d 12:00:00"]


def test_verify_shows_the_bytes_it_reads(tmp_path):
    rng = np.random.default_rng(0)
    images = [(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), i % 2) for i in range(6)]
    data = write_data(tmp_path / "data", {"train": images, "val": images[:2]}, shard_size=2)
    result = run_cli("verify", f"--data={data}", "--progress_interval=0")
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"verify {data}:")]
    assert len(lines) == 4 and "\r" not in result.stderr  # one line per shard read: 3 train, 1 val
    assert re.search(r"100% (\S+)/\1 ", lines[-1]), lines[-1]  # all the bytes, in B/kB/MB
    assert result.stdout.startswith("OK: 4 shards")
