"""The paper's training recipe (section 5) on one device or several: the network as it trains, SGD with momentum 0.9
and weight decay on the weights, the learning rate divided by 10 when the validation error stops improving, and one
step of it.

    raw, net, eval_net = build_model(1000, dropout=0.5, seed=0, device=device, channels_last=True,
                                     distributed=False, compile=False)
    optimizer = make_optimizer(raw, lr=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False, fused=True)
    schedule = DropOnPlateau(optimizer, patience=2, max_drops=3)
    loss, logits = train_step(net, optimizer, images, labels, autocast)   # each step
    schedule.step(val_top1_err)                                           # each epoch
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import AlexNet
from runtime import derived_seed


def configure_cuda(dtype: str) -> None:
    """Backend settings for training on a GPU."""
    torch.backends.cudnn.benchmark = True  # fixed input shapes: pick the fastest convolution algorithms once
    # TF32 only under bfloat16 (PyTorch's default allows it in every convolution): --dtype=float32 means float32.
    # Under bfloat16 the float32 products left are fc8's, whose bfloat16 inputs TF32 holds exactly, and LRN's
    # window sums, where it rounds only the small alpha/n * sum term (model/__init__.py).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dtype == "bfloat16"


@dataclass(frozen=True)
class Numerics:
    """How the network computes on this device."""
    autocast: torch.autocast  # bfloat16 on a GPU with --dtype=bfloat16, otherwise disabled
    channels_last: bool
    loader_dtype: str  # what the loaders hand over: bfloat16 under autocast, float32 otherwise


def numerics(device: torch.device, dtype: str, channels_last: bool) -> Numerics:
    """bfloat16 autocast and channels-last on a GPU as asked (with configure_cuda's backend settings); float32 and
    the default layout on the CPU."""
    cuda = device.type == "cuda"
    if cuda:
        configure_cuda(dtype)
    bf16 = cuda and dtype == "bfloat16"
    return Numerics(torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16), cuda and channels_last,
                    "bfloat16" if bf16 else "float32")


def build_model(num_classes: int, *, dropout: float, seed: int, device: torch.device, channels_last: bool,
                distributed: bool, compile: bool) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(the plain model, the model to train (DDP and/or compiled), the model to evaluate (compiled, no DDP))."""
    torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    raw_model = AlexNet(num_classes=num_classes, dropout=dropout).to(device)
    if channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    # No buffer broadcast before every forward: the model's only buffers are LRN's constant band matrices.
    ddp = torch.nn.parallel.DistributedDataParallel
    ddp_model = ddp(raw_model, broadcast_buffers=False) if distributed else raw_model
    # Compile the DDP wrapper, not the module inside it: then gradient all-reduces overlap the compiled backward.
    train_model = torch.compile(ddp_model) if compile else ddp_model
    return raw_model, train_model, torch.compile(raw_model) if compile else raw_model


def parameter_groups(model: nn.Module, weight_decay: float, decay_biases: bool) -> list[dict]:
    """SGD parameter groups: weight decay on the weights, and on the biases only with `decay_biases`.

    The paper's update rule decays the weights w; cuda-convnet applied its `wc` to weights only and Caffe's
    reference AlexNet gives biases no decay. Decayed for 90 epochs, the biases initialised to 1 would shrink
    to about 0.2 from the decay alone.
    """
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [{"params": [m.weight for m in layers], "weight_decay": weight_decay},
            {"params": [m.bias for m in layers], "weight_decay": weight_decay if decay_biases else 0.0}]


def make_optimizer(model: nn.Module, *, lr: float, momentum: float, weight_decay: float, decay_biases: bool,
                   fused: bool) -> torch.optim.SGD:
    """The paper's SGD. PyTorch's keeps the velocity of g + wd*w and multiplies by lr when stepping; the paper's
    rule puts lr inside the velocity. They differ only for a few steps after an lr drop."""
    return torch.optim.SGD(parameter_groups(model, weight_decay, decay_biases), lr=lr, momentum=momentum, fused=fused)


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
