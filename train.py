"""Train AlexNet on ImageNet shards with the recipe of Krizhevsky, Sutskever & Hinton (2012).

    python train.py --data=data/imagenet --run=runs/alexnet                     # one GPU (or the CPU)
    python train.py --data=data/imagenet --run=runs/alexnet --compile           # faster on a GPU
    torchrun --nproc_per_node=8 train.py -- --data=data/imagenet --run=runs/a8  # DDP: 8 GPUs, 16 images each
    python train.py --data=data/sample --run=runs/demo --preset=demo            # `make demo`: 2 CPU cores
    python train.py --help                                                      # every option

torchrun needs the `--`: otherwise its own parser takes `--run=...` for an abbreviation of its `--run-path`.
Rerunning a command continues from RUN/checkpoint.pt (written at each epoch end; --resume=false starts over).

Batch size and learning rate with several GPUs: `batch_size` is global. With N ranks each rank takes
batch_size/N images per step and DDP averages the gradients, so a step is the same computation as one device
doing the whole batch (AlexNet has no batch normalisation), and `lr` needs no change: more GPUs make each step
faster, not different. To use the extra GPUs for larger batches instead, raise both: the linear rule
(lr = 0.01 * batch_size / 128, Goyal et al. 2017) is the usual starting point; it is not applied automatically.

SIGTERM or SIGUSR1 (Slurm's warning before the time limit) to any rank: at the next log interval all ranks
agree to stop, rank 0 writes RUN/checkpoint.pt with the batches done in the current epoch, prints a line
starting `preempted:` and every rank exits with status 75 (EX_TEMPFAIL: stopped early, rerun to resume; status 0
means finished, also when a signal came after the last check). The rerun starts directly at the next global step
(nothing before it is read again), also on another number of GPUs: every epoch is a fresh permutation of the
training set drawn from (seed, epoch), and global step s is the same batch on any number of ranks
(pipeline/order.py). On the same number of ranks the run equals one that was never stopped, bit for bit on the
CPU (the tests check it). An epoch has N // batch_size steps: the N % batch_size samples left at the end of its
permutation, a different random set every epoch, wait for the next. A NaN/inf loss ends the run with status 1
and leaves the last checkpoint as it was.
"""
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from config import parse_config, save_config
from model import AlexNet
import pipeline
from pipeline import read_manifest
from runtime import UsageError, available_cpus, limit_threads, load_checkpoint, run_main


@dataclass
class Config:
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


def derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence(keys).generate_state(1)[0] % 2**31)


class DropOnPlateau:
    """lr /= 10 when val error has not improved for `patience` epochs in a row, at most `max_drops` times.

    The paper's heuristic ("divide by 10 when the validation error rate stopped improving"); it gives no patience.
    """

    def __init__(self, optimizer, patience: int, max_drops: int):
        self.optimizer, self.patience, self.max_drops = optimizer, patience, max_drops
        self.best, self.bad_epochs, self.drops = math.inf, 0, 0

    def step(self, error: float) -> None:
        self.best, self.bad_epochs = (error, 0) if error < self.best else (self.best, self.bad_epochs + 1)
        if self.bad_epochs >= self.patience and self.drops < self.max_drops:
            for group in self.optimizer.param_groups:
                group["lr"] /= 10
            self.drops, self.bad_epochs = self.drops + 1, 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "drops": self.drops}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs, self.drops = state["best"], state["bad_epochs"], state["drops"]


def parameter_groups(model: torch.nn.Module, weight_decay: float, decay_biases: bool) -> list[dict]:
    """SGD parameter groups: weight decay on the weights, and on the biases only with `decay_biases`.

    The paper's update rule decays the weights w; cuda-convnet applied its `wc` to weights only and Caffe's
    reference AlexNet gives biases no decay. Decayed for 90 epochs, the biases initialised to 1 would shrink
    to about 0.2 from the decay alone.
    """
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return [{"params": [m.weight for m in layers], "weight_decay": weight_decay},
            {"params": [m.bias for m in layers], "weight_decay": weight_decay if decay_biases else 0.0}]


