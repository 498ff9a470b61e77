"""Train AlexNet on ImageNet shards with the recipe of Krizhevsky, Sutskever & Hinton (2012).

    python train.py --data=data/imagenet --run=runs/alexnet                     # one GPU (or the CPU)
    python train.py --data=data/imagenet --run=runs/alexnet --compile           # faster on a GPU
    torchrun --nproc_per_node=8 train.py -- --data=data/imagenet --run=runs/a8  # DDP: 8 GPUs, 16 images each
    python train.py --data=data/sample --run=runs/demo --preset=demo            # `make demo`: 2 CPU cores
    python train.py --help                                                      # every option

torchrun needs the `--`: otherwise its own parser takes `--run=...` for an abbreviation of its `--run-path`.
Rerunning a command continues from RUN/checkpoint.pt (written at each epoch end; --resume=false starts over).

`batch_size` is global: with N ranks each takes batch_size/N images per step and DDP averages the gradients, so a
step computes the same as one device doing the whole batch (AlexNet has no batch normalisation) and `lr` needs no
change. For larger batches raise both (lr = 0.01 * batch_size / 128 is the usual start); nothing is rescaled.

SIGTERM or SIGUSR1 (Slurm's warning before the time limit) to any rank: at the next log interval all ranks agree
to stop, rank 0 saves RUN/checkpoint.pt mid-epoch, prints `preempted: ...`, and every rank exits with status 75
(EX_TEMPFAIL: rerun to resume; 0 means finished). The rerun starts directly at the next global step, also on
another number of GPUs: each epoch is a permutation drawn from (seed, epoch), and global step s is the same batch
on any number of ranks (pipeline/order.py); on as many ranks, the run equals one never stopped, bit for bit on the
CPU. An epoch has N // batch_size steps; the N % batch_size samples left, a new random set each epoch, wait for
the next. A NaN/inf loss ends the run with status 1 and leaves the last checkpoint as it was.
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import pipeline
from config import parse_config
from model.recipe import DropOnPlateau, Numerics, build_model, make_optimizer, numerics, seed_dropout, train_step
from pipeline import read_manifest
from rundir import Progress, RunDirectory
from runtime import (Rank, UsageError, all_sum, join_ranks, leave_ranks, limit_threads, load_checkpoint, run_main,
                     stop_signals, topk_correct, usage_errors)


@dataclass
class TrainConfig:
    data: str = "data/sample"  # shard directory written by `python -m shards build`
    run: str = "runs/alexnet"  # output directory: config.json, metrics.jsonl, curves.png, checkpoint.pt
    preset: Literal["none", "demo"] = "none"  # demo: the built-in sample on 2 CPU cores (explicit options still win)
    epochs: int = 90  # passes over the training set
    batch_size: int = 128  # images per step, summed over all ranks
    lr: float = 0.01  # learning rate per step of batch_size images (not rescaled with the GPU count)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty on the weights, as in the paper's update rule
    decay_biases: bool = False  # also decay the biases (the paper's rule, cuda-convnet and Caffe decay weights only)
    lr_patience: int = 2  # epochs in a row without a new best val top-1 error before lr /= 10
    max_lr_drops: int = 3  # the paper divided the learning rate by 10 three times
    dropout: float = 0.5  # dropout probability on the outputs of fc6 and fc7
    lighting: float = 0.1  # std of the PCA lighting coefficients (0: off)
    mean: Literal["pixel", "channel"] = "pixel"  # subtract the per-pixel mean image (the paper) or the RGB mean
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when there is one
    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # autocast dtype on the GPU (float32: no TF32; CPU: float32)
    channels_last: bool = True  # NHWC memory layout on the GPU (faster convolutions on tensor cores)
    compile: bool = False  # torch.compile the model (about a minute of compiling first)
    num_threads: int = 0  # DALI CPU threads per rank (0: this node's CPUs divided among its ranks)
    reader_workers: int = -1  # processes reading training samples per rank (-1: the loader's default; 0: none)
    storage: Literal["local", "network"] = "local"  # where DATA lives: network = Lustre/GPFS/NFS (validation I/O)
    log_interval: int = 100  # steps between metric lines (the only host-device syncs in the loop)
    max_steps_per_epoch: int = 0  # end each epoch after this many global steps (0: the whole epoch; quick tests)
    seed: int = 0  # seeds the data order (a new permutation each epoch), augmentation, dropout and initialisation
    resume: bool = True  # continue from RUN/checkpoint.pt when there is one (false: start over)
    log_labels: bool = False  # each rank prints the labels it trained on (to test the data split across ranks)


# The demo preset: full AlexNet on the built-in sample (10 classes, 400 training images) on 2 CPU cores in under
# 10 minutes. Batches of 16 give 25 steps per epoch. lr 0.001: the paper's 0.01 is stable only with many classes
# (with 10, the bias-1 initialisation lets one step move all logits together by a lot and the loss jumps to ~20).
# No dropout: it halves the useful signal per step, and a few hundred steps leave no time to overfit anyway.
# lr_patience=3: 100 validation images give noisy errors, which must not end the run's learning early.
DEMO = dict(epochs=4, batch_size=16, lr=0.001, dropout=0.0, lr_patience=3, log_interval=5, num_threads=2)

EXIT_STOPPED_EARLY = 75  # exit status after a stop signal: checkpoint saved, not finished (EX_TEMPFAIL of sysexits.h)


@torch.no_grad()
def validate(model, loader, device, autocast) -> dict:
    """Centre-crop loss and top-1/top-5 errors, summed over every real sample of every rank: exact."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 correct, top-5 correct, samples
    for images, labels in loader:
        with autocast:
            logits = model(images)  # float32 even under autocast: fc8 computes in float32
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1:3] += topk_correct(logits, labels)
        sums[3] += len(labels)
    loss, top1, top5, n = all_sum(sums, device).tolist()
    return {"val_loss": loss / n, "val_top1_err": 1 - top1 / n, "val_top5_err": 1 - top5 / n, "val_samples": int(n)}


