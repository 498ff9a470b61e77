"""Progress of long work, shown one way everywhere, and the training loop's clock.

    with progress_bar(total=len(loader), desc="validation", unit="batch", interval_s=30) as bar:
        for batch in loader:
            ...
            bar.update()

On a terminal: tqdm's bar, redrawn in place. Written to a file (a Slurm `.out`, `| tee`): a plain line every
`interval_s` seconds with the same counters (`validation:  40% 80/200 [00:31<00:46, 2.58batch/s]`), and a last
one at the end if any was written, instead of `\\r` frames that fill the file. Nothing here imports torch.

`LoaderWait` measures how long a loop waits for its loader (the time spent in `next()`); `pace` and `eta_s` turn
seconds and steps into the figures of a log row.
"""
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tqdm import tqdm

DEFAULT_INTERVAL_S = 30.0  # between plain lines, when the output is not a terminal
LINE_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]"


class ProgressLines:
    """tqdm's counters as a plain line every `interval_s` seconds (and a last line when any was printed)."""

    def __init__(self, total: int, desc: str, unit: str, unit_scale: bool, initial: int, interval_s: float, file):
        self.total, self.desc, self.unit, self.unit_scale, self.file = total, desc, unit, unit_scale, file
        self.n = self.initial = initial
        self.interval_s = interval_s
        self.start = self.last = time.monotonic()
        self.printed_n = None  # n at the last line printed

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.print_line(now)

    def print_line(self, now: float) -> None:
        line = tqdm.format_meter(self.n, self.total, now - self.start, prefix=self.desc, unit=self.unit,
                                 unit_scale=self.unit_scale, initial=self.initial, bar_format=LINE_FORMAT)
        print(line, file=self.file, flush=True)
        self.last, self.printed_n = now, self.n

    @staticmethod
    def write(text: str) -> None:
        """A line of the program's own output (tqdm.write's counterpart)."""
        print(text, flush=True)

    def close(self) -> None:
        if self.printed_n is not None and self.printed_n != self.n:
            self.print_line(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, desc: str, *, unit: str = "it", unit_scale: bool = False, initial: int = 0,
                 interval_s: float = DEFAULT_INTERVAL_S, enabled: bool = True, leave: bool = True, file=None):
    """A tqdm bar on a terminal, ProgressLines otherwise; both have update(n), write(text), close() and `with`.
    `enabled=False` (ranks other than 0) shows nothing; `leave=False` clears a terminal bar when it ends."""
    file = file or sys.stderr
    if enabled and not is_terminal(file):
        return ProgressLines(total, desc, unit, unit_scale, initial, interval_s, file)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, disable=not enabled,
                leave=leave, file=file, dynamic_ncols=True)


def is_terminal(file) -> bool:
    isatty = getattr(file, "isatty", None)
    return bool(isatty and isatty())


class LoaderWait:
    """Seconds a loop spends waiting for the next batch: `for batch in waits.iterate(loader)`, then take()."""

    def __init__(self):
        self.seconds = 0.0

    def iterate(self, loader: Iterable) -> Iterator:
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - start
            yield batch

    def take(self) -> float:
        """The seconds waited since the last take()."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds


@dataclass
class StepTiming:
    """The training steps one process ran in an epoch: their seconds, and the seconds of them spent waiting for data
    (the mean over ranks)."""
    seconds: float = 0.0
    wait_s: float = 0.0
    steps: int = 0

    def add(self, seconds: float, wait_s: float, steps: int) -> None:
        self.seconds, self.wait_s, self.steps = self.seconds + seconds, self.wait_s + wait_s, self.steps + steps

    def per_step(self) -> dict:
        """pace's figures per step (step time, data wait and its share), without images/s."""
        figures = pace(self.seconds, self.steps, 0, self.wait_s)
        del figures["images_per_s"]
        return figures


def pace(seconds: float, steps: int, images: float, wait_s: float) -> dict:
    """A row's speed figures: images/s, seconds per step, of which waiting for data, and that share."""
    return {"images_per_s": images / seconds, "step_time_s": seconds / steps, "data_wait_s": wait_s / steps,
            "data_wait_share": wait_s / seconds}


def eta_s(step_time_s: float, steps_left_in_epoch: int, epochs_left_after: int, steps_per_epoch: int) -> dict:
    """Seconds until the epoch and the run end at `step_time_s` per training step (validation not counted)."""
    return {"eta_epoch_s": step_time_s * steps_left_in_epoch,
            "eta_run_s": step_time_s * (steps_left_in_epoch + epochs_left_after * steps_per_epoch)}


def duration(seconds: float) -> str:
    """3725 -> '1:02:05', 65 -> '1:05', 1.5 days -> '1d 12:00:00'."""
    seconds = max(0, round(seconds))
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    clock = f"{hours}:{minutes:02d}:{seconds:02d}" if hours or days else f"{minutes}:{seconds:02d}"
    return f"{days}d {clock}" if days else clock