def all_sum(values: list[float] | torch.Tensor, device) -> torch.Tensor:
    """Sum over ranks, in float64 so that counts stay exact. A host-device sync: use at intervals only."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.cpu()


@torch.no_grad()
def evaluate(model, loader, device, autocast) -> dict:
    """Centre-crop loss and top-1/top-5 errors, summed over every real sample of every rank: exact."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 correct, top-5 correct, samples
    for images, labels in loader:
        with autocast:
            logits = model(images)  # float32 even under autocast: fc8 computes in float32
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(1).sum()
        sums[3] += len(labels)
    loss, top1, top5, n = all_sum(sums, device).tolist()
    return {"val_loss": loss / n, "val_top1_err": 1 - top1 / n, "val_top5_err": 1 - top5 / n, "val_samples": int(n)}


def configure_cuda(cfg: Config) -> None:
    """Backend settings for training on a GPU."""
    torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution algorithms once
    # TF32 only under bfloat16 (PyTorch's default allows it in every convolution): --dtype=float32 means float32.
    # Under bfloat16 the float32 products left are fc8's, whose bfloat16 inputs TF32 holds exactly, and LRN's
    # window sums, where it rounds only the small alpha/n * sum term (model/__init__.py).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.dtype == "bfloat16"


def build_model(cfg: Config, num_classes: int, device: torch.device, channels_last: bool, distributed: bool):
    """(the plain model, the model to train (DDP and/or compiled), the model to evaluate (compiled, no DDP))."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    raw_model = AlexNet(num_classes=num_classes, dropout=cfg.dropout).to(device)
    if channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    # No buffer broadcast before every forward: the model's only buffers are LRN's constant band matrices.
    ddp = torch.nn.parallel.DistributedDataParallel
    ddp_model = ddp(raw_model, broadcast_buffers=False) if distributed else raw_model
    # Compile the DDP wrapper, not the module inside it: then gradient all-reduces overlap the compiled backward.
    train_model = torch.compile(ddp_model) if cfg.compile else ddp_model
    return raw_model, train_model, torch.compile(raw_model) if cfg.compile else raw_model


def make_optimizer(cfg: Config, model: torch.nn.Module, fused: bool) -> torch.optim.SGD:
    """The paper's SGD. PyTorch's keeps the velocity of g + wd*w and multiplies by lr when stepping; the paper's
    rule puts lr inside the velocity. They differ only for a few steps after an lr drop."""
    return torch.optim.SGD(parameter_groups(model, cfg.weight_decay, cfg.decay_biases), lr=cfg.lr,
                           momentum=cfg.momentum, fused=fused)


def train_step(model, optimizer, images, labels, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch: (loss, logits), both left on the device (no host sync)."""
    with autocast:
        logits = model(images)
    loss = F.cross_entropy(logits, labels)  # float32 logits (fc8 computes in float32)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits


def seed_dropout(seed: int, epoch: int, skip: int, rank: int, world_size: int, ckpt: dict | None, device) -> None:
    """Dropout masks: drawn per (seed, epoch, rank); a run stopped mid-epoch continues the stopped RNG streams.

    Resumed on another number of ranks, the streams are rank-local and cannot be carried over: the rest of the
    epoch draws its masks from (seed, epoch, step, rank) instead (the data and augmentation are unaffected).
    """
    if ckpt is None:
        torch.manual_seed(derived_seed(seed, epoch, rank))
    elif ckpt["world_size"] != world_size:
        torch.manual_seed(derived_seed(seed, epoch, skip, rank))
    else:
        torch.set_rng_state(ckpt["rng"][rank]["cpu"])
        if device.type == "cuda" and "cuda" in ckpt["rng"][rank]:
            torch.cuda.set_rng_state(ckpt["rng"][rank]["cuda"], device)