def resolve_config(argv: list[str]) -> TrainConfig:
    """Defaults, then the preset, then the explicit --key=value options."""
    cfg = parse_config(TrainConfig, argv, description=__doc__)
    if cfg.preset == "demo":
        explicit = {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        cfg = replace(cfg, **{k: v for k, v in DEMO.items() if k not in explicit})
    return cfg


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


class RunEnded(Exception):
    """RunEnded(code, message): the run ends before its last epoch with exit status `code` after `message`."""


def resume(setup: Setup, checkpoint: dict, network: Network) -> Progress:
    """Load the checkpoint into the network; where it stood, with rank 0 carrying the unfinished epoch's sums."""
    cfg, rank, path = setup.cfg, setup.rank, setup.run.checkpoint
    try:
        network.raw.load_state_dict(checkpoint["model"])
        network.optimizer.load_state_dict(checkpoint["optimizer"])
        network.schedule.load_state_dict(checkpoint["scheduler"])
    except (KeyError, ValueError, RuntimeError) as e:  # another network, or a checkpoint of an older version
        raise UsageError(f"{path} does not fit this run ({' '.join(str(e).split())[:300]}); "
                         "--resume=false starts over") from None
    progress = Progress(checkpoint["epoch"], checkpoint["batches_done"], checkpoint["step"])
    moved = [k for k in ("batch_size", "seed") if checkpoint["config"].get(k) != getattr(cfg, k)]
    if moved and progress.batches_done:  # batches_done counts batches of the old order, which these options change
        raise UsageError(f"{path} stopped in the middle of epoch {progress.epoch + 1} with another "
                         f"{' and '.join('--' + k for k in moved)}: resume with the checkpoint's value (the order of "
                         "that epoch depends on it)")
    if rank.is_main:  # the epoch's end sums over ranks, and divides the seconds by the number of ranks again
        loss_sum, correct, images, seconds = checkpoint["epoch_sums"]
        progress.epoch_sums = [loss_sum, correct, images, seconds * rank.world_size]
        changed = sorted(k for k, v in checkpoint["config"].items() if asdict(cfg).get(k) != v and k != "resume")
        if checkpoint["world_size"] != rank.world_size:  # the global batches stay the same: the epoch continues
            changed.append(f"ranks {checkpoint['world_size']} -> {rank.world_size}")
        print(f"resuming from {path}: epoch {progress.epoch} done, +{progress.batches_done} batches, step "
              f"{progress.step}" + (f" (changed since: {', '.join(changed)})" if changed else ""), flush=True)
    return progress


def save_checkpoint(setup: Setup, network: Network, progress: Progress, epoch_sums: torch.Tensor) -> None:
    """Every rank takes part (sums and RNG states are gathered); rank 0 writes."""
    rank = setup.rank
    totals = all_sum(epoch_sums, rank.device).tolist()  # every rank's part of the unfinished epoch
    totals[3] /= rank.world_size  # seconds: the ranks' mean (each rank timed the same steps)
    cuda = rank.device.type == "cuda"
    rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(rank.device)} if cuda else {})}
    rngs = [rng]
    if rank.world_size > 1:
        rngs = [None] * rank.world_size
        dist.all_gather_object(rngs, rng)
    if rank.is_main:
        setup.run.save({"model": network.raw.state_dict(), "optimizer": network.optimizer.state_dict(),
                        "scheduler": network.schedule.state_dict(), "epoch": progress.epoch,
                        "batches_done": progress.batches_done, "step": progress.step, "epoch_sums": totals,
                        "config": asdict(setup.cfg), "num_classes": setup.num_classes,
                        "world_size": rank.world_size, "rng": rngs})


