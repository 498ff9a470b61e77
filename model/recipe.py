"""The paper's training recipe (section 5) on one device or several: the network as it trains, SGD with momentum 0.9
and weight decay on the weights, the learning rate divided by 10 when the validation error stops improving, and one
step of it.

    policy = numerics(device, "bfloat16", channels_last=True, benchmark=True)  # autocast, TF32, memory layout
    raw, net, eval_net = build_model(1000, dropout=0.5, seed=0, device=device, channels_last=policy.channels_last,
                                     distributed=False, compile=False)
    optimizer = make_optimizer(raw, lr=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False, fused=True)
    schedule = DropOnPlateau(optimizer, patience=2, max_drops=3)
    loss, logits = train_step(net, optimizer, images, labels, policy.autocast)  # each step
    schedule.step(val_top1_err)                                                 # each epoch
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import AlexNet


@dataclass(frozen=True)
class Numerics:
    """How the network computes on a device, and the images the loaders hand it to match."""
    device: torch.device
    autocast: torch.autocast  # to bfloat16 or float16 on a GPU; disabled for float32 and on the CPU
    channels_last: bool  # NHWC memory for the model and its images
    loader_dtype: str  # the images' type: the autocast dtype on a GPU, float32 otherwise

    @property
    def loader_output(self) -> dict:
        """pipeline.Output's options for such images: `pipeline.Output(**numerics.loader_output, mean=...)`."""
        return {"device": self.device, "dtype": self.loader_dtype, "channels_last": self.channels_last}


def numerics(device: torch.device, dtype: str = "float32", channels_last: bool = False, *,
             benchmark: bool = False) -> Numerics:
    """The one place every entry point takes its numerics from. On a GPU: autocast to `dtype` ("bfloat16" or
    "float16"; "float32": none) and channels-last as asked; on the CPU float32 in the default layout. Sets this
    process's CUDA backend flags to match; `benchmark`: cuDNN times its convolution algorithms once per input shape
    and keeps the fastest (worth it where the shapes repeat: training)."""
    cuda = device.type == "cuda"
    reduced = cuda and dtype != "float32"
    if cuda:
        torch.backends.cudnn.benchmark = benchmark
        # TF32 only under a reduced dtype (PyTorch's default allows it in every convolution): float32 means float32.
        # Under bfloat16 the float32 products left are fc8's, whose bfloat16 inputs TF32 holds exactly, and LRN's
        # window sums, where it rounds only the small alpha/n * sum term (model/__init__.py).
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = reduced
    return Numerics(device, torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=reduced),
                    cuda and channels_last, dtype if cuda else "float32")


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


def set_hyperparameters(optimizer: torch.optim.SGD, *, lr: float | None = None, momentum: float | None = None,
                        weight_decay: float | None = None, decay_biases: bool | None = None) -> None:
    """Replace the given values in make_optimizer's groups (weights, then biases), e.g. after loading a saved state:
    `weight_decay` and `decay_biases` are set together (the biases' decay is weight_decay or 0)."""
    weights, biases = optimizer.param_groups
    for group in (weights, biases):
        if lr is not None:
            group["lr"] = lr
        if momentum is not None:
            group["momentum"] = momentum
    if weight_decay is not None or decay_biases is not None:
        if weight_decay is None or decay_biases is None:
            raise ValueError("set weight_decay and decay_biases together")
        weights["weight_decay"] = weight_decay
        biases["weight_decay"] = weight_decay if decay_biases else 0.0


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

