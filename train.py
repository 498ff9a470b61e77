"""Train AlexNet on ImageNet shards with the recipe of Krizhevsky, Sutskever & Hinton (2012).

    python train.py --data=data/imagenet --run=runs/alexnet                     # one GPU (or the CPU)
    python train.py --data=data/imagenet --run=runs/alexnet --compile           # faster on a GPU
    torchrun --nproc_per_node=8 train.py -- --data=data/imagenet --run=runs/a8  # DDP: 8 GPUs, 16 images each
    python train.py --data=data/sample --run=runs/demo --preset=demo            # `make demo`: 2 CPU cores
    python train.py --help                                                      # every option

Options: `--key=value` or `--key value`; true/false ones as `--compile` / `--no-compile`; `--help` lists them by group.
torchrun needs the `--`: its parser also reads the script's arguments and stops at `--run`, an ambiguous abbreviation
of its `--run-path` (nothing in train.py can change torchrun's parser; renaming --run would break existing commands).
Rerunning a command continues from RUN/checkpoint.pt (written at each epoch end). A run that does not continue it
(--resume=false, or --resume=PATH) removes the run RUN held before, once its data is found: checkpoint.pt, best.pt and
epoch-NNN.pt (not PATH or --init's file), its metrics rows and bad samples, so that no file there mixes two runs.

Checkpoints: RUN/checkpoint.pt (the last, resumable), RUN/best.pt (weights only: the epoch of the lowest centre-crop
val top-1 error so far) and, with --keep_every=K, RUN/epoch-NNN.pt every K epochs (resumable). Each carries the class
list and the training mean image, so that predict.py and `python -m model.export` need no DATA.
    --resume=runs/a/epoch-030.pt   continue from that checkpoint into RUN (a rerun of the same command after a stop
                                   continues from RUN/checkpoint.pt, which records that it started there)
    --init=runs/a/best.pt          a new run from those weights (fine-tuning); for other classes fc8 starts fresh
On resume, options that differ from the saved run's take effect from the resumed step and are listed (lr, momentum
and weight decay replace the saved optimizer's); --batch_size and --seed are refused in the middle of an epoch.

`batch_size` is global: with N ranks each takes batch_size/N images per step and DDP averages the gradients, so a
step computes the same as one device doing the whole batch (AlexNet has no batch normalisation) and `lr` needs no
change. For larger batches raise both (lr = 0.01 * batch_size / 128 is the usual start); nothing is rescaled.

SIGTERM or SIGUSR1 (Slurm's warning before the time limit) to any rank: at the next log interval all ranks agree
to stop, rank 0 saves RUN/checkpoint.pt mid-epoch, prints `preempted: ...`, and every rank exits with status 75
(EX_TEMPFAIL: rerun to resume; 0 means finished). The rerun starts directly at the next global step, also on
another number of GPUs, because global step s is the same batch on any number of ranks (the global order:
pipeline/order.py's docstring); on as many ranks, the run equals one never stopped, bit for bit on the CPU. A
NaN/inf loss ends the run with status 1 and leaves the last checkpoint as it was.

A JPEG that does not decode stops the run with status 65 (EX_DATAERR: a rerun meets it again) and one line naming
its shard, key, epoch and step; --bad_samples=skip replaces each by a fixed substitute instead (the same on any
number of ranks), lists it in RUN/bad_samples.jsonl and the epoch's metrics, and a resumed run replaces it from the
start. The checkpoint records the training set (sample count, digest of the shard checksums): a mid-epoch resume
on another shard set is refused, one at an epoch boundary goes on and says so.
"""
import importlib.util
import math
import sys
import time
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

import pipeline
from config import parse_overrides
from model.export import inference_record, start_from_weights, weights_only
from model.recipe import (DropOnPlateau, Numerics, build_model, make_optimizer, numerics, set_hyperparameters,
                          train_step)
from pipeline import DataError, dataset_identity, read_manifest
from pipeline.data import CROP, SIZE, read_stats
from progress import DEFAULT_INTERVAL_S, LoaderWait, StepTiming, duration, eta_s, pace, progress_bar
from rundir import EpochSums, Progress, RunDirectory, known_bad_in, resume_path
from runtime import (EXIT_BAD_SAMPLE, NO_SPACE, Rank, UsageError, all_sum, check_option, derived_seed, join_ranks,
                     leave_ranks, limit_threads, run_main, stop_signals, topk_correct, usage_errors)