def stopped(received: list[str]) -> str:
    return f"preempted: {', '.join(received) or 'another rank was signalled'}"


def train_epoch(setup: Setup, epoch: int, loader, network: Network, progress: Progress,
                received: list[str]) -> torch.Tensor:
    """Global steps of `epoch` from progress.batches_done to its end, or to the first sync point after a stop signal;
    progress advances with every step. Returns this rank's sums of the epoch (loss * images, correct, images,
    seconds), on the device."""
    cfg, rank, run = setup.cfg, setup.rank, setup.run
    steps, device = loader.order.steps_per_epoch, rank.device
    network.train.train()
    epoch_sums = torch.tensor(progress.epoch_sums, dtype=torch.float64, device=device)  # other ranks carry zeros
    interval = torch.zeros(2, dtype=torch.float64, device=device)  # loss * images, images
    clock, seen = time.perf_counter(), []
    bar = tqdm(total=steps, initial=progress.batches_done, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not rank.is_main, leave=False, dynamic_ncols=True)
    for images, labels in loader:
        loss, logits = train_step(network.train, network.optimizer, images, labels, setup.numerics.autocast)
        progress.step, progress.batches_done = progress.step + 1, loader.step
        bar.update()
        # Running sums stay on the device: no .item() (nor a tensor made from a Python number, which is a blocking
        # copy) here, either would make the host wait for the GPU every step.
        loss_sum = loss.detach().double() * len(labels)
        epoch_sums[0] += loss_sum
        epoch_sums[1] += (logits.argmax(1) == labels).sum()
        epoch_sums[2] += len(labels)
        interval[0] += loss_sum
        interval[1] += len(labels)
        if cfg.log_labels:
            seen += labels.tolist()
        if progress.step % cfg.log_interval == 0 or progress.batches_done == steps:
            # The one sync point: loss, images and the stop flag summed over ranks in one all_reduce.
            total_loss, total_images, stop = all_sum([*interval.tolist(), float(bool(received))], device).tolist()
            now = time.perf_counter()
            row = {"step": progress.step, "loss": total_loss / total_images,
                   "lr": network.optimizer.param_groups[0]["lr"], "images_per_s": total_images / (now - clock)}
            epoch_sums[3] += now - clock
            clock, interval = now, torch.zeros_like(interval)
            if rank.is_main:
                run.log(row)
                bar.write(f"epoch {epoch + 1} step {row['step']}: loss {row['loss']:.4f}, lr {row['lr']:g}, "
                          f"{row['images_per_s']:,.0f} images/s")
            if not math.isfinite(row["loss"]):
                raise RunEnded(1, f"diverged: loss is {row['loss']} at epoch {epoch + 1}, step {row['step']}; the last "
                                  f"good checkpoint is {run.checkpoint} (try a lower --lr)")
            if stop and progress.batches_done < steps:
                break
    bar.close()
    if cfg.log_labels:
        # One write: every rank prints this line, and a line written in parts can interleave with another rank's.
        sys.stdout.write(f"labels rank {rank.rank} epoch {epoch + 1}: {json.dumps(sorted(seen))}\n")
        sys.stdout.flush()
    return epoch_sums


