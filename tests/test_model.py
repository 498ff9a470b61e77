"""The network of the paper: shapes, parameter count, LRN, initialisation, dropout, learning."""
import pytest
import torch
from torch import nn

from model import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, AlexNet, TowerLRN


def images(n: int, seed: int = 0) -> torch.Tensor:
    """Mean-subtracted pixels on the 0-255 scale, as the pipelines deliver them."""
    return 60.0 * torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def test_parameter_count_and_output_shape():
    net = AlexNet(num_classes=1000)
    assert sum(p.numel() for p in net.parameters()) == 60_965_224
    sizes = {}
    for name, layer in net.features.named_children():
        layer.register_forward_hook(lambda m, i, o, name=name: sizes.__setitem__(name, tuple(o.shape[1:])))
    with torch.no_grad():
        assert net.eval()(images(2)).shape == (2, 1000)
    assert sizes["conv1"] == (96, 55, 55) and sizes["pool1"] == (96, 27, 27)
    assert sizes["conv2"] == (256, 27, 27) and sizes["pool2"] == (256, 13, 13)
    assert sizes["conv3"] == (384, 13, 13) and sizes["conv4"] == (384, 13, 13)
    assert sizes["conv5"] == (256, 13, 13) and sizes["pool5"] == (256, 6, 6)
    assert AlexNet(num_classes=10).eval()(images(1)).shape == (1, 10)


def test_two_gpu_connectivity():
    f = AlexNet().features
    assert [f.conv1.groups, f.conv2.groups, f.conv3.groups, f.conv4.groups, f.conv5.groups] == [1, 2, 1, 2, 2]


def paper_lrn(a: torch.Tensor, alpha: float, k=2.0, n=5, beta=0.75) -> torch.Tensor:
    """Section 3.3 written out for one GPU's N maps, in float64:
    b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta."""
    a = a.double()
    channels = a.shape[1]
    b = torch.empty_like(a)
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        b[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi + 1] ** 2).sum(1)) ** beta
    return b