@dataclass
class TrainConfig:
    # --- data ---
    data: str = "data/sample"  # shard directory written by `python -m shards build`
    lighting: float = 0.1  # std of the PCA lighting coefficients (0: off)
    mean: Literal["pixel", "channel"] = "pixel"  # pixel: subtract the mean image (the paper); channel: the RGB mean
    bad_samples: Literal["stop", "skip"] = "stop"  # a JPEG that does not decode: stop (exit 65), or skip: replace it
    # --- schedule ---
    epochs: int = 90  # passes over the training set
    batch_size: int = 128  # images per step, summed over all ranks
    lr: float = 0.01  # learning rate per step of batch_size images (not rescaled with the GPU count)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty on the weights, as in the paper's update rule
    decay_biases: bool = False  # also decay the biases (the paper's rule, cuda-convnet and Caffe decay weights only)
    lr_patience: int = 2  # epochs in a row without a new best val top-1 error before lr /= 10
    max_lr_drops: int = 3  # the paper divided the learning rate by 10 three times
    dropout: float = 0.5  # dropout probability on the outputs of fc6 and fc7
    # --- numerics ---
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when there is one
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # autocast dtype on the GPU (float32: no TF32; CPU: float32)
    channels_last: bool = True  # NHWC memory layout on the GPU (faster convolutions on tensor cores)
    # --- speed ---
    compile: bool = False  # torch.compile the model (about a minute of compiling first)
    num_threads: int = 0  # DALI CPU threads per rank (0: this node's CPUs divided among its ranks)
    reader_workers: int = -1  # processes reading training samples per rank (-1: the loader's default; 0: none)
    reads_in_flight: int = 0  # training sample reads per rank waiting on the storage at once (0: the loader's 40)
    storage: Literal["local", "network"] = "local"  # where DATA lives: network = Lustre/GPFS/NFS (validation I/O)
    # --- run ---
    run: str = "runs/alexnet"  # output directory: config.json, metrics.jsonl, curves.png, checkpoint.pt, best.pt
    preset: Literal["none", "demo"] = "none"  # demo: the built-in sample on 2 CPU cores (explicit options still win)
    log_interval: int = 100  # steps between metric lines (the only host-device syncs in the loop)
    max_steps_per_epoch: int = 0  # end each epoch after this many global steps (0: the whole epoch; quick tests)
    seed: int = 0  # seeds the data order (a new permutation each epoch), augmentation, dropout and initialisation
    resume: str = "auto"  # auto|true: from RUN/checkpoint.pt when there is one; false: start over; PATH: from that
    init: str = ""  # a new run starts from these weights (checkpoint or .safetensors; fc8 fresh for other classes)
    keep_every: int = 0  # also keep RUN/epoch-NNN.pt (resumable) every this many epochs (0: none)
    progress_interval: float = DEFAULT_INTERVAL_S  # seconds between progress lines when the output is not a terminal
    tensorboard: bool = False  # also write the metrics to RUN/tb/ for TensorBoard (`make setup TB=1` installs it)

    def __post_init__(self):  # ranges, checked when parsed: not at the first batch, inside a worker
        for name, ok, expected in (
                ("epochs", self.epochs >= 1, "at least 1"), ("batch_size", self.batch_size >= 1, "at least 1"),
                ("lr", 0 < self.lr < math.inf, "> 0 and finite"), ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                ("weight_decay", self.weight_decay >= 0, ">= 0"), ("lr_patience", self.lr_patience >= 1, ">= 1"),
                ("max_lr_drops", self.max_lr_drops >= 0, ">= 0"), ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                ("lighting", self.lighting >= 0, ">= 0 (0: off)"), ("num_threads", self.num_threads >= 0, ">= 0"),
                ("reader_workers", self.reader_workers >= -1, ">= -1 (-1: the loader's default)"),
                ("reads_in_flight", self.reads_in_flight >= 0, ">= 0 (0: the loader's default)"),
                ("log_interval", self.log_interval >= 1, "at least 1"),
                ("max_steps_per_epoch", self.max_steps_per_epoch >= 0, ">= 0 (0: whole epochs)"),
                ("keep_every", self.keep_every >= 0, ">= 0 (0: none)"),
                ("progress_interval", self.progress_interval >= 0, ">= 0 seconds (0: a line at every update)"),
                ("seed", 0 <= self.seed < 2**63, "an integer in [0, 2^63)"),
                ("data", self.data.strip() != "", "a shard directory"),
                ("run", self.run.strip() != "", "a run directory ('.' for the current one)")):
            check_option(name, getattr(self, name), ok, expected)


# The demo preset: full AlexNet on the built-in sample (10 classes, 400 training images) on 2 CPU cores in under
# 10 minutes. Batches of 16 give 25 steps per epoch. lr 0.001: the paper's 0.01 is stable only with many classes
# (with 10, the bias-1 initialisation lets one step move all logits together by a lot and the loss jumps to ~20).
# No dropout: it halves the useful signal per step, and a few hundred steps leave no time to overfit anyway.
# lr_patience=3: 100 validation images give noisy errors, which must not end the run's learning early.
DEMO = dict(epochs=4, batch_size=16, lr=0.001, dropout=0.0, lr_patience=3, log_interval=5, num_threads=2)

EXIT_STOPPED_EARLY = 75  # exit status after a stop signal: checkpoint saved, not finished (EX_TEMPFAIL of sysexits.h)