def end_epoch(setup: Setup, epoch: int, epoch_sums: torch.Tensor, val, network: Network, progress: Progress) -> dict:
    """Validation, the learning-rate schedule, and the epoch's row of metrics (logged and printed by rank 0)."""
    rank, run = setup.rank, setup.run
    total_loss, correct, images, seconds = all_sum(epoch_sums, rank.device).tolist()
    seconds /= rank.world_size
    metrics = validate(network.eval, val, rank.device, setup.numerics.autocast)
    network.schedule.step(metrics["val_top1_err"])
    row = {"epoch": epoch + 1, "step": progress.step, "train_loss": total_loss / images,
           "train_top1_err": 1 - correct / images, **metrics, "lr": network.optimizer.param_groups[0]["lr"],
           "epoch_time_s": seconds, "images_per_s": images / seconds}
    if rank.is_main:
        run.log(row)
        run.draw_curves()
        print(f"epoch {epoch + 1}/{setup.cfg.epochs}: train loss {row['train_loss']:.4f}, "
              f"train top-1 err {row['train_top1_err']:.2%}, val top-1 err {row['val_top1_err']:.2%}, "
              f"val top-5 err {row['val_top5_err']:.2%}, {seconds:.0f} s, {row['images_per_s']:,.0f} images/s, "
              f"next lr {row['lr']:g}", flush=True)
    if not math.isfinite(row["train_loss"]):
        raise RunEnded(1, f"diverged: mean train loss of epoch {epoch + 1} is {row['train_loss']}")
    return metrics


def make_loaders(setup: Setup, progress: Progress):
    """(training, validation) loaders of this rank. Training: a new global permutation every epoch
    (pipeline/order.py), the same global batches on any number of ranks, a resumed run starting at its next global
    step without reading the ones before. Validation: each rank reads its own 1/world_size of the split."""
    cfg, rank, numerics = setup.cfg, setup.rank, setup.numerics
    common = dict(rank=rank.rank, world_size=rank.world_size,
                  output=pipeline.Output(device=rank.device, dtype=numerics.loader_dtype,
                                         channels_last=numerics.channels_last, mean=cfg.mean),
                  reading=pipeline.Reading(num_threads=cfg.num_threads or rank.cpus, storage=cfg.storage,
                                           reader_workers=None if cfg.reader_workers < 0 else cfg.reader_workers))
    with usage_errors():  # a manifest the user must fix (e.g. a shard path outside DATA)
        val = pipeline.eval_loader(cfg.data, "val", "center", cfg.batch_size, **common)
        train = pipeline.train_loader(cfg.data, cfg.batch_size, seed=cfg.seed, epoch=progress.epoch,
                                      start_step=progress.batches_done, steps_per_epoch=cfg.max_steps_per_epoch,
                                      lighting=cfg.lighting, **common)
    return train, val


