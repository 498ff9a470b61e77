"""AlexNet (Krizhevsky, Sutskever & Hinton 2012) on one device; torch only.

    from model import AlexNet, load_exported
    net = AlexNet(num_classes=1000)        # 60,965,224 parameters; input N x 3 x 224 x 224
    net = load_exported("runs/alexnet/best.safetensors")   # trained weights (`make export`), eval mode

The paper split the network over two GPUs that exchanged activations only at conv3 and the
fully connected layers. `groups=2` in conv2, conv4 and conv5 keeps exactly that connectivity
(and parameter count) on one device; each tower's response normalisation stays within its own maps.

Under autocast (bfloat16 on a GPU) the normalisation layers and fc8 still compute in float32, so that
the logits, and everything ranked or averaged from them, are float32.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

TOWERS = 2  # the paper's two GPUs
# Local response normalisation as in section 3.3: b = a / (k + alpha * sum_{n neighbouring maps} a^2)^beta.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0
# alpha is divided by the window size n, as cuda-convnet (the code that trained the paper's network; its
# cross-map normalisation is documented as 1 + (scale/size) * sum), Caffe and nn.LocalResponseNorm do.
# The paper's formula read literally does not. We keep the division: alpha=1e-4 was chosen with code that
# divides, so dropping it would make the normaliser 5x stronger than in the network the paper reports on.
# The difference is small either way: k=2 dominates until activations reach ~100.


class TowerLRN(nn.Module):
    """Local response normalisation of each tower's maps on their own, computed in float32 even under autocast.

    Section 3.3 sums over "adjacent kernel maps" of one GPU: each normalised only its own 48 (conv1) or 128
    (conv2) maps, so a map at a tower's edge has fewer neighbours, as one at the layer's edge does. In bfloat16
    the normaliser k + alpha/n * sum would round to k (bfloat16 steps are 1/64 near 2) at most positions.
    The window sums are a 1x1 convolution of the squares with a fixed 0/1 band matrix, block-diagonal over the
    towers: a matrix product over the channels, which runs in either memory layout (nn.LocalResponseNorm's
    avg_pool3d copies channels-last inputs to NCHW). With TF32 on (bfloat16 training on a GPU) the products round
    the squares to 11 significant bits, which moves alpha/n * sum by at most 5e-4 of itself and never touches k.
    The band is a non-persistent buffer: the state dict is that of nn.LocalResponseNorm (empty).
    """

    def __init__(self, channels: int, towers: int = TOWERS, size: int = LRN_SIZE, alpha: float = LRN_ALPHA,
                 beta: float = LRN_BETA, k: float = LRN_K):
        super().__init__()
        self.towers, self.size, self.alpha, self.beta, self.k = towers, size, alpha, beta, k
        per_tower = torch.arange(channels // towers)
        band = ((per_tower[:, None] - per_tower[None, :]).abs() <= size // 2).float()
        # Grouped-convolution weight, (out, in per group, 1, 1): row i sums the squares of maps i-n/2..i+n/2.
        self.register_buffer("band", band.repeat(towers, 1)[:, :, None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            window = F.conv2d(x * x, self.band.to(x.dtype), groups=self.towers)
            return x / (self.k + self.alpha / self.size * window).pow(self.beta)

    def extra_repr(self) -> str:
        return f"towers={self.towers}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


class Float32Linear(nn.Linear):
    """nn.Linear computed in float32 even under autocast. For fc8: bfloat16 logits (8 significant bits) tie and
    swap the top classes of close scores; float32 logits rank as the layer's inputs do. With TF32 on (bfloat16
    training on a GPU) the products round the weights to 11 significant bits; the bfloat16 inputs stay exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(torch.promote_types(x.dtype, torch.float32)))


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()

        def pool():  # overlapping: 3x3 windows every 2 pixels
            return nn.MaxPool2d(kernel_size=3, stride=2)

        # Spatial sizes for a 224x224 input; padding 2 in conv1 gives the paper's 55x55.
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 96, 11, stride=4, padding=2)), ("relu1", nn.ReLU(inplace=True)),  # 55
            ("norm1", TowerLRN(96)), ("pool1", pool()),                                               # 27
            ("conv2", nn.Conv2d(96, 256, 5, padding=2, groups=2)), ("relu2", nn.ReLU(inplace=True)),
            ("norm2", TowerLRN(256)), ("pool2", pool()),                                              # 13
            ("conv3", nn.Conv2d(256, 384, 3, padding=1)), ("relu3", nn.ReLU(inplace=True)),           # both halves
            ("conv4", nn.Conv2d(384, 384, 3, padding=1, groups=2)), ("relu4", nn.ReLU(inplace=True)),
            ("conv5", nn.Conv2d(384, 256, 3, padding=1, groups=2)), ("relu5", nn.ReLU(inplace=True)),
            ("pool5", pool()),                                                                        # 6
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc6", nn.Linear(256 * 6 * 6, 4096)), ("relu6", nn.ReLU(inplace=True)), ("drop6", nn.Dropout(dropout)),
            ("fc7", nn.Linear(4096, 4096)), ("relu7", nn.ReLU(inplace=True)), ("drop7", nn.Dropout(dropout)),
            ("fc8", Float32Linear(4096, num_classes)),  # float32 logits
        ]))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Section 5: weights N(0, 0.01^2); biases 1 where that feeds ReLUs positive inputs early on, else 0."""
        ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
        for name, layer in [*self.features.named_children(), *self.classifier.named_children()]:
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                layer.weight.normal_(0.0, 0.01)
                layer.bias.fill_(1.0 if name in ones else 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))


def __getattr__(name):
    # Imported when first asked for: model/export.py builds on AlexNet above, and `python -m model.export` must find
    # it not yet imported.
    if name == "load_exported":
        from model.export import load_exported
        return load_exported
    raise AttributeError(f"module 'model' has no attribute {name!r}")
