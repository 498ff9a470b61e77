"""RUN/, the directory of a training run: config.json, metrics.jsonl, curves.png, checkpoint.pt (the last, resumable),
best.pt (weights only, the best epoch so far), epoch-NNN.pt (kept ones, resumable), bad_samples.jsonl, tb/; and
`Progress`, where the run stands, with the unfinished epoch's `EpochSums`.

metrics.jsonl has one JSON row per log interval and one per epoch; curves.png is drawn from it after each epoch;
with --tensorboard, tb/ holds the same numbers as TensorBoard scalars (`interval/<key>` and `epoch/<key>`, against
the global step). Rank 0 writes them all. The keys:

    every row    step (global steps done), lr, images_per_s, step_time_s (seconds per step), data_wait_s (of
                 them, seconds waiting for the loader: host time in its next(), the ranks' mean), data_wait_share
                 (data_wait_s / step_time_s), peak_gpu_mem_gib (on a GPU: the most memory rank 0 has held in
                 tensors so far)
    interval     loss (the interval's mean), eta_epoch_s and eta_run_s (the training steps left at this
                 interval's pace; validation not counted)
    epoch        epoch, train_loss, train_top1_err, val_loss, val_top1_err, val_top5_err, val_samples,
                 epoch_time_s, val_time_s, eta_run_s (the epochs left at this epoch's pace, validation included),
                 bad_samples (replaced this epoch under --bad_samples=skip);
                 step_time_s and data_wait_s over the steps this process ran (after a resume: those since)
"""
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from config import FALSE_WORDS, TRUE_WORDS, save_config
from runtime import atomic_path, load_checkpoint, write_atomically


def resume_path(resume: str) -> bool:
    """Whether --resume names a checkpoint (rather than auto, true or false)."""
    return resume.lower() not in ("auto", *TRUE_WORDS, *FALSE_WORDS)


@dataclass
class EpochSums:
    """An epoch's training sums over every rank. A checkpoint carries those of its unfinished epoch as the list
    "epoch_sums", in field order: `list(astuple(sums))`, read back by `EpochSums(*saved)`."""
    loss: float = 0.0  # loss * images
    correct: float = 0.0  # top-1 correct
    images: float = 0.0
    seconds: float = 0.0  # training time, the ranks' mean (each rank times the same steps)


@dataclass
class Progress:
    """Where the run stands: what a checkpoint records besides the network."""
    epoch: int = 0  # epochs finished
    batches_done: int = 0  # global steps done in the unfinished epoch
    step: int = 0  # global steps done in all
    # Of the unfinished epoch, summed over ranks. After a resume rank 0 carries them and the other ranks hold
    # zeros, so that train.py's sum over ranks counts them once; when a stop saves them, every rank holds the total.
    epoch_sums: EpochSums = field(default_factory=EpochSums)