def fit(cfg: TrainConfig, rank: Rank, num_classes: int, received: list[str]) -> dict:
    """Set up the network and loaders, resume, train the remaining epochs; the last validation metrics."""
    run = RunDirectory(cfg.run)
    with usage_errors("; --resume=false starts over"):
        checkpoint = load_checkpoint(run.checkpoint) if cfg.resume and run.checkpoint.exists() else None
    setup = Setup(cfg, rank, numerics(rank.device, cfg.dtype, cfg.channels_last), run, num_classes)
    network = build_network(cfg, num_classes, rank, setup.numerics.channels_last)
    progress = resume(setup, checkpoint, network) if checkpoint else Progress()
    if rank.is_main:
        run.start(cfg, progress.step if checkpoint else None)
    train, val = make_loaders(setup, progress)
    steps = train.order.steps_per_epoch
    if rank.is_main:
        print(f"training on {rank.world_size} x {rank.device.type} ({cfg.batch_size // rank.world_size} images per "
              f"rank per step), {num_classes} classes, epochs {progress.epoch + 1}..{cfg.epochs}, "
              f"lr {network.optimizer.param_groups[0]['lr']:g}")
    metrics = None
    for epoch in range(progress.epoch, cfg.epochs):
        seed_dropout(cfg.seed, epoch, progress.batches_done, rank.rank, rank.world_size,
                     checkpoint if progress.batches_done else None, rank.device)
        epoch_sums = train_epoch(setup, epoch, train, network, progress, received)
        if progress.batches_done < steps:
            save_checkpoint(setup, network, progress, epoch_sums)
            raise RunEnded(EXIT_STOPPED_EARLY, f"{stopped(received)}; saved {run.checkpoint} at epoch {epoch + 1}, "
                                               f"batch {progress.batches_done}/{steps}; rerun to resume")
        metrics = end_epoch(setup, epoch, epoch_sums, val, network, progress)
        progress = Progress(epoch + 1, 0, progress.step)
        save_checkpoint(setup, network, progress, torch.zeros(4, dtype=torch.float64))
        if epoch + 1 < cfg.epochs and all_sum([float(bool(received))], rank.device)[0] > 0:
            raise RunEnded(EXIT_STOPPED_EARLY, f"{stopped(received)}; saved {run.checkpoint} after epoch {epoch + 1}; "
                                               "rerun to resume")
    # A finished run that is rerun reports its checkpoint's metrics.
    return metrics or validate(network.eval, val, rank.device, setup.numerics.autocast)


def final_line(metrics: dict, cfg: TrainConfig) -> str:
    return (f"final: val top-1 error {metrics['val_top1_err']:.2%} (accuracy {1 - metrics['val_top1_err']:.2%}), "
            f"top-5 error {metrics['val_top5_err']:.2%} on {metrics['val_samples']} images (centre crop); "
            f"ten-crop: python eval.py --data={cfg.data} --checkpoint={Path(cfg.run) / 'checkpoint.pt'}")


def main(argv: list[str]) -> None:
    cfg = resolve_config(argv)
    with usage_errors():
        num_classes = len(read_manifest(cfg.data)["classes"])
    rank = join_ranks(cfg.device)
    try:  # the process group ends on every way out
        if cfg.batch_size % rank.world_size:
            raise UsageError(f"--batch_size={cfg.batch_size} does not split evenly over {rank.world_size} ranks")
        limit_threads(rank.cpus)
        with stop_signals() as received:
            try:
                code, message = 0, final_line(fit(cfg, rank, num_classes, received), cfg)
            except RunEnded as end:
                code, message = end.args
            if rank.is_main:
                print(message, file=sys.stdout if code in (0, EXIT_STOPPED_EARLY) else sys.stderr, flush=True)
            if rank.world_size > 1:  # torchrun stops every rank once one exits non-zero: none before rank 0 has saved
                dist.barrier()
    finally:
        leave_ranks()
    sys.exit(code)


if __name__ == "__main__":
    run_main(main)