@torch.no_grad()
def validate(model, loader, device, autocast, make_bar) -> dict:
    """Centre-crop loss and top-1/top-5 errors, summed over every real sample of every rank: exact. `make_bar`:
    Setup.progress_bar."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 correct, top-5 correct, samples
    bar = make_bar(len(loader), "validation", unit="batch", leave=False)
    for images, labels in loader:
        with autocast:
            logits = model(images)  # float32 even under autocast: fc8 computes in float32
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1:3] += topk_correct(logits, labels)
        sums[3] += len(labels)
        bar.update()
    bar.close()
    loss, top1, top5, n = all_sum(sums, device).tolist()
    return {"val_loss": loss / n, "val_top1_err": 1 - top1 / n, "val_top5_err": 1 - top5 / n, "val_samples": int(n)}


def resolve_config(argv: list[str]) -> TrainConfig:
    """Defaults, then the preset, then the explicit options."""
    explicit = parse_overrides(TrainConfig, argv, description=__doc__)
    preset = DEMO if explicit.get("preset") == "demo" else {}
    return TrainConfig(**{**preset, **explicit})


def training_numerics(cfg: TrainConfig, device: torch.device) -> Numerics:
    """--dtype and --channels_last on `device`, cuDNN's convolution algorithms timed once (a training run's batch
    shapes repeat)."""
    return numerics(device, cfg.dtype, cfg.channels_last, benchmark=True)


@dataclass
class Network:
    """The model in its three roles, and what trains it."""
    raw: torch.nn.Module  # the parameters, as checkpoints hold them
    train: torch.nn.Module  # DDP and/or compiled: what the training step runs
    eval: torch.nn.Module  # compiled, without DDP: what validation runs
    optimizer: torch.optim.SGD
    schedule: DropOnPlateau


def build_network(cfg: TrainConfig, num_classes: int, rank: Rank, channels_last: bool) -> Network:
    raw, train_model, eval_model = build_model(num_classes, dropout=cfg.dropout, seed=cfg.seed, device=rank.device,
                                               channels_last=channels_last, distributed=rank.world_size > 1,
                                               compile=cfg.compile)
    optimizer = make_optimizer(raw, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               decay_biases=cfg.decay_biases, fused=rank.device.type == "cuda")
    return Network(raw, train_model, eval_model, optimizer, DropOnPlateau(optimizer, cfg.lr_patience, cfg.max_lr_drops))


@dataclass(frozen=True)
class Setup:
    """What every phase of a run reads and none changes."""
    cfg: TrainConfig
    rank: Rank
    numerics: Numerics
    run: RunDirectory
    num_classes: int
    inference: dict  # the class list and test preprocessing every checkpoint carries (model/export.py)
    dataset: dict  # the training split's identity (pipeline.dataset_identity), kept in checkpoints
    origin: str | None  # the checkpoint --resume=PATH started this run's line from (resolved), saved with it

    def progress_bar(self, total: int, desc: str, **options):
        """progress.progress_bar, shown by rank 0 only, its plain lines every --progress_interval seconds."""
        return progress_bar(total, desc, enabled=self.rank.is_main, interval_s=self.cfg.progress_interval, **options)


class RunEnded(Exception):
    """RunEnded(code, message): the run ends before its last epoch with exit status `code` after `message`."""


class RankFailed(RunEnded):
    """RunEnded of one rank alone (a bad sample in its part, its GPU out of memory, its save): it prints its own
    message and exits without waiting for the others, which wait for it in a collective until torchrun stops them."""


def inference_metadata(cfg: TrainConfig, manifest: dict) -> dict:
    """The class list and test preprocessing of this run's data: what checkpoints carry for inference."""
    stats = read_stats(cfg.data, manifest)
    return inference_record(manifest["classes"], mean=cfg.mean, mean_image=stats.mean_image, rgb_mean=stats.rgb_mean,
                            jpeg_quality=manifest["params"]["quality"], size=SIZE, crop=CROP)


# How a run starts, where it writes and how it reports, not what it computes: never compared with the saved run's.
START_OPTIONS = ("resume", "init", "run", "keep_every", "log_interval", "progress_interval", "tensorboard")


def changed_options(saved: dict, cfg: TrainConfig) -> dict[str, tuple]:
    """{option: (the saved run's value, this run's)} for the options that differ."""
    now = asdict(cfg)
    return {k: (v, now[k]) for k, v in saved.items() if k in now and v != now[k] and k not in START_OPTIONS}