class RunDirectory:
    """RUN/: config.json, metrics.jsonl (a row per log interval and per epoch), curves.png, checkpoint.pt, best.pt,
    epoch-NNN.pt, bad_samples.jsonl (a row per bad sample replaced under --bad_samples=skip), and with
    `tensorboard` tb/."""

    def __init__(self, path: str, tensorboard: bool = False):
        self.path = Path(path)
        self.checkpoint, self.metrics = self.path / "checkpoint.pt", self.path / "metrics.jsonl"
        self.tensorboard, self.writer = tensorboard, None
        self.bad_samples = self.path / "bad_samples.jsonl"  # one row per bad sample replaced (--bad_samples=skip)
        self.best = self.path / "best.pt"

    def resume_from(self, resume: str) -> tuple[Path, dict] | None:
        """(path, checkpoint) that --resume=`resume` continues from, loaded; None to start a new run.

        auto (or true): checkpoint.pt when there is one; false: None. A path: that checkpoint, unless checkpoint.pt
        already continues from it (the same command rerun after a stop or a requeue goes on, never back to it).
        FileNotFoundError or ValueError (from load_checkpoint) with a one-line message."""
        own = self.checkpoint if self.checkpoint.exists() else None
        if resume.lower() in FALSE_WORDS:
            return None
        if not resume_path(resume):
            if not own and resume.lower() in TRUE_WORDS:  # asked for explicitly: never a new run instead
                raise FileNotFoundError(f"--resume={resume}: there is no {self.checkpoint} to continue from (auto "
                                        "starts a new run when there is none)")
            return (own, load_checkpoint(own)) if own else None
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume={resume}: no such checkpoint (auto: RUN/checkpoint.pt when there is "
                                    "one)")
        if own:
            checkpoint = load_checkpoint(own)
            if own.resolve() == path.resolve() or checkpoint.get("origin") == str(path.resolve()):
                return own, checkpoint
        return path, load_checkpoint(path)

    def origin(self, path: Path, checkpoint: dict) -> str | None:
        """What the checkpoints continuing from (path, checkpoint) record as their origin: the resolved path when it
        lies outside this directory's checkpoint.pt, else the origin it recorded."""
        return checkpoint.get("origin") if path == self.checkpoint else str(path.resolve())

    def kept(self, epoch: int) -> Path:
        """The checkpoint kept at the end of `epoch` (counted from 1)."""
        return self.path / f"epoch-{epoch:03d}.pt"

    def start(self, cfg, start: tuple[Path, dict] | None, bad: list[dict]) -> list[Path]:
        """Write config.json and make this directory hold the line of checkpoints the run continues: that of `start`
        (the checkpoint it resumes from, or None for a new run). The checkpoints of another line removed.

        Continuing RUN/checkpoint.pt: the metrics rows after its step go (a run that crashed before its next
        checkpoint wrote them). Any other start (a new run, or --resume=PATH) begins a new line here: the previous
        checkpoint.pt, best.pt and epoch-NNN.pt go (all but the start's file and `cfg.init`), so that nothing of
        another line is resumed, exported or plotted; the metrics rows are those of the start's directory up to its
        step (none for a new run), and `bad` (known_bad_samples of the start) the bad samples listed."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.path / "config.json")
        source, step = (start[0].parent, start[1]["step"]) if start else (None, -1)
        rows = [r for r in rows_of(source / self.metrics.name) if r["step"] <= step] if source else []
        removed = []
        if not start or start[0] != self.checkpoint:
            keep = {Path(path).resolve() for path in (cfg.init, start and start[0]) if path}
            removed = self.remove_checkpoints(keep)
            shutil.rmtree(self.path / "tb", ignore_errors=True)  # another line's events
        write_atomically(self.metrics, "".join(json.dumps(r) + "\n" for r in rows).encode())
        if bad:  # other ranks may be reading it: replaced whole
            write_atomically(self.bad_samples, "".join(json.dumps(r) + "\n" for r in bad).encode())
        else:
            self.bad_samples.unlink(missing_ok=True)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # The same cut for TensorBoard: it hides the events from the step given on.
            self.writer = SummaryWriter(self.path / "tb", purge_step=step + 1)
        return removed

    def log(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer:
            kind = "epoch" if "epoch" in row else "interval"
            for key, value in row.items():
                if key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{kind}/{key}", value, row["step"])
            self.writer.flush()  # a row at a time, as metrics.jsonl: a run killed later loses none

    def remove_checkpoints(self, keep: set[Path]) -> list[Path]:
        """Remove checkpoint.pt, best.pt and epoch-NNN.pt, except those in `keep` (resolved): a new line must not
        resume, or be chosen from, another line's files. Those removed."""
        removed = []
        for path in [self.checkpoint, self.best, *sorted(self.path.glob("epoch-[0-9][0-9][0-9]*.pt"))]:
            if path.is_file() and path.resolve() not in keep:
                path.unlink()
                removed.append(path)
        return removed

    def log_bad_samples(self, rows: list[dict]) -> None:
        """Append the rows (faults.BadSample.as_row) of samples not listed yet: ranks may meet the same one."""
        listed = {(r["split"], r["sample"]) for r in rows_of(self.bad_samples)}
        with open(self.bad_samples, "a") as f:
            for row in rows:
                if (row["split"], row["sample"]) not in listed:
                    listed.add((row["split"], row["sample"]))
                    f.write(json.dumps(row) + "\n")

    def known_bad_samples(self, start: Path) -> list[dict]:
        """The bad samples a run resuming from the checkpoint `start` replaces from its start: those listed beside
        it (in this directory, or in another's for --resume=PATH)."""
        return rows_of(start.parent / self.bad_samples.name)

    def draw_curves(self) -> None:
        plot_curves(self.metrics, self.path / "curves.png")

    def save(self, state: dict, *, best: dict | None = None, keep: bool = False) -> None:
        """checkpoint.pt; `best` (weights only) as best.pt; with `keep`, checkpoint.pt also as epoch-NNN.pt.

        A kill or a full disk mid-write leaves the previous file intact. Each is serialised in memory first (about
        0.5 GB for AlexNet with its momentum): torch's file writer reports a full disk as an unexplained
        RuntimeError, a plain write as the OSError it is."""
        # best.pt first: should checkpoint.pt fail, the rerun redoes the epoch and writes best.pt again; the other way
        # round, the rerun would start after the epoch whose best.pt was lost.
        if best is not None:
            write_whole(self.best, best)
        write_whole(self.checkpoint, state)
        if keep:
            kept = self.kept(state["epoch"])
            try:
                with atomic_path(kept) as tmp:
                    try:  # a second name for the file, no copy: the next checkpoint.pt is a new file, this one stays
                        os.link(self.checkpoint, tmp)
                    except OSError:  # file systems without hard links
                        shutil.copyfile(self.checkpoint, tmp)
            except OSError as e:
                e.filename = str(kept)
                raise


def write_whole(path: Path, state: dict) -> None:
    """torch.save through write_atomically; an OSError names `path` (its filename), not the temporary file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        write_atomically(path, buffer.getbuffer())
    except OSError as e:
        e.filename = str(path)
        raise


def rows_of(path: Path) -> list[dict]:
    """read_rows, or none when there is no such file."""
    return read_rows(path) if path.exists() else []


def known_bad_in(rows: list[dict], split: str = "train") -> dict[int, str]:
    """{sample number: key} of the bad samples of `split` among `rows`."""
    return {r["sample"]: r["key"] for r in rows if r["split"] == split}


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file (metrics.jsonl, bad_samples.jsonl)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics: Path, path: Path) -> None:
    """Loss and error curves of the rows in metrics.jsonl, drawn into `path` (a PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(metrics)
    steps = [r for r in rows if "epoch" not in r]
    epochs = [r for r in rows if "epoch" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (interval)")
    left.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="train (epoch)")
    left.plot([r["step"] for r in epochs], [r["val_loss"] for r in epochs], "s-", label="val")
    left.set(xlabel="step", ylabel="cross-entropy loss", title="loss")
    for key, label in (("train_top1_err", "train top-1"), ("val_top1_err", "val top-1"), ("val_top5_err", "val top-5")):
        right.plot([r["epoch"] for r in epochs], [r[key] for r in epochs], "o-", label=label)
    right.set(xlabel="epoch", ylabel="error", title="error", ylim=(0, 1))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