def two_tower_lrn(a: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's network: each of the two GPUs normalised its own half of the maps."""
    return torch.cat([paper_lrn(half, alpha) for half in a.chunk(2, dim=1)], dim=1)


def activations(channels: int, scale: float = 200.0, seed: int = 0) -> torch.Tensor:
    """ReLU outputs; large, so that the normaliser is far from k^beta and a wrong alpha or window would show."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(scale * torch.randn(2, channels, 7, 7, dtype=torch.float64, generator=g))


def test_lrn_matches_the_papers_formula_per_tower():
    assert (LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K) == (5, 1e-4, 0.75, 2.0)
    net = AlexNet()
    for norm, channels in ((net.features.norm1, 96), (net.features.norm2, 256)):
        a = activations(channels)
        got = norm(a)
        # The documented choice: alpha divided by n (cuda-convnet's and PyTorch's convention).
        torch.testing.assert_close(got, two_tower_lrn(a, alpha=LRN_ALPHA / LRN_SIZE), rtol=1e-10, atol=1e-10)
        assert not torch.allclose(got, two_tower_lrn(a, alpha=LRN_ALPHA), rtol=1e-3)
        assert not torch.allclose(got, paper_lrn(a, alpha=LRN_ALPHA / LRN_SIZE), rtol=1e-3)  # one window over both
    names = list(dict(net.features.named_children()))
    assert names.index("norm1") == names.index("relu1") + 1 and names.index("pool1") == names.index("norm1") + 1
    assert names.index("norm2") == names.index("relu2") + 1 and names.index("pool2") == names.index("norm2") + 1


def test_a_towers_normalisation_ignores_the_other_tower():
    for channels in (96, 256):
        a = activations(channels)
        b = a.clone()
        b[:, channels // 2:] = 1e4  # the second tower's maps, large enough to dominate any window they entered
        norm = TowerLRN(channels)
        first, second = norm(a)[:, :channels // 2], norm(b)[:, :channels // 2]
        assert torch.equal(first, second)
        assert not torch.allclose(norm(b)[:, channels // 2:], b[:, channels // 2:] / LRN_K ** LRN_BETA, rtol=1e-3)


def test_lrn_and_logits_are_float32_under_bfloat16_autocast():
    torch.manual_seed(0)
    net = AlexNet(num_classes=10).eval()
    x = images(2)
    # Typical conv1 outputs, given to the normalisation in bfloat16 as autocast's convolutions return them.
    a = activations(96, scale=5.0).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        normalised = net.features.norm1(a)
        assert net.features.conv1(x).dtype == torch.bfloat16  # autocast is on
        seen = {}
        net.classifier.fc8.register_forward_hook(lambda m, i, o: seen.__setitem__("fc8_in", i[0]))
        logits = net(x)
    assert normalised.dtype == torch.float32
    # Here alpha/n * sum is ~1e-3 of k: in bfloat16 (steps of 1/64 near k=2) the normaliser would be k itself.
    reference = two_tower_lrn(a.double(), alpha=LRN_ALPHA / LRN_SIZE)
    torch.testing.assert_close(normalised.double(), reference, rtol=1e-6, atol=0)
    assert not torch.allclose(reference, a.double() / LRN_K ** LRN_BETA, rtol=1e-4)
    assert logits.dtype == torch.float32
    with torch.no_grad():
        expected = nn.functional.linear(seen["fc8_in"].float(), net.classifier.fc8.weight, net.classifier.fc8.bias)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


def test_initial_weight_statistics():
    torch.manual_seed(0)
    net = AlexNet()
    layers = {**dict(net.features.named_children()), **dict(net.classifier.named_children())}
    for name in ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]:
        w, b = layers[name].weight, layers[name].bias
        tolerance = 4 / w.numel() ** 0.5  # four standard errors of the estimates
        assert abs(w.mean().item()) < 0.01 * tolerance, name
        assert abs(w.std().item() / 0.01 - 1) < tolerance, name
        expected_bias = 1.0 if name in {"conv2", "conv4", "conv5", "fc6", "fc7"} else 0.0
        assert torch.all(b == expected_bias), name


def test_dropout_on_the_outputs_of_fc6_and_fc7_only():
    net = AlexNet(num_classes=10)
    assert not any(isinstance(m, nn.Dropout) for m in net.features.modules())
    kinds = [type(m).__name__ for m in net.classifier.children()]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Float32Linear"]
    seen = {}
    c = net.classifier
    c.fc6.register_forward_hook(lambda m, i, o: seen.__setitem__("fc6_in", i[0].clone()))
    c.relu6.register_forward_hook(lambda m, i, o: seen.__setitem__("relu6_out", o.clone()))
    c.fc7.register_forward_hook(lambda m, i, o: seen.__setitem__("fc7_in", i[0].clone()))
    c.relu7.register_forward_hook(lambda m, i, o: seen.__setitem__("relu7_out", o.clone()))
    c.fc8.register_forward_hook(lambda m, i, o: seen.__setitem__("fc8_in", i[0].clone()))
    x = images(2)
    with torch.no_grad():
        pool5 = torch.flatten(net.features(x), 1)
        net.train()(x)
        assert torch.equal(seen["fc6_in"], pool5)  # no dropout before fc6
        for out, nxt in (("relu6_out", "fc7_in"), ("relu7_out", "fc8_in")):
            positive, kept = seen[out] > 0, seen[nxt] != 0
            assert positive.sum() > 1000 and not kept[~positive].any()
            assert 0.45 < kept[positive].float().mean() < 0.55  # p = 0.5
            torch.testing.assert_close(seen[nxt][kept], 2 * seen[out][kept])  # survivors scaled by 1/(1-p)
        net.eval()(x)
        assert torch.equal(seen["fc7_in"], seen["relu6_out"]) and torch.equal(seen["fc8_in"], seen["relu7_out"])


@pytest.mark.slow
def test_a_few_sgd_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    net = AlexNet(num_classes=4)
    g = torch.Generator().manual_seed(1)
    y = torch.arange(8) % 4
    x = (60 * torch.randn(4, 3, 224, 224, generator=g))[y] + 20 * torch.randn(8, 3, 224, 224, generator=g)
    # A small lr: with 4 classes the paper's 0.01 makes the logits of the bias-1 network swing together.
    optimizer = torch.optim.SGD(net.parameters(), lr=2e-5, momentum=0.9, weight_decay=5e-4)

    def eval_loss():
        with torch.no_grad():
            return nn.functional.cross_entropy(net.eval()(x), y).item()

    before = eval_loss()
    for _ in range(8):
        loss = nn.functional.cross_entropy(net.train()(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < 0.75 * before, (before, after)


def test_state_dict_round_trip():
    """What eval.py does with a checkpoint: plain keys, strict load."""
    a, b = AlexNet(num_classes=7), AlexNet(num_classes=7)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    # Exactly the weights and biases of the eight layers: checkpoints of every version load into every other.
    layers = [f"features.conv{i}" for i in range(1, 6)] + [f"classifier.fc{i}" for i in range(6, 9)]
    assert list(a.state_dict()) == [f"{layer}.{p}" for layer in layers for p in ("weight", "bias")]