def resume(setup: Setup, start: tuple[Path, dict], network: Network) -> Progress:
    """Load the checkpoint into the network; where it stood, with rank 0 carrying the unfinished epoch's sums.
    Options changed since the saved run take effect from the resumed step."""
    cfg, rank, (path, checkpoint) = setup.cfg, setup.rank, start
    if "optimizer" not in checkpoint:
        raise UsageError(f"{path} holds weights only (no optimizer state): --init={path} starts a new run from them")
    try:
        network.raw.load_state_dict(checkpoint["model"])
        network.optimizer.load_state_dict(checkpoint["optimizer"])
        network.schedule.load_state_dict(checkpoint["scheduler"])
    except (KeyError, ValueError, RuntimeError) as e:  # another network, or a checkpoint of an older version
        raise UsageError(f"{path} does not fit this run ({' '.join(str(e).split())[:300]}); "
                         "--resume=false starts over") from None
    progress = Progress(checkpoint["epoch"], checkpoint["batches_done"], checkpoint["step"])
    dataset_note = check_dataset(checkpoint.get("dataset"), setup.dataset, progress, path)
    changed = changed_options(checkpoint["config"], cfg)
    moved = [k for k in ("batch_size", "seed") if k in changed]
    if moved and progress.batches_done:  # batches_done counts batches of the old order, which these options change
        raise UsageError(f"{path} stopped in the middle of epoch {progress.epoch + 1} with another "
                         f"{' and '.join('--' + k for k in moved)}: resume with the checkpoint's value (the order of "
                         "that epoch depends on it)")
    saved_lr = network.optimizer.param_groups[0]["lr"]  # the saved run's, after any drops of the schedule
    # The saved optimizer state brought the saved run's values back: the command line's replace those that changed.
    new_values = {k: getattr(cfg, k) for k in ("lr", "momentum") if k in changed}
    if {"weight_decay", "decay_biases"} & changed.keys():
        new_values.update(weight_decay=cfg.weight_decay, decay_biases=cfg.decay_biases)
    set_hyperparameters(network.optimizer, **new_values)
    if rank.is_main:  # rank 0 carries the unfinished epoch's sums (Progress.epoch_sums)
        progress.epoch_sums = EpochSums(*checkpoint["epoch_sums"])
        print(f"resuming from {path}: epoch {progress.epoch} done, +{progress.batches_done} batches, step "
              f"{progress.step}" + dataset_note, flush=True)
        applied = [f"--{k} {old} -> {new}" + (f" (the saved optimizer's lr was {saved_lr:g})" if k == "lr" else "")
                   for k, (old, new) in sorted(changed.items())]
        if checkpoint["world_size"] != rank.world_size:  # the global batches stay the same: the epoch continues
            applied.append(f"ranks {checkpoint['world_size']} -> {rank.world_size}")
        if applied:
            print(f"changed since the saved run, in effect from step {progress.step + 1}: {', '.join(applied)}",
                  flush=True)
    return progress


def check_dataset(saved: dict | None, current: dict | None, progress: Progress, path) -> str:
    """"" when the checkpoint's training set is this one (or it recorded none); a note when it differs at an epoch
    boundary (each epoch is a new permutation of whatever the set is); a UsageError mid-epoch, where the position
    counts batches of the old set's permutation."""
    if not saved or not current or saved == current:
        return ""
    differs = [f"{saved['num_samples']} -> {current['num_samples']} samples"] if (
        saved["num_samples"] != current["num_samples"]) else []
    if saved["shards_sha256"] != current["shards_sha256"]:
        differs.append("other shard checksums")
    what = f"the training set differs from the checkpoint's ({', '.join(differs)})"
    if progress.batches_done:
        raise UsageError(f"{path} stopped in the middle of epoch {progress.epoch + 1}, and {what}: its position "
                         "there means other samples in this set; resume on the shards it was written with, or "
                         "--resume=false starts over")
    return f"; {what}: epoch {progress.epoch + 1} starts on this one"


def save_checkpoint(setup: Setup, network: Network, progress: Progress, new_best: dict | None = None) -> None:
    """Every rank takes part (the RNG states are gathered); rank 0 writes RUN/checkpoint.pt, and with `new_best`
    (the epoch's validation metrics) RUN/best.pt, and every --keep_every epochs RUN/epoch-NNN.pt. `progress`
    carries the unfinished epoch's sums over ranks."""
    rank = setup.rank
    rngs = rng_states(rank)
    if rank.is_main:
        state = {"model": network.raw.state_dict(), "optimizer": network.optimizer.state_dict(),
                 "scheduler": network.schedule.state_dict(), "epoch": progress.epoch,
                 "batches_done": progress.batches_done, "step": progress.step,
                 "epoch_sums": list(astuple(progress.epoch_sums)), "config": asdict(setup.cfg),
                 "num_classes": setup.num_classes, "world_size": rank.world_size, "rng": rngs,
                 "dataset": setup.dataset, **setup.inference, "origin": setup.origin}
        save_or_fail(setup.run, state, best=weights_only(state, metrics=new_best) if new_best else None,
                     keep=kept(setup.cfg, progress))


def rng_states(rank: Rank) -> list[dict]:
    """Every rank's RNG states, in rank order: the checkpoint's "rng", which seed_dropout continues from. Every rank
    takes part."""
    cuda = rank.device.type == "cuda"
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(rank.device)} if cuda else {})}
    if rank.world_size == 1:
        return [rng]
    states = [None] * rank.world_size
    dist.all_gather_object(states, rng)
    return states