def save_atomically(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(path.with_name("curves.tmp.png"), dpi=100)
    plt.close(fig)
    os.replace(path.with_name("curves.tmp.png"), path)


def resolve_config(argv: list[str]) -> Config:
    """Defaults, then the preset, then the explicit --key=value options."""
    cfg = parse_config(Config, argv, description=__doc__)
    if cfg.preset == "demo":
        explicit = {a[2:].partition("=")[0].replace("-", "_") for a in argv if a.startswith("--")}
        cfg = replace(cfg, **{k: v for k, v in DEMO.items() if k not in explicit})
    return cfg


def main(argv: list[str]) -> None:
    # ---- config
    cfg = resolve_config(argv)
    try:
        num_classes = len(read_manifest(cfg.data)["classes"])
    except (OSError, ValueError) as e:
        raise UsageError(str(e)) from None

    # ---- setup: processes, device, run directory, signals
    distributed = "RANK" in os.environ  # started by torchrun
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank, local_size = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device=cuda but no CUDA GPU is visible")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cfg.batch_size % world_size:
        raise UsageError(f"--batch_size={cfg.batch_size} does not split evenly over {world_size} ranks")
    if distributed:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    master = rank == 0
    if cuda:
        configure_cuda(cfg)
    bf16 = cuda and cfg.dtype == "bfloat16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16)
    channels_last = cuda and cfg.channels_last
    run = Path(cfg.run)
    ckpt_path, metrics_path = run / "checkpoint.pt", run / "metrics.jsonl"
    try:
        ckpt = load_checkpoint(ckpt_path) if cfg.resume and ckpt_path.exists() else None
    except ValueError as e:
        raise UsageError(f"{e}; --resume=false starts over") from None
    if master:
        run.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run / "config.json")
    cpus = max(1, available_cpus() // local_size)  # this rank's share of the node
    limit_threads(cpus)
    stop_signal = []  # set by the handler, acted on at the next sync point so that all ranks stop together
    previous_handlers = {sig: signal.signal(sig, lambda signum, frame: stop_signal.append(signal.Signals(signum).name))
                         for sig in (signal.SIGTERM, signal.SIGUSR1)}

    # ---- validation loader: each rank reads its own 1/world_size of the split
    per_rank = cfg.batch_size // world_size
    common = dict(rank=rank, world_size=world_size,
                  output=pipeline.Output(device=device, dtype="bfloat16" if bf16 else "float32",
                                         channels_last=channels_last, mean=cfg.mean),
                  reading=pipeline.Reading(num_threads=cfg.num_threads or cpus, storage=cfg.storage))
    try:
        val = pipeline.eval_loader(cfg.data, "val", "center", cfg.batch_size, **common)
    except ValueError as e:  # a manifest the user must fix (e.g. a shard path outside DATA)
        raise UsageError(str(e)) from None

    # ---- model, optimiser and schedule
    raw_model, train_model, model = build_model(cfg, num_classes, device, channels_last, distributed)
    optimizer = make_optimizer(cfg, raw_model, fused=cuda)
    schedule = DropOnPlateau(optimizer, cfg.lr_patience, cfg.max_lr_drops)
    start_epoch, skip, step, carried, rows = 0, 0, 0, [0.0, 0.0, 0.0, 0.0], []
    if ckpt is not None:
        try:
            raw_model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            schedule.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:  # another network, or a checkpoint of an older version
            raise UsageError(f"{ckpt_path} does not fit this run ({' '.join(str(e).split())[:300]}); "
                             "--resume=false starts over") from None
        start_epoch, skip, step = ckpt["epoch"], ckpt["batches_done"], ckpt["step"]
        # Loss, correct and images are sums over all ranks, carried once by rank 0; the seconds are the ranks' mean,
        # which the epoch's end divides by the number of ranks again.
        loss_sum, correct, images, seconds = ckpt["epoch_sums"]
        carried = [loss_sum, correct, images, seconds * world_size] if master else carried
        moved = [k for k in ("batch_size", "seed") if skip and ckpt["config"].get(k) != getattr(cfg, k)]
        if moved:  # batches_done counts batches of the old order, which these options change
            raise UsageError(f"{ckpt_path} stopped in the middle of epoch {start_epoch + 1} with another "
                             f"{' and '.join('--' + k for k in moved)}: resume with the checkpoint's value (the "
                             "order of that epoch depends on it)")
        changed = sorted(k for k, v in ckpt["config"].items() if asdict(cfg).get(k) != v and k != "resume")
        if ckpt["world_size"] != world_size:  # the global batches stay the same: the epoch simply continues
            changed.append(f"ranks {ckpt['world_size']} -> {world_size}")
        if master:
            print(f"resuming from {ckpt_path}: epoch {start_epoch} done, +{skip} batches, step {step}"
                  + (f" (changed since: {', '.join(changed)})" if changed else ""), flush=True)
    if master and metrics_path.exists():  # drop lines written after the checkpoint (a crash, not a clean stop)
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()] if ckpt else []
        rows = [r for r in rows if r["step"] <= step]
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def log(row: dict) -> None:
        rows.append(row)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def checkpoint(epochs_done: int, batches_done: int, epoch_sums: torch.Tensor) -> None:
        totals = all_sum(epoch_sums, device).tolist()  # every rank's part of the interrupted epoch
        totals[3] /= world_size  # seconds: the ranks' mean (each rank timed the same steps)
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)} if cuda else {})}
        rngs = [None] * world_size
        if distributed:
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        if master:
            save_atomically({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": schedule.state_dict(), "epoch": epochs_done, "batches_done": batches_done,
                             "step": step, "epoch_sums": totals, "config": asdict(cfg),
                             "num_classes": num_classes, "world_size": world_size, "rng": rngs}, ckpt_path)

    def finish(code: int, message: str = "") -> None:
        if message and master:
            print(message, file=sys.stdout if code in (0, EXIT_STOPPED_EARLY) else sys.stderr, flush=True)
        if distributed:
            dist.barrier()  # torchrun stops every rank once one exits non-zero: none leaves before rank 0 has saved
            dist.destroy_process_group()
        # A process that goes on after main() (the tests call it) must not keep a SIGTERM handler: pool workers it
        # forks later would inherit it and never end when their pool terminates them.
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        sys.exit(code)

    # ---- training loader: a new global permutation every epoch (pipeline/order.py), the same global batches on
    # any number of ranks; a resumed run starts at its next global step without reading the ones before
    try:
        loader = pipeline.train_loader(cfg.data, cfg.batch_size, seed=cfg.seed, epoch=start_epoch,
                                       start_step=skip, steps_per_epoch=cfg.max_steps_per_epoch,
                                       lighting=cfg.lighting, **common)
    except ValueError as e:
        raise UsageError(str(e)) from None
    steps = loader.order.steps_per_epoch

    # ---- loop
    if master:
        print(f"training on {world_size} x {device.type} ({per_rank} images per rank per step), "
              f"{num_classes} classes, epochs {start_epoch + 1}..{cfg.epochs}, lr {optimizer.param_groups[0]['lr']:g}")
    for epoch in range(start_epoch, cfg.epochs):
        seed_dropout(cfg.seed, epoch, skip, rank, world_size, ckpt if skip else None, device)
        train_model.train()
        epoch_sums = torch.tensor(carried, dtype=torch.float64, device=device)  # loss, correct, images, seconds
        interval = torch.zeros(2, dtype=torch.float64, device=device)  # loss * images, images
        clock = time.perf_counter()
        seen = []
        bar = tqdm(total=steps, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not master,
                   leave=False, dynamic_ncols=True)
        for images, labels in loader:
            done = loader.step  # steps of this epoch done, this one included
            loss, logits = train_step(train_model, optimizer, images, labels, autocast)
            step += 1
            bar.update()
            # Running sums stay on the device: no .item() (nor a tensor made from a Python number, which is a
            # blocking copy) here, either would make the host wait for the GPU every step.
            n, loss_sum = len(labels), loss.detach().double() * len(labels)
            epoch_sums[0] += loss_sum
            epoch_sums[1] += (logits.argmax(1) == labels).sum()
            epoch_sums[2] += n
            interval[0] += loss_sum
            interval[1] += n
            if cfg.log_labels:
                seen += labels.tolist()
            if step % cfg.log_interval == 0 or done == steps:
                # The one sync point: loss, images and the stop flag summed over ranks in one all_reduce.
                sums = all_sum([*interval.tolist(), float(bool(stop_signal))], device)
                total_loss, total_images, stop = sums.tolist()
                now = time.perf_counter()
                loss_mean, lr = total_loss / total_images, optimizer.param_groups[0]["lr"]
                row = {"step": step, "loss": loss_mean, "lr": lr, "images_per_s": total_images / (now - clock)}
                epoch_sums[3] += now - clock
                clock, interval = now, torch.zeros_like(interval)
                if master:
                    log(row)
                    bar.write(f"epoch {epoch + 1} step {step}: loss {loss_mean:.4f}, lr {lr:g}, "
                              f"{row['images_per_s']:,.0f} images/s")
                if not math.isfinite(loss_mean):
                    finish(1, f"diverged: loss is {loss_mean} at epoch {epoch + 1}, step {step}; the last good "
                              f"checkpoint is {ckpt_path} (try a lower --lr)")
                if stop and done < steps:
                    checkpoint(epoch, done, epoch_sums)
                    finish(EXIT_STOPPED_EARLY, f"preempted: {', '.join(stop_signal) or 'another rank was signalled'}; "
                                               f"saved {ckpt_path} at epoch {epoch + 1}, batch {done}/{steps}; "
                                               "rerun to resume")
        bar.close()
        if cfg.log_labels:
            # One write: every rank prints this line, and a line written in parts can interleave with another rank's.
            sys.stdout.write(f"labels rank {rank} epoch {epoch + 1}: {json.dumps(sorted(seen))}\n")
            sys.stdout.flush()
        total_loss, correct, total_images, seconds = all_sum(epoch_sums, device).tolist()
        seconds /= world_size
        metrics = evaluate(model, val, device, autocast)
        schedule.step(metrics["val_top1_err"])
        row = {"epoch": epoch + 1, "step": step, "train_loss": total_loss / total_images,
               "train_top1_err": 1 - correct / total_images, **metrics, "lr": optimizer.param_groups[0]["lr"],
               "epoch_time_s": seconds, "images_per_s": total_images / seconds}
        skip, carried = 0, [0.0, 0.0, 0.0, 0.0]
        if master:
            log(row)
            plot_curves(rows, run / "curves.png")
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, "
                  f"train top-1 err {row['train_top1_err']:.2%}, val top-1 err {row['val_top1_err']:.2%}, "
                  f"val top-5 err {row['val_top5_err']:.2%}, {seconds:.0f} s, {row['images_per_s']:,.0f} images/s, "
                  f"next lr {row['lr']:g}", flush=True)
        if not math.isfinite(row["train_loss"]):
            finish(1, f"diverged: mean train loss of epoch {epoch + 1} is {row['train_loss']}")
        checkpoint(epoch + 1, 0, torch.zeros(4, dtype=torch.float64))
        if epoch + 1 < cfg.epochs and all_sum([float(bool(stop_signal))], device)[0] > 0:
            finish(EXIT_STOPPED_EARLY, f"preempted: {', '.join(stop_signal) or 'another rank was signalled'}; "
                                       f"saved {ckpt_path} after epoch {epoch + 1}; rerun to resume")

    # ---- final evaluation: the last epoch's, or the checkpoint's when a finished run is rerun
    if start_epoch >= cfg.epochs:
        metrics = evaluate(model, val, device, autocast)
    if master:
        print(f"final: val top-1 error {metrics['val_top1_err']:.2%} (accuracy {1 - metrics['val_top1_err']:.2%}), "
              f"top-5 error {metrics['val_top5_err']:.2%} on {metrics['val_samples']} images (centre crop); "
              f"ten-crop: python eval.py --data={cfg.data} --checkpoint={ckpt_path}", flush=True)
    finish(0)


if __name__ == "__main__":
    run_main(main)
