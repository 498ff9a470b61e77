"""RUN/, the directory of a training run: config.json, metrics.jsonl, curves.png, checkpoint.pt; and `Progress`,
where the run stands.

metrics.jsonl has one JSON row per log interval ({"step", "loss", "lr", "images_per_s"}) and one per epoch (with
"epoch", train and val errors); curves.png is drawn from it after each epoch. Rank 0 writes them all.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from config import save_config
from runtime import atomic_path


@dataclass
class Progress:
    """Where the run stands: what a checkpoint records besides the network."""
    epoch: int = 0  # epochs finished
    batches_done: int = 0  # global steps done in the unfinished epoch
    step: int = 0  # global steps done in all
    # Of the unfinished epoch, summed over ranks: loss * images, correct, images; and seconds, the ranks' mean.
    # Rank 0 carries them; the other ranks hold zeros, so that a sum over ranks counts them once.
    epoch_sums: list[float] = field(default_factory=lambda: [0.0] * 4)


class RunDirectory:
    """RUN/: config.json, metrics.jsonl (a row per log interval and per epoch), curves.png, checkpoint.pt."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.checkpoint, self.metrics = self.path / "checkpoint.pt", self.path / "metrics.jsonl"

    def start(self, cfg, resumed_step: int | None) -> None:
        """Write config.json; keep the metrics rows up to the checkpoint's step (none when starting over): rows after
        it were written by a run that crashed before its next checkpoint."""
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.path / "config.json")
        if self.metrics.exists():
            rows = [] if resumed_step is None else [json.loads(line) for line in self.metrics.read_text().splitlines()
                                                    if line.strip()]
            self.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= resumed_step))

    def log(self, row: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    def draw_curves(self) -> None:
        plot_curves(self.metrics, self.path / "curves.png")

    def save(self, state: dict) -> None:
        with atomic_path(self.checkpoint) as tmp:  # a kill mid-write leaves the previous checkpoint intact
            torch.save(state, tmp)


def plot_curves(metrics: Path, path: Path) -> None:
    """Loss and error curves of the rows in metrics.jsonl, drawn into `path` (a PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
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