def seed_dropout(setup: Setup, epoch: int, progress: Progress, checkpoint: dict | None) -> None:
    """Dropout masks: drawn per (seed, epoch, rank); a run resumed mid-epoch continues the RNG streams that
    rng_states saved in `checkpoint`, the one it resumed from.

    Resumed on another number of ranks, the streams are rank-local and cannot be carried over: the rest of the
    epoch draws its masks from (seed, epoch, step, rank) instead (the data and augmentation are unaffected).
    """
    seed, rank = setup.cfg.seed, setup.rank
    if not progress.batches_done:
        torch.manual_seed(derived_seed(seed, epoch, rank.rank))
    elif checkpoint["world_size"] != rank.world_size:
        torch.manual_seed(derived_seed(seed, epoch, progress.batches_done, rank.rank))
    else:
        saved = checkpoint["rng"][rank.rank]
        torch.set_rng_state(saved["cpu"])
        if rank.device.type == "cuda" and "cuda" in saved:
            torch.cuda.set_rng_state(saved["cuda"], rank.device)


def kept(cfg: TrainConfig, progress: Progress) -> bool:
    """Whether this checkpoint is also kept as RUN/epoch-NNN.pt: at the end of every --keep_every-th epoch."""
    return cfg.keep_every > 0 and progress.batches_done == 0 and progress.epoch % cfg.keep_every == 0


def save_or_fail(run: RunDirectory, state: dict, **files) -> None:
    """run.save(state, **files); a full disk (or any write error) ends the run in one line, the file that failed
    intact as it was."""
    try:
        run.save(state, **files)
    except OSError as e:
        failed = e.filename or run.checkpoint
        reason = (e.strerror or str(e)) + (" (free space or quota there)" if e.errno in NO_SPACE else "")
        then = "a rerun resumes from it" if Path(failed) == run.checkpoint else f"a rerun resumes from {run.checkpoint}"
        raise RankFailed(1, f"error: saving {failed}: {reason}; the previous file there is intact ({then})") from None


def record_bad_samples(setup: Setup, loader) -> int:
    """The bad samples every rank's loader replaced since the last call, appended to RUN/bad_samples.jsonl by rank 0
    (a resumed run replaces them from its start); how many. Every rank takes part."""
    if setup.cfg.bad_samples == "stop":  # nothing is ever replaced: no collective needed
        return 0
    rows = [bad.as_row() for bad in loader.found]
    loader.found.clear()
    if setup.rank.world_size > 1:
        parts = [None] * setup.rank.world_size
        dist.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part]
    if setup.rank.is_main and rows:
        setup.run.log_bad_samples(rows)
    return len(rows)


def stopped(received: list[str]) -> str:
    return f"preempted: {', '.join(received) or 'another rank was signalled'}"


class RankSums:
    """This rank's part of an epoch's EpochSums while it trains, from `start` on. Loss, correct and images stay on
    the device: no .item() (nor a tensor made from a Python number, which is a blocking copy) at each step, either
    would make the host wait for the GPU every step. Seconds are host time."""

    def __init__(self, start: EpochSums, rank: Rank):
        self.rank = rank
        self.loss, self.correct, self.images = (torch.tensor(value, dtype=torch.float64, device=rank.device)
                                                for value in (start.loss, start.correct, start.images))
        self.seconds = start.seconds

    def add_step(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Adds a training step's batch; its loss * images."""
        loss_sum = loss.detach().double() * len(labels)
        self.loss += loss_sum
        self.correct += (logits.argmax(1) == labels).sum()
        self.images += len(labels)
        return loss_sum

    def add_seconds(self, seconds: float) -> None:
        """The one rule for time over ranks: each rank adds its share, so that the sum over ranks is their mean."""
        self.seconds += seconds / self.rank.world_size

    def over_ranks(self) -> EpochSums:
        """The sums over every rank; every rank takes part."""
        parts = torch.stack([self.loss, self.correct, self.images, self.loss.new_tensor(self.seconds)])
        return EpochSums(*all_sum(parts, self.rank.device).tolist())


@dataclass(frozen=True)
class IntervalTotals:
    """The steps since the last metrics row, over every rank."""
    loss: float  # mean loss per image
    images: float
    seconds: float  # this rank's clock
    wait_s: float  # of them, waiting for the loader: the ranks' mean
    steps: int
    stop: bool  # a rank was asked to stop


class Interval:
    """The steps since the last metrics row on this rank: their loss * images and images on the device, the host
    clock, and the seconds waited for the loader (`for batch in interval.waits.iterate(loader)`)."""

    def __init__(self, rank: Rank):
        self.rank, self.waits = rank, LoaderWait()
        self._start(time.perf_counter())

    def _start(self, clock: float) -> None:
        self.clock, self.steps = clock, 0
        self.loss, self.images = (torch.zeros((), dtype=torch.float64, device=self.rank.device) for _ in range(2))

    def add_step(self, loss_sum: torch.Tensor, images: int) -> None:
        self.loss += loss_sum
        self.images += images
        self.steps += 1

    def close(self, stop: bool) -> IntervalTotals:
        """Its totals over ranks, and whether a rank was asked to stop; the next interval starts. The training loop's
        one sync point: loss, images, the stop votes and the seconds waited in one all_reduce."""
        on_device = torch.stack([self.loss, self.images]).tolist()
        loss, images, stops, wait_s = all_sum([*on_device, float(stop), self.waits.take()], self.rank.device).tolist()
        now = time.perf_counter()
        totals = IntervalTotals(loss / images, images, now - self.clock, wait_s / self.rank.world_size, self.steps,
                                stops > 0)
        self._start(now)
        return totals


def train_epoch(setup: Setup, epoch: int, loader, network: Network, progress: Progress,
                received: list[str]) -> tuple[EpochSums, StepTiming]:
    """Global steps of `epoch` from progress.batches_done to its end, or to the first sync point after a stop signal;
    progress advances with every step. Returns the epoch's sums over every rank (progress.epoch_sums, which rank 0
    carries from a resumed checkpoint, included) and the timing of the steps run here."""
    cfg, rank = setup.cfg, setup.rank
    steps = loader.order.steps_per_epoch
    network.train.train()
    sums, interval, timing = RankSums(progress.epoch_sums, rank), Interval(rank), StepTiming()
    bar = setup.progress_bar(steps, f"epoch {epoch + 1}/{cfg.epochs}", unit="step", initial=progress.batches_done,
                             leave=False)
    for images, labels in interval.waits.iterate(loader):
        loss, logits = train_step(network.train, network.optimizer, images, labels, setup.numerics.autocast)
        progress.step, progress.batches_done = progress.step + 1, loader.step
        bar.update()
        interval.add_step(sums.add_step(loss, logits, labels), len(labels))
        if progress.step % cfg.log_interval == 0 or progress.batches_done == steps:
            totals = interval.close(stop=bool(received))
            sums.add_seconds(totals.seconds)
            timing.add(totals.seconds, totals.wait_s, totals.steps)
            write_interval_row(setup, epoch, progress, steps, network.optimizer.param_groups[0]["lr"], totals, bar)
            if totals.stop and progress.batches_done < steps:
                break
    bar.close()
    return sums.over_ranks(), timing


def write_interval_row(setup: Setup, epoch: int, progress: Progress, steps: int, lr: float, totals: IntervalTotals,
                       bar) -> None:
    """The interval's row of metrics (logged and printed by rank 0, under the progress bar); a RunEnded when its
    loss diverged."""
    speed = pace(totals.seconds, totals.steps, totals.images, totals.wait_s)
    row = {"step": progress.step, "loss": totals.loss, "lr": lr, **speed,
           **eta_s(speed["step_time_s"], steps - progress.batches_done, setup.cfg.epochs - epoch - 1, steps),
           **peak_memory(setup.rank.device)}
    if setup.rank.is_main:
        setup.run.log(row)
        bar.write(interval_line(epoch, row))
    if not math.isfinite(row["loss"]):
        raise RunEnded(1, f"diverged: loss is {row['loss']} at epoch {epoch + 1}, step {row['step']}; the last "
                          f"good checkpoint is {setup.run.checkpoint} (try a lower --lr)")


def peak_memory(device: torch.device) -> dict:
    """The most GPU memory this process has held in tensors so far; read from the allocator's host-side counters,
    without a sync."""
    return {"peak_gpu_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}


def memory_note(row: dict) -> str:
    """", peak N GiB" for a row measured on a GPU, else ""."""
    return f", peak {row['peak_gpu_mem_gib']:.1f} GiB" if "peak_gpu_mem_gib" in row else ""


def interval_line(epoch: int, row: dict) -> str:
    return (f"epoch {epoch + 1} step {row['step']}: loss {row['loss']:.4f}, lr {row['lr']:g}, "
            f"{row['images_per_s']:,.0f} images/s, step {row['step_time_s']:.3g} s, data wait "
            f"{row['data_wait_s']:.3g} s ({row['data_wait_share']:.0%}){memory_note(row)}, ETA epoch "
            f"{duration(row['eta_epoch_s'])}, run {duration(row['eta_run_s'])}")


def end_epoch(setup: Setup, epoch: int, sums: EpochSums, timing: StepTiming, val, network: Network,
              progress: Progress, steps: int, bad_samples: int) -> dict:
    """Validation, the learning-rate schedule, and the epoch's row of metrics (logged and printed by rank 0);
    bad_samples: how many were replaced in the epoch (--bad_samples=skip)."""
    rank, run, cfg = setup.rank, setup.run, setup.cfg
    val_start = time.perf_counter()
    metrics = validate(network.eval, val, rank.device, setup.numerics.autocast, setup.progress_bar)
    val_time_s = time.perf_counter() - val_start
    network.schedule.step(metrics["val_top1_err"])
    speed = timing.per_step()  # of the steps this process ran (the whole epoch, unless it resumed mid-epoch)
    row = {"epoch": epoch + 1, "step": progress.step, "train_loss": sums.loss / sums.images,
           "train_top1_err": 1 - sums.correct / sums.images, **metrics, "lr": network.optimizer.param_groups[0]["lr"],
           "epoch_time_s": sums.seconds, "images_per_s": sums.images / sums.seconds, "val_time_s": val_time_s, **speed,
           "bad_samples": bad_samples,
           "eta_run_s": (cfg.epochs - epoch - 1) * (speed["step_time_s"] * steps + val_time_s),
           **peak_memory(rank.device)}
    if rank.is_main:
        run.log(row)
        run.draw_curves()
        print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, "
              f"train top-1 err {row['train_top1_err']:.2%}, val top-1 err {row['val_top1_err']:.2%}, "
              f"val top-5 err {row['val_top5_err']:.2%}, {sums.seconds:.0f} s + validation {val_time_s:.0f} s, "
              f"{row['images_per_s']:,.0f} images/s, data wait {row['data_wait_share']:.0%}{memory_note(row)}, "
              f"next lr {row['lr']:g}, ETA run {duration(row['eta_run_s'])}", flush=True)
    if not math.isfinite(row["train_loss"]):
        raise RunEnded(1, f"diverged: mean train loss of epoch {epoch + 1} is {row['train_loss']}")
    return metrics


def make_loaders(setup: Setup, progress: Progress, known_bad: dict[int, str] | None = None):
    """(training, validation) loaders of this rank. Training: a new global permutation every epoch
    (pipeline/order.py), the same global batches on any number of ranks, a resumed run starting at its next global
    step without reading the ones before, the bad samples in `known_bad` ({sample: key}) replaced from the start.
    Validation: each rank reads its own 1/world_size of the split."""
    cfg, rank = setup.cfg, setup.rank
    common = dict(rank=rank.rank, world_size=rank.world_size,
                  output=pipeline.Output(**setup.numerics.loader_output, mean=cfg.mean),
                  reading=pipeline.Reading(num_threads=cfg.num_threads or rank.cpus, storage=cfg.storage,
                                           reader_workers=None if cfg.reader_workers < 0 else cfg.reader_workers,
                                           reads_in_flight=cfg.reads_in_flight or None))
    with usage_errors():  # a manifest the user must fix (e.g. a shard path outside DATA)
        val = pipeline.eval_loader(cfg.data, "val", "center", cfg.batch_size, **common)
        train = pipeline.train_loader(cfg.data, cfg.batch_size, seed=cfg.seed, epoch=progress.epoch,
                                      start_step=progress.batches_done, steps_per_epoch=cfg.max_steps_per_epoch,
                                      lighting=cfg.lighting, bad_samples=cfg.bad_samples, known_bad=known_bad,
                                      **common)
    return train, val


def fit(cfg: TrainConfig, rank: Rank, inference: dict, dataset: dict, received: list[str]) -> dict:
    """Set up the network and loaders, resume or start from --init's weights, train the remaining epochs; the last
    validation metrics."""
    run = RunDirectory(cfg.run, tensorboard=cfg.tensorboard)
    if cfg.init and resume_path(cfg.resume):
        raise UsageError(f"--init={cfg.init} and --resume={cfg.resume}: a run starts from one of them")
    with usage_errors("; --resume=false starts over"):
        start = run.resume_from(cfg.resume)
    checkpoint = start[1] if start else None
    num_classes = len(inference["classes"])
    setup = Setup(cfg, rank, training_numerics(cfg, rank.device), run, num_classes, inference, dataset,
                  run.origin(*start) if start else None)
    network = build_network(cfg, num_classes, rank, setup.numerics.channels_last)
    progress = resume(setup, start, network) if start else Progress()
    if cfg.init and start and rank.is_main:
        print(f"--init={cfg.init} starts new runs only: continuing from {start[0]}", flush=True)
    elif cfg.init and not start:
        with usage_errors():
            note = start_from_weights(network.raw, cfg.init, inference["classes"])
        if rank.is_main:
            print(note, flush=True)
    known_bad = run.known_bad_samples(start[0]) if start else []
    train, val = make_loaders(setup, progress, known_bad_in(known_bad) if start else None)
    if rank.is_main:  # once the data is known to be there: a run that cannot start removes nothing
        removed = run.start(cfg, start, known_bad)
        if removed:
            print(f"removed from {run.path} the checkpoints of the run it held before: "
                  f"{', '.join(p.name for p in removed)}", flush=True)
    steps = train.order.steps_per_epoch
    if rank.is_main and progress.epoch >= cfg.epochs:
        print(f"{start[0]} has {progress.epoch} epochs done (--epochs={cfg.epochs}): nothing to train; "
              "validating it", flush=True)
    elif rank.is_main:
        print(f"training on {rank.world_size} x {rank.device.type} ({cfg.batch_size // rank.world_size} images per "
              f"rank per step), {num_classes} classes, epochs {progress.epoch + 1}..{cfg.epochs}, "
              f"lr {network.optimizer.param_groups[0]['lr']:g}")
    metrics = None
    for epoch in range(progress.epoch, cfg.epochs):
        seed_dropout(setup, epoch, progress, checkpoint)
        sums, timing = train_epoch(setup, epoch, train, network, progress, received)
        bad_samples = record_bad_samples(setup, train)
        if progress.batches_done < steps:
            progress.epoch_sums = sums
            save_checkpoint(setup, network, progress)
            raise RunEnded(EXIT_STOPPED_EARLY, f"{stopped(received)}; saved {run.checkpoint} at epoch {epoch + 1}, "
                                               f"batch {progress.batches_done}/{steps}; rerun to resume")
        best_before = network.schedule.best  # the lowest val top-1 error of the epochs before
        metrics = end_epoch(setup, epoch, sums, timing, val, network, progress, steps, bad_samples)
        progress = Progress(epoch + 1, 0, progress.step)
        save_checkpoint(setup, network, progress, new_best=metrics if metrics["val_top1_err"] < best_before else None)
        if epoch + 1 < cfg.epochs and all_sum([float(bool(received))], rank.device)[0] > 0:
            raise RunEnded(EXIT_STOPPED_EARLY, f"{stopped(received)}; saved {run.checkpoint} after epoch {epoch + 1}; "
                                               "rerun to resume")
    # A finished run that is rerun reports its checkpoint's metrics.
    return metrics or validate(network.eval, val, rank.device, setup.numerics.autocast, setup.progress_bar)


def fit_or_fail(cfg: TrainConfig, rank: Rank, inference: dict, dataset: dict, received: list[str]) -> dict:
    """fit(); what only this rank met (a bad sample in its part, a shard its reads found damaged, its GPU's memory
    exhausted) as RankFailed, in one line."""
    try:
        return fit(cfg, rank, inference, dataset, received)
    except pipeline.BadSampleError as e:
        skip = e.found[0].split == "train" and cfg.bad_samples == "stop"  # validation samples are never replaced
        way_out = "--bad_samples=skip replaces it and goes on" if skip else "restore or rebuild its shard"
        raise RankFailed(EXIT_BAD_SAMPLE, f"{e}; {way_out} (python -m shards verify names altered shards)") from None
    except DataError as e:
        raise RankFailed(2, f"error: {e}") from None
    except torch.OutOfMemoryError:
        per_rank = cfg.batch_size // rank.world_size
        raise RankFailed(1, f"error: out of memory on {rank.device} with {per_rank} images per rank "
                            f"(--batch_size={cfg.batch_size} over {rank.world_size} ranks, --dtype={cfg.dtype}): a "
                            "smaller --batch_size (lr scaled with it), or --dtype=bfloat16 if it was float32; the last "
                            f"checkpoint {Path(cfg.run) / 'checkpoint.pt'} is as it was") from None


def final_line(metrics: dict, cfg: TrainConfig) -> str:
    return (f"final: val top-1 error {metrics['val_top1_err']:.2%} (accuracy {1 - metrics['val_top1_err']:.2%}), "
            f"top-5 error {metrics['val_top5_err']:.2%} on {metrics['val_samples']} images (centre crop); "
            f"ten-crop: python eval.py --data={cfg.data} --checkpoint={Path(cfg.run) / 'checkpoint.pt'}")


def main(argv: list[str]) -> None:
    cfg = resolve_config(argv)
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs the tensorboard package: `make setup TB=1` installs it")
    with usage_errors():
        manifest = read_manifest(cfg.data)
        inference, dataset = inference_metadata(cfg, manifest), dataset_identity(manifest)
    rank = join_ranks(cfg.device)
    try:  # the process group ends on every way out
        if cfg.batch_size % rank.world_size:
            raise UsageError(f"--batch_size={cfg.batch_size} does not split evenly over {rank.world_size} ranks")
        limit_threads(rank.cpus)
        with stop_signals() as received:
            alone = False  # a failure of this rank only
            try:
                code, message = 0, final_line(fit_or_fail(cfg, rank, inference, dataset, received), cfg)
            except RunEnded as end:
                (code, message), alone = end.args, isinstance(end, RankFailed)
            if rank.is_main or alone:
                print(message, file=sys.stdout if code in (0, EXIT_STOPPED_EARLY) else sys.stderr, flush=True)
            if rank.world_size > 1 and not alone:  # torchrun stops every rank once one exits non-zero: none before
                dist.barrier()  # rank 0 has saved
    finally:
        leave_ranks()
    sys.exit(code)


if __name__ == "__main__":
    run_main(main)
